"""Token log-probabilities from hidden states, computed in vocabulary chunks (no [B, T, V] tensor).

log p(y | h) = z_y - logsumexp_v z_v with z = h W. The forward walks the vocabulary in chunks of
`chunk` columns, keeping a running log-sum-exp and the picked logit; the backward (a custom VJP)
recomputes each chunk's logits, forms softmax(z) - onehot(y) for that chunk only, and accumulates
dh and the chunk's rows of dW. Peak memory is O(N * chunk) instead of O(N * V) for the logits, their
log-softmax and its gradient; the price is one extra h W product in the backward (the recompute).

Used by the LM losses (DPO log-probs, the AVA LM-likelihood metric) through
`Transformer.token_logprobs`. The chunks are a `lax.scan` over equal slices of W (the last one moved
back to end at V, its overlap masked), so XLA runs them one at a time, compiles one loop body
whatever V, and never copies W into a padded matrix.

`chunked_weighted_nll` is the cheaper path for a loss that is a fixed weighted sum of token NLLs (the
LM loss, SFT): its gradient is known up to one scalar in the forward, so the forward forms dh and dW
chunk by chunk (chunks of positions, each over the whole vocabulary) and the backward only scales
them, three products of h and W instead of four (the fused linear cross-entropy of Liger-Kernel).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 8192


def _layout(V: int, chunk: int):
    """(chunk width C, number of chunks M): M chunks of C columns; the last starts at V - C."""
    C = min(chunk, V)
    return C, -(-V // C)


def _slice_w(w, start, C, vocab_major):
    return (jax.lax.dynamic_slice_in_dim(w, start, C, axis=0) if vocab_major
            else jax.lax.dynamic_slice_in_dim(w, start, C, axis=1))


def _chunk(h_NxD, w, i, C, V, vocab_major):
    """Chunk i: its start, logits z [N, C] (float32) and which of its columns are its own.

    Chunk i covers [i C, (i + 1) C); the last is moved back to [V - C, V) so every chunk has the same
    shape (one compiled loop body, no padding copy of w), and columns it shares with the previous
    chunk are masked out so each column counts once.
    """
    start = jnp.minimum(i * C, V - C)
    wc = _slice_w(w, start, C, vocab_major).astype(h_NxD.dtype)
    spec = "nd,vd->nv" if vocab_major else "nd,dv->nv"
    z_NxC = jnp.einsum(spec, h_NxD, wc, preferred_element_type=jnp.float32)
    own_C = start + jnp.arange(C) >= i * C
    return start, wc, z_NxC, own_C


def _forward(h_NxD, w, targets_N, scales_NxK, chunk, vocab_major):
    V = w.shape[0] if vocab_major else w.shape[1]
    N, K = scales_NxK.shape
    C, M = _layout(V, chunk)

    def body(carry, i):
        lse_NxK, picked_N = carry
        start, _, z_NxC, own_C = _chunk(h_NxD, w, i, C, V, vocab_major)
        zm_NxC = jnp.where(own_C[None], z_NxC, -jnp.inf)
        # One [N, C] pass per scale (K is 1 to 3): no [N, K, C] array. Scales are positive.
        piece_NxK = jnp.stack([jax.nn.logsumexp(scales_NxK[:, k, None] * zm_NxC, axis=-1) for k in range(K)], -1)
        local_N = targets_N - start
        hit_N = (local_N >= 0) & (local_N < C) & (targets_N >= i * C)
        got_N = jnp.take_along_axis(z_NxC, jnp.clip(local_N, 0, C - 1)[:, None], axis=-1)[:, 0]
        return (jnp.logaddexp(lse_NxK, piece_NxK), picked_N + jnp.where(hit_N, got_N, 0.0)), None

    init = (jnp.full((N, K), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32))
    (lse_NxK, picked_N), _ = jax.lax.scan(body, init, jnp.arange(M))
    return picked_N, lse_NxK


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _stats(h_NxD, w, targets_N, scales_NxK, chunk, vocab_major):
    return _forward(h_NxD, w, targets_N, scales_NxK, chunk, vocab_major)


def _stats_fwd(h_NxD, w, targets_N, scales_NxK, chunk, vocab_major):
    picked_N, lse_NxK = _forward(h_NxD, w, targets_N, scales_NxK, chunk, vocab_major)
    return (picked_N, lse_NxK), (h_NxD, w, targets_N, scales_NxK, lse_NxK)


def _stats_bwd(chunk, vocab_major, res, cotangents):
    h_NxD, w, targets_N, scales_NxK, lse_NxK = res
    g_pick_N, g_lse_NxK = (c.astype(jnp.float32) for c in cotangents)
    V = w.shape[0] if vocab_major else w.shape[1]
    C, M = _layout(V, chunk)
    K = scales_NxK.shape[1]

    def body(carry, i):
        dh_NxD, dw, dscale_NxK = carry
        start, wc, z_NxC, own_C = _chunk(h_NxD, w, i, C, V, vocab_major)
        hit_NxC = ((targets_N[:, None] - start) == jnp.arange(C)[None, :]) & own_C[None]
        # p_k = softmax(s_k z): d lse_k / dz = s_k p_k and d lse_k / ds_k = sum_v p_k,v z_v.
        dz_NxC = g_pick_N[:, None] * hit_NxC.astype(jnp.float32)
        ez_parts = []
        for k in range(K):
            p_NxC = jnp.where(own_C[None], jnp.exp(scales_NxK[:, k, None] * z_NxC - lse_NxK[:, k, None]), 0.0)
            ez_parts.append(jnp.sum(p_NxC * z_NxC, axis=-1))
            dz_NxC = dz_NxC + (g_lse_NxK[:, k] * scales_NxK[:, k])[:, None] * p_NxC
        dz_NxC = dz_NxC.astype(h_NxD.dtype)
        if vocab_major:
            dh_NxD = dh_NxD + jnp.einsum("nv,vd->nd", dz_NxC, wc, preferred_element_type=jnp.float32)
            dwc = jnp.einsum("nv,nd->vd", dz_NxC, h_NxD, preferred_element_type=jnp.float32)
        else:
            dh_NxD = dh_NxD + jnp.einsum("nv,dv->nd", dz_NxC, wc, preferred_element_type=jnp.float32)
            dwc = jnp.einsum("nv,nd->dv", dz_NxC, h_NxD, preferred_element_type=jnp.float32)
        # Shared columns of the last chunk got dz = 0 above, so adding the slice back is exact.
        axis = 0 if vocab_major else 1
        dw = jax.lax.dynamic_update_slice_in_dim(dw, _slice_w(dw, start, C, vocab_major) + dwc, start, axis)
        return (dh_NxD, dw, dscale_NxK + g_lse_NxK * jnp.stack(ez_parts, -1)), None

    init = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32),
            jnp.zeros(scales_NxK.shape, jnp.float32))
    (dh_NxD, dw, dscale_NxK), _ = jax.lax.scan(body, init, jnp.arange(M))
    return dh_NxD.astype(h_NxD.dtype), dw.astype(w.dtype), None, dscale_NxK.astype(scales_NxK.dtype)


_stats.defvjp(_stats_fwd, _stats_bwd)


def chunked_logit_stats(h_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, scales_BxTxK: jax.Array, *,
                        vocab_major: bool, chunk: int = DEFAULT_CHUNK):
    """The picked logit z_y [B, T] and K scaled log-sum-exps lse_v(s_k z_v) [B, T, K], z = h W.

    Everything the AVRIL terms need from Q = w_t * log_softmax(alpha z) is a per-position function of
    these (see `ava_jax.models.tqr.TQR.q_summary`). Differentiable w.r.t. h, w and the scales (the
    scales carry the reward-weighting w_t); float32 outputs; no [B, T, V] array.
    """
    B, T, D = h_BxTxD.shape
    K = scales_BxTxK.shape[-1]
    picked_N, lse_NxK = _stats(h_BxTxD.reshape(B * T, D), w, targets_BxT.reshape(B * T).astype(jnp.int32),
                               scales_BxTxK.reshape(B * T, K).astype(jnp.float32), int(chunk), bool(vocab_major))
    return picked_N.reshape(B, T), lse_NxK.reshape(B, T, K)


def chunked_token_logprobs(h_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, *,
                           vocab_major: bool, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """log softmax(h W)[target] per position, float32 [B, T], without materialising [B, T, V].

    Args:
      h_BxTxD: hidden states (after the final norm), in the compute dtype.
      w: the output matrix, [V, D] when `vocab_major` (tied embeddings) or [D, V] (an untied head).
      targets_BxT: int32 token ids in [0, V).
      chunk: vocabulary columns per chunk.
    """
    ones_BxTx1 = jnp.ones(h_BxTxD.shape[:2] + (1,), jnp.float32)
    picked_BxT, lse_BxTx1 = chunked_logit_stats(h_BxTxD, w, targets_BxT, ones_BxTx1, vocab_major=vocab_major,
                                                chunk=chunk)
    return picked_BxT - lse_BxTx1[..., 0]


def _position_chunks(T: int, V: int, chunk: int):
    """(positions per chunk Tc, number of chunks M): ceil(V / chunk) chunks, so each chunk's
    [B Tc, V] logits hold about B T chunk elements, as many as `_stats`' [N, chunk] pieces; the last
    M Tc - T positions are padding."""
    M = max(1, min(-(-V // min(chunk, V)), T))
    return -(-T // M), M


def _nll_chunks(h_BxTxD, w, targets_BxT, weights_BxT, chunk, vocab_major, grads: bool):
    """sum of weights * (lse - z_y), chunked over positions; with `grads`, also d/dh and d/dw of it."""
    B, T, D = h_BxTxD.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    Tc, M = _position_chunks(T, V, chunk)
    pad = M * Tc - T  # padded positions get weight 0: no loss, no gradient

    def chunks(x):  # [B, T, ...] -> [M, B Tc, ...]: batch-major rows, so data-parallel sharding carries over
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, M, Tc) + x.shape[2:]), 1, 0).reshape((M, B * Tc) + x.shape[2:])

    # Rows flattened: plain [rows, D] x [D, V] products (a [B, Tc] pair of free axes costs XLA:CPU layout
    # copies of each [B, Tc, V] chunk, and the SmolLM2-shape head lost its gain to them).
    z_spec, dh_spec, dw_spec = (("nd,vd->nv", "nv,vd->nd", "nv,nd->vd") if vocab_major
                                else ("nd,dv->nv", "nv,dv->nd", "nv,nd->dv"))

    def body(dw, xs):
        h, y, wt = xs
        z = jnp.einsum(z_spec, h, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(z, axis=-1)
        hit = jnp.arange(V) == y[..., None]
        nll = jnp.sum(wt * (lse - jnp.sum(jnp.where(hit, z, 0.0), axis=-1)))
        if not grads:
            return dw, (nll, None)
        dz = (wt[..., None] * (jnp.exp(z - lse[..., None]) - hit)).astype(h.dtype)
        dh = jnp.einsum(dh_spec, dz, w, preferred_element_type=jnp.float32)
        return dw + jnp.einsum(dw_spec, dz, h, preferred_element_type=jnp.float32), (nll, dh)

    xs = (chunks(h_BxTxD), chunks(targets_BxT), chunks(weights_BxT))
    dw, (nll_M, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32) if grads else None, xs)
    if not grads:
        return jnp.sum(nll_M)
    dh_BxTxD = jnp.moveaxis(dh.reshape(M, B, Tc, D), 0, 1).reshape(B, M * Tc, D)[:, :T]
    return jnp.sum(nll_M), dh_BxTxD.astype(h_BxTxD.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_nll(h_BxTxD, w, targets_BxT, weights_BxT, chunk, vocab_major):
    return _nll_chunks(h_BxTxD, w, targets_BxT, weights_BxT, chunk, vocab_major, grads=False)


def _weighted_nll_fwd(h_BxTxD, w, targets_BxT, weights_BxT, chunk, vocab_major):
    nll, dh, dw = _nll_chunks(h_BxTxD, w, targets_BxT, weights_BxT, chunk, vocab_major, grads=True)
    return nll, (dh, dw)  # the gradients of the sum, kept in the inputs' dtypes until the cotangent comes


def _weighted_nll_bwd(chunk, vocab_major, res, g):
    dh, dw = res
    scale = lambda x: (g.astype(jnp.float32) * x.astype(jnp.float32)).astype(x.dtype)
    return scale(dh), scale(dw), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def chunked_weighted_nll(h_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array, *,
                         vocab_major: bool, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """sum_{b,t} weights[b, t] * -log softmax(h W)[b, t, targets[b, t]], a float32 scalar, without
    materialising [B, T, V] and without `chunked_token_logprobs`' recompute.

    The weights are constants: they get no gradient (pass the loss mask divided by its count, or
    the mask, and divide afterwards). Gradients w.r.t. h and w are formed in the forward pass, so
    differentiating this costs one h W product less than differentiating the token log-probs;
    evaluating it without a gradient costs the one forward product. Chunks are ranges of positions
    over the whole vocabulary, their [B, Tc] rows flattened batch-major (so data-parallel sharding
    of the batch carries over), sized to hold about as many logits as `chunked_token_logprobs`'.

    Args:
      h_BxTxD: hidden states (after the final norm), in the compute dtype.
      w: the output matrix, [V, D] when `vocab_major` (tied embeddings) or [D, V] (an untied head).
      targets_BxT: int32 token ids in [0, V).
      weights_BxT: per-position weights (0 where a position is not a target).
      chunk: the logits per chunk are about B * T * chunk.
    """
    weights = jax.lax.stop_gradient(weights_BxT).astype(jnp.float32)
    return _weighted_nll(h_BxTxD, w, targets_BxT.astype(jnp.int32), weights, int(chunk), bool(vocab_major))
