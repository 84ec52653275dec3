"""The query-blocked causal attention equals a float64 NumPy reference and XLA's dot_product_attention,
in value and in gradient (its backward is a hand-written custom VJP)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.models import TQR
from ava_jax.models.attention import blocked_causal_attention, block_size, resolve

from conftest import tiny_config


def _full_mask(valid_BxT):
    T = valid_BxT.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    own = np.eye(T, dtype=bool)
    return causal[None] & (valid_BxT[:, None, :] | own[None])


def _numpy_attention(q, k, v, valid, scale, w=None):
    """float64 reference: repeat K/V heads, mask, softmax. With `w`, also the gradients of
    sum(w * out) with respect to q, k and v, by the textbook softmax backward."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.where(_full_mask(np.asarray(valid))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    if w is None:
        return out
    w = np.asarray(w, np.float64)
    dp = np.einsum("btnh,bsnh->bnts", w, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = np.einsum("bnts,bsnh->btnh", ds, k)
    dk = np.einsum("bnts,btnh->bsnh", ds, q)
    dv = np.einsum("bnts,btnh->bsnh", p, w)
    fold = lambda x: x.reshape(*x.shape[:2], -1, G, x.shape[-1]).sum(axis=3)  # the G heads sharing K/V
    return out, (dq, fold(dk), fold(dv))


@pytest.mark.parametrize("T,block", [(37, 8), (64, 32), (20, 64), (33, None)])
def test_blocked_matches_float64_reference(T, block):
    B, N, K, H = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, T - 4:] = False  # right padding
    valid[2, 3:7] = False  # a hole
    out = jax.jit(blocked_causal_attention, static_argnums=(4, 5))(q, k, v, jnp.asarray(valid), H ** -0.5, block)
    ref = _numpy_attention(q, k, v, valid, H ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,block", [(37, 8), (40, 16), (20, 64)])
def test_blocked_gradient_matches_float64_reference(T, block):
    B, N, K, H = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(2), 4)
    q, w = (jax.random.normal(kk, (B, T, N, H)) for kk in (keys[0], keys[3]))
    k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in (keys[1], keys[2]))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, T - 4:] = False  # right padding
    valid[2, 3:7] = False  # a hole

    def loss(q, k, v):
        return jnp.sum(w * blocked_causal_attention(q, k, v, jnp.asarray(valid), H ** -0.5, block))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    _, ref = _numpy_attention(q, k, v, valid, H ** -0.5, w)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_blocked_gradient_matches_xla():
    B, T, N, K, H = 2, 40, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    w = jax.random.normal(keys[3], (B, T, N, H))
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [6]]))
    mask = jnp.asarray(_full_mask(np.asarray(valid)))[:, None]

    def blocked(q, k, v):
        return jnp.sum(w * blocked_causal_attention(q, k, v, valid, H ** -0.5, 16))

    def xla(q, k, v):
        return jnp.sum(w * jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5))

    grads = [jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v) for f in (blocked, xla)]
    for g_b, g_x in zip(*grads):
        np.testing.assert_allclose(np.asarray(g_b), np.asarray(g_x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_backbone_same_with_either_kernel(arch):
    """The whole model (logits, reward heads and parameter gradients) does not depend on the kernel."""
    cfgs = [tiny_config(arch, attention=a) for a in ("blocked", "xla")]
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 45)), jnp.int32)
    mask = jnp.asarray(np.arange(45)[None] >= np.array([[0], [9]]))
    outs, grads = [], []
    for cfg in cfgs:
        model = TQR(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            out = nnx.merge(graphdef, p)(tokens, mask)
            return jnp.sum(jnp.where(mask[..., None], out.logits, 0.0) ** 2) + jnp.sum(out.reward_mean * mask)

        outs.append(jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, mask))(params))
        grads.append(jax.jit(jax.grad(loss))(params))
    for name in ("logits", "reward_mean", "reward_sigma"):
        a, b = getattr(outs[0], name), getattr(outs[1], name)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
    for g_b, g_x in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(g_b), np.asarray(g_x), rtol=1e-4, atol=1e-5)


def test_resolve_and_block_size():
    assert resolve("auto", cached=True) == "xla"  # the KV cache always takes the general path
    assert resolve("blocked", cached=False) == "blocked"
    assert resolve("auto", cached=False) == ("blocked" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="model.attention"):
        resolve("flash", cached=False)
    with pytest.raises(ValueError, match="attention="):
        tiny_config(attention="flash")
    assert block_size(256) == 32 and block_size(1024) == 64 and block_size(7) == 32
