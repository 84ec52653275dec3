"""Attention kernels: XLA's fused `dot_product_attention` and a causal query-blocked path for CPUs.

`jax.nn.dot_product_attention` on the CPU backend materialises the full [B, N, T, S] score tensor
and runs softmax over it in several memory passes; for small head dims (TinyStories-260K has
head_dim 8) that is memory-bound and costs 80% of the forward (see docs/performance.md). The
blocked path splits the queries into blocks of `block_q` rows; block i only reads keys up to its
last row (causal block skipping, about half of the score tensor), so each block's scores stay in
cache and the masked upper triangle is never computed. Each block takes an exact softmax over its
keys: there is no online rescaling, so its value equals the unblocked computation to float32
rounding.

Its gradient is flash attention's backward (Dao et al. 2022), written as a custom VJP: the forward
keeps only the output and each row's log-sum-exp, and the backward recomputes a block's
probabilities from them, so no [Q, S] probabilities are saved between the passes and the backward
is four products and one elementwise pass per block instead of autodiff's slices, pads and
softmax transposes. q, k and v are laid out heads-major once per layer, so every block's products
read contiguous slabs.

The blocked path assumes what the backbone guarantees without a KV cache: query t and key t are
the same slot, and the mask is causal & (key is real | key is the query itself).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ava_jax.models.config import ATTENTION_IMPLS

_NEG = -1e30  # finite, so a fully masked row (never produced here) could not give NaN


def block_size(T: int) -> int:
    """Query rows per block: 32 keeps a block's scores in L2, at most 16 blocks bound compile time."""
    return max(32, math.ceil(T / 16))


def resolve(impl: str, cached: bool) -> str:
    """The implementation actually used: "auto" is blocked on CPU without a cache, XLA otherwise."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r}; expected one of {ATTENTION_IMPLS}")
    if cached:
        return "xla"
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "xla"
    return impl


def blocked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, key_valid_BxT, scale: float,
                             block_q: int | None = None):
    """Causal self-attention with padding, computed one block of query rows at a time.

    Args:
      q_BxTxNxH: queries. k_BxTxKxH, v_BxTxKxH: keys and values (K divides N: grouped-query heads
        share a key/value head without being repeated).
      key_valid_BxT: True for real tokens. A padding query still attends to itself, as in the
        backbone's full mask, so no softmax row is empty.
      scale: multiplier of q.k.
      block_q: query rows per block (default `block_size(T)`).

    Returns:
      [B, T, N, H] in the dtype of q; scores, softmax and products in float32.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    f32 = jnp.float32
    # Heads-major: a key/value head's G query heads stack their rows (g, t) over the same keys.
    q_BxKxGxTxH = (q_BxTxNxH.astype(f32) * scale).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BxKxSxH = k_BxTxKxH.astype(f32).transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxTxKxH.astype(f32).transpose(0, 2, 1, 3)
    o_BxKxGxTxH = _attention(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxT, block_q or block_size(T))
    return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BxTxNxH.dtype)


def _blocks(T: int, bq: int) -> list[tuple[int, int]]:
    return [(start, min(start + bq, T)) for start in range(0, T, bq)]


def _scores(q_BxKxGxQxH, k_BxKxSxH, start: int, end: int, key_valid_BxT):
    """Masked scores of query rows [start, end) over keys [0, end): [B, K, G, Q, end]."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_BxKxGxQxH, k_BxKxSxH[:, :, :end])
    row_Qx1 = jnp.arange(start, end)[:, None]
    col_1xS = jnp.arange(end)[None, :]
    keep_BxQxS = (col_1xS <= row_Qx1)[None] & (key_valid_BxT[:, None, :end] | (col_1xS == row_Qx1)[None])
    return jnp.where(keep_BxQxS[:, None, None], s, _NEG)


def _forward(q, k, v, key_valid_BxT, bq: int):
    """(output [B, K, G, T, H], log-sum-exp of each row's scores [B, K, G, T, 1])."""
    outs, lses = [], []
    for start, end in _blocks(q.shape[3], bq):
        s = _scores(q[:, :, :, start:end], k, start, end, key_valid_BxT)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", p, v[:, :, :end]) / l)
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_valid_BxT, bq: int):
    """q [B, K, G, T, H] (already scaled), k and v [B, K, S, H] -> [B, K, G, T, H]."""
    return _forward(q, k, v, key_valid_BxT, bq)[0]


def _attention_fwd(q, k, v, key_valid_BxT, bq):
    o, lse = _forward(q, k, v, key_valid_BxT, bq)
    return o, (q, k, v, key_valid_BxT, o, lse)


def _attention_bwd(bq, residuals, do):
    """p = exp(s - lse) recomputed per block; ds = p (dp - rowsum(do o)); dq, dk, dv from ds and p."""
    q, k, v, key_valid_BxT, o, lse = residuals
    delta = jnp.sum(do * o, axis=-1, keepdims=True)
    dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for start, end in _blocks(q.shape[3], bq):
        q_blk, do_blk = q[:, :, :, start:end], do[:, :, :, start:end]
        p = jnp.exp(_scores(q_blk, k, start, end, key_valid_BxT) - lse[:, :, :, start:end])
        dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v[:, :, :end])
        ds = p * (dp - delta[:, :, :, start:end])
        dqs.append(jnp.einsum("bkgqs,bksh->bkgqh", ds, k[:, :, :end]))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgqs,bkgqh->bksh", ds, q_blk))
        dv = dv.at[:, :, :end].add(jnp.einsum("bkgqs,bkgqh->bksh", p, do_blk))
    return jnp.concatenate(dqs, axis=3), dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
