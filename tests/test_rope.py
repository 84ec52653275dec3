"""RoPE against a float64 NumPy rotate-half (Hugging Face's formula), values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ava_jax.models.config import RopeConfig
from ava_jax.models.rope import apply_rope, inv_frequencies


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def cos_sin_f64(pos, inv_freq, scale):
    """cos and sin [B, T, 1, H] of the angles, each frequency repeated over both halves."""
    angles = pos[..., None].astype(np.float64) * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return np.cos(angles) * scale, np.sin(angles) * scale


@pytest.mark.parametrize("head_dim, rope", [(8, RopeConfig()),
                                            (64, RopeConfig(rope_type="yarn", factor=4.0,
                                                            original_max_position_embeddings=32))])
def test_apply_rope_and_its_gradient_match_float64(head_dim, rope):
    rng = np.random.default_rng(0)
    B, T, N = 2, 12, 3
    x = rng.standard_normal((B, T, N, head_dim))
    pos = np.maximum(np.arange(T)[None] - np.array([[0], [4]]), 0)  # the second row left-padded by 4
    w = rng.standard_normal((B, T, N, head_dim))
    inv_freq, scale = inv_frequencies(rope, head_dim, 128)
    assert scale != 1.0 or rope.rope_type == "default"
    args = (jnp.asarray(pos, jnp.int32), tuple(float(f) for f in inv_freq), scale)
    got = apply_rope(jnp.asarray(x, jnp.float32), *args)
    cos, sin = cos_sin_f64(pos, inv_freq, scale)
    np.testing.assert_allclose(got, x * cos + rotate_half(x) * sin, rtol=1e-5, atol=1e-5)
    # d/dx sum(w * rope(x)) = w cos + rotate_half^T(w sin), with rotate_half^T(y) = -rotate_half(y).
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(w, jnp.float32) * apply_rope(v, *args)))(jnp.asarray(x, jnp.float32))
    want = w * cos - rotate_half(w * sin)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)
    bf16 = apply_rope(jnp.asarray(x, jnp.bfloat16), *args)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == x.shape
