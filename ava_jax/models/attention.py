"""Attention kernels: XLA's fused `dot_product_attention` and a causal query-blocked path for CPUs.

`jax.nn.dot_product_attention` on the CPU backend materialises the full [B, N, T, S] score tensor
and runs softmax over it in several memory passes; for small head dims (TinyStories-260K has
head_dim 8) that is memory-bound and costs 80% of the forward (see docs/performance.md). The
blocked path splits the queries into blocks of `block_q` rows; block i only reads keys up to its
last row (causal block skipping, about half of the score tensor), so each block's scores stay in
cache and the masked upper triangle is never computed. Each block takes an exact softmax over its
keys: there is no online rescaling, so its value and gradient equal the unblocked computation to
float32 rounding.

The blocked path assumes what the backbone guarantees without a KV cache: query t and key t are
the same slot, and the mask is causal & (key is real | key is the query itself).
"""
from __future__ import annotations

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
      [B, T, N, H] in the dtype of q; scores and softmax in float32.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    G = N // K
    bq = block_q or block_size(T)
    outs = []
    for start in range(0, T, bq):
        end = min(start + bq, T)
        q_BxQxKxGxH = q_BxTxNxH[:, start:end].reshape(B, end - start, K, G, H)
        s = jnp.einsum("bqkgh,bskh->bkgqs", q_BxQxKxGxH, k_BxTxKxH[:, :end],
                       preferred_element_type=jnp.float32) * scale
        row_Qx1 = jnp.arange(start, end)[:, None]
        col_1xS = jnp.arange(end)[None, :]
        keep_BxQxS = (col_1xS <= row_Qx1)[None] & (key_valid_BxT[:, None, :end] | (col_1xS == row_Qx1)[None])
        s = jnp.where(keep_BxQxS[:, None, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(v_BxTxKxH.dtype)
        o = jnp.einsum("bkgqs,bskh->bqkgh", p, v_BxTxKxH[:, :end])
        outs.append(o.reshape(B, end - start, N, H))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
