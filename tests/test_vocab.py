"""Chunked-vocabulary token log-probs and weighted NLL: values and gradients against float64 NumPy, and no
[N, V] tensor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.losses.lm import lm_loss, masked_nll, nll_loss, token_logprobs
from ava_jax.losses.vocab import _position_chunks, chunked_token_logprobs, chunked_weighted_nll
from ava_jax.models import Transformer

from conftest import tiny_config


def _numpy(h, w, y, g, vocab_major):
    """float64 log-probs and the gradients of sum(g * logp) w.r.t. h and w."""
    h, w, g = (np.asarray(x, np.float64) for x in (h, w, g))
    W = w.T if vocab_major else w  # [D, V]
    z = h @ W
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z[np.arange(len(y)), y] - lse
    dz = g[:, None] * (np.eye(W.shape[1])[y] - np.exp(z - lse[:, None]))
    dh, dW = dz @ W.T, h.T @ dz
    return logp, dh, (dW.T if vocab_major else dW)


@pytest.mark.parametrize("vocab_major,V,chunk", [(True, 97, 32), (False, 97, 32), (True, 64, 64), (False, 50, 7)])
def test_chunked_logprobs_match_float64(vocab_major, V, chunk):
    N, D = 23, 16
    rng = np.random.default_rng(0)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(V, D) if vocab_major else (D, V)) * 0.7).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    g = rng.normal(size=N).astype(np.float32)

    def f(h, w):
        logp = chunked_token_logprobs(h[None], w, jnp.asarray(y)[None], vocab_major=vocab_major, chunk=chunk)[0]
        return jnp.sum(logp * g), logp

    (_, logp), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    ref_logp, ref_dh, ref_dw = _numpy(h, w, y, g, vocab_major)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5)


def _padded_lm(tie):
    """(model, tokens, mask, graphdef, params): a tiny Llama and a right-padded batch of two."""
    cfg = tiny_config("llama", tie_embeddings=tie)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7]]))
    return (model, tokens, mask) + tuple(nnx.split(model, nnx.Param))


def _assert_same_loss_and_grads(reference, candidate, params):
    """Both losses of the parameters, jitted: equal values and equal gradients for every parameter."""
    (l_ref, g_ref), (l_new, g_new) = (jax.jit(jax.value_and_grad(f))(params) for f in (reference, candidate))
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_backbone_token_logprobs_equal_full_logits(tie):
    model, tokens, mask, graphdef, params = _padded_lm(tie)

    def full(p):
        m = nnx.merge(graphdef, p)
        return lm_loss(m(tokens, mask).logits, tokens, mask)[0]

    def chunked(p):
        m = nnx.merge(graphdef, p)
        out = m(tokens, mask, logits=False)
        assert out.logits is None
        return masked_nll(m.token_logprobs(out.hidden, tokens, chunk=40), mask)[0]

    _assert_same_loss_and_grads(full, chunked, params)
    logits = nnx.merge(graphdef, params)(tokens).logits
    np.testing.assert_allclose(np.asarray(model.token_logprobs(model(tokens).hidden, tokens)),
                               np.asarray(token_logprobs(logits, tokens)), rtol=1e-5, atol=1e-5)


def test_no_full_vocabulary_tensor_in_the_compiled_gradient():
    """The compiled LM-loss gradient holds no [N, V] array: only [N, chunk] pieces."""
    N, D, V, chunk = 64, 16, 1000, 128

    def loss(h, w, y):
        return -jnp.sum(chunked_token_logprobs(h[None], w, y[None], vocab_major=True, chunk=chunk))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jnp.zeros((N, D)), jnp.zeros((V, D)), jnp.zeros((N,), jnp.int32)).compile().as_text()
    assert f"f32[{N},{chunk}]" in hlo  # the chunks are there (the check can see shapes)
    assert f"f32[{N},{V}]" not in hlo and f"f32[1,{N},{V}]" not in hlo


def test_scaled_log_sum_exps_and_their_scale_gradients_match_float64():
    """chunked_logit_stats: lse_v(s_k z_v) and d/ds_k = E_{softmax(s_k z)}[z], against NumPy."""
    from ava_jax.losses.vocab import chunked_logit_stats
    N, D, V, K = 9, 8, 45, 3
    rng = np.random.default_rng(3)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=(V, D)).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    s = rng.uniform(0.2, 2.0, size=(N, K)).astype(np.float32)
    g_pick, g_lse = rng.normal(size=N), rng.normal(size=(N, K))

    def f(h, w, s):
        pick, lse = chunked_logit_stats(h[None], w, jnp.asarray(y)[None], s[None], vocab_major=True, chunk=16)
        return jnp.sum(pick[0] * g_pick) + jnp.sum(lse[0] * g_lse), (pick[0], lse[0])

    (_, (pick, lse)), (dh, dw, ds) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(h, w, s)
    z = h.astype(np.float64) @ w.T.astype(np.float64)
    sz = s.astype(np.float64)[:, :, None] * z[:, None, :]  # [N, K, V]
    ref_lse = np.log(np.exp(sz - sz.max(-1, keepdims=True)).sum(-1)) + sz.max(-1)
    p = np.exp(sz - ref_lse[..., None])
    dz = g_pick[:, None] * np.eye(V)[y] + np.einsum("nk,nkv->nv", g_lse * s, p)
    np.testing.assert_allclose(np.asarray(pick), z[np.arange(N), y], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ds), g_lse * np.einsum("nkv,nv->nk", p, z), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), dz @ w.astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), dz.T @ h.astype(np.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab_major,V,chunk,T", [(True, 97, 32, 7), (False, 97, 32, 7), (True, 64, 64, 5),
                                                   (False, 50, 7, 9), (True, 30, 1000, 4)])
def test_weighted_nll_and_its_forward_gradients_match_float64(vocab_major, V, chunk, T):
    """chunked_weighted_nll: sum(weights * -logp), and d/dh, d/dw formed in the forward then scaled by the
    cotangent, against NumPy; position chunks that do not divide T (padding) and zero weights included."""
    B, D = 3, 16
    rng = np.random.default_rng(4)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(V, D) if vocab_major else (D, V)) * 0.7).astype(np.float32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    wt = (rng.uniform(size=(B, T)) * (rng.uniform(size=(B, T)) > 0.3)).astype(np.float32)
    scale = 1.7  # the cotangent reaching the scalar: d(scale * nll)

    def f(h, w):
        return scale * chunked_weighted_nll(h, w, jnp.asarray(y), jnp.asarray(wt), vocab_major=vocab_major,
                                            chunk=chunk)

    value, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    logp, ref_dh, ref_dw = _numpy(h.reshape(B * T, D), w, y.reshape(-1), -scale * wt.reshape(-1), vocab_major)
    np.testing.assert_allclose(float(value), -scale * np.sum(wt.reshape(-1) * logp), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh).reshape(B * T, D), ref_dh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-5)
    # Without a gradient the value is the same (the primal path runs no gradient products).
    np.testing.assert_allclose(float(jax.jit(f)(h, w)), float(value), rtol=1e-6)


def test_weighted_nll_weights_get_no_gradient_and_no_full_vocabulary_tensor():
    B, T, D, V, chunk = 2, 32, 16, 1000, 128
    h, w = jnp.ones((B, T, D)), jnp.ones((V, D))
    y = jnp.zeros((B, T), jnp.int32)

    def loss(h, w, wt):
        return chunked_weighted_nll(h, w, y, wt, vocab_major=True, chunk=chunk)

    assert float(jnp.max(jnp.abs(jax.grad(loss, argnums=2)(h, w, jnp.ones((B, T)))))) == 0.0
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, jnp.ones((B, T))).compile().as_text()
    Tc = _position_chunks(T, V, chunk)[0]
    assert f"f32[{B * Tc},{V}]" in hlo  # the position chunks' logits are there (the check can see shapes)
    assert f"f32[{B},{T},{V}]" not in hlo and f"f32[{B * T},{V}]" not in hlo


@pytest.mark.parametrize("tie", [True, False])
def test_backbone_token_nll_equals_the_log_prob_path(tie):
    """Transformer.token_nll: loss and every parameter gradient equal masked_nll over token_logprobs."""
    model, tokens, mask, graphdef, params = _padded_lm(tie)

    def via_logprobs(p):
        m = nnx.merge(graphdef, p)
        return masked_nll(m.token_logprobs(m(tokens, mask, logits=False).hidden, tokens), mask)[0]

    def via_nll(p):
        m = nnx.merge(graphdef, p)
        target = mask[:, 1:]
        return nll_loss(m.token_nll(m(tokens, mask, logits=False).hidden, tokens, target, chunk=40),
                        jnp.sum(target, dtype=jnp.float32))[0]

    _assert_same_loss_and_grads(via_logprobs, via_nll, params)
