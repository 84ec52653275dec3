"""Token log-probabilities from hidden states, computed in vocabulary chunks (no [B, T, V] tensor).

log p(y | h) = z_y - logsumexp_v z_v with z = h W. The forward walks the vocabulary in chunks of
`chunk` columns, keeping a running log-sum-exp and the picked logit; the backward (a custom VJP)
recomputes each chunk's logits, forms softmax(z) - onehot(y) for that chunk only, and accumulates
dh and the chunk's rows of dW. Peak memory is O(N * chunk) instead of O(N * V) for the logits, their
log-softmax and its gradient; the price is one extra h W product in the backward (the recompute).

Used by the LM losses (SFT, DPO log-probs, the AVA LM-likelihood metric) through
`Transformer.token_logprobs`. The chunks are static slices of W (an unrolled loop over at most
ceil(V / chunk) pieces), so there is no padding copy of the vocabulary matrix.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 8192


def _chunks(V: int, chunk: int):
    return [(s, min(s + chunk, V)) for s in range(0, V, chunk)]


def _chunk_logits(h_NxD, w, start, end, vocab_major):
    wc = w[start:end] if vocab_major else w[:, start:end]
    spec = "nd,vd->nv" if vocab_major else "nd,dv->nv"
    return jnp.einsum(spec, h_NxD, wc.astype(h_NxD.dtype), preferred_element_type=jnp.float32)


def _forward(h_NxD, w, targets_N, chunk, vocab_major):
    V = w.shape[0] if vocab_major else w.shape[1]
    N = h_NxD.shape[0]
    lse_N = jnp.full((N,), -jnp.inf, jnp.float32)
    picked_N = jnp.zeros((N,), jnp.float32)
    for start, end in _chunks(V, chunk):
        z_NxC = _chunk_logits(h_NxD, w, start, end, vocab_major)
        lse_N = jnp.logaddexp(lse_N, jax.nn.logsumexp(z_NxC, axis=-1))
        local_N = targets_N - start
        inside_N = (local_N >= 0) & (local_N < end - start)
        got_N = jnp.take_along_axis(z_NxC, jnp.clip(local_N, 0, end - start - 1)[:, None], axis=-1)[:, 0]
        picked_N = picked_N + jnp.where(inside_N, got_N, 0.0)
    return picked_N - lse_N, lse_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs(h_NxD, w, targets_N, chunk, vocab_major):
    return _forward(h_NxD, w, targets_N, chunk, vocab_major)[0]


def _logprobs_fwd(h_NxD, w, targets_N, chunk, vocab_major):
    logp_N, lse_N = _forward(h_NxD, w, targets_N, chunk, vocab_major)
    return logp_N, (h_NxD, w, targets_N, lse_N)


def _logprobs_bwd(chunk, vocab_major, res, g_N):
    h_NxD, w, targets_N, lse_N = res
    V = w.shape[0] if vocab_major else w.shape[1]
    g_N = g_N.astype(jnp.float32)
    dh_NxD = jnp.zeros(h_NxD.shape, jnp.float32)
    dw_parts = []
    for start, end in _chunks(V, chunk):
        z_NxC = _chunk_logits(h_NxD, w, start, end, vocab_major)
        onehot_NxC = (targets_N[:, None] - start) == jnp.arange(end - start)[None, :]
        # d logp / d z = onehot - softmax(z), times the incoming cotangent.
        dz_NxC = g_N[:, None] * (onehot_NxC.astype(jnp.float32) - jnp.exp(z_NxC - lse_N[:, None]))
        dz_NxC = dz_NxC.astype(h_NxD.dtype)
        wc = (w[start:end] if vocab_major else w[:, start:end]).astype(h_NxD.dtype)
        if vocab_major:
            dh_NxD = dh_NxD + jnp.einsum("nv,vd->nd", dz_NxC, wc, preferred_element_type=jnp.float32)
            dw_parts.append(jnp.einsum("nv,nd->vd", dz_NxC, h_NxD, preferred_element_type=jnp.float32))
        else:
            dh_NxD = dh_NxD + jnp.einsum("nv,dv->nd", dz_NxC, wc, preferred_element_type=jnp.float32)
            dw_parts.append(jnp.einsum("nv,nd->dv", dz_NxC, h_NxD, preferred_element_type=jnp.float32))
    dw = jnp.concatenate(dw_parts, axis=0 if vocab_major else 1) if len(dw_parts) > 1 else dw_parts[0]
    return dh_NxD.astype(h_NxD.dtype), dw.astype(w.dtype), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def chunked_token_logprobs(h_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, *,
                           vocab_major: bool, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """log softmax(h W)[target] per position, float32 [B, T], without materialising [B, T, V].

    Args:
      h_BxTxD: hidden states (after the final norm), in the compute dtype.
      w: the output matrix, [V, D] when `vocab_major` (tied embeddings) or [D, V] (an untied head).
      targets_BxT: int32 token ids in [0, V).
      chunk: vocabulary columns per chunk.
    """
    B, T, D = h_BxTxD.shape
    logp_N = _logprobs(h_BxTxD.reshape(B * T, D), w, targets_BxT.reshape(B * T).astype(jnp.int32),
                       int(chunk), bool(vocab_major))
    return logp_N.reshape(B, T)
