"""Attention kernels: XLA's `dot_product_attention`, cuDNN's fused attention on NVIDIA GPUs, and a
causal query-blocked path for CPUs.

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

`model.attention="cpu_kernel"` (and "auto" on CPU at head dim 8, where it builds) runs the same
forward and backward as a compiled kernel (`ava_jax.kernels.cpu_attention`): same layout, residuals
and custom VJP, each pass one custom call instead of a few dozen XLA ops per query block.

On a GPU, `jax.nn.dot_product_attention` runs XLA's attention (materialised [B, N, T, S] scores)
unless it is asked for cuDNN explicitly: its default implementation is XLA, and XLA no longer
rewrites attention into cuDNN's fused kernel by itself. `cudnn_causal_attention` asks for it. cuDNN
takes padding as per-row lengths, real tokens first, so a right-padded batch (or one without
padding) runs the fused kernel, and a batch with any other padding (left-padded prompts, holes)
runs XLA's masked attention, chosen per batch on the device by `lax.cond`.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import backend as jax_backend

from ava_jax.errors import ConfigError
from ava_jax.kernels import cpu_attention
from ava_jax.models.config import ATTENTION_IMPLS, ModelConfig

log = logging.getLogger(__name__)

_NEG = -1e30  # finite, so a fully masked row (never produced here) could not give NaN

# Names of the residuals a rematerialised block keeps (`models.transformer._run_blocks_remat`): the
# kernel's inputs (heads-major q, k, v), its output and its rows' log-sum-exp, so the backward pass
# recomputes neither the q/k/v projections, RoPE and layout changes nor the kernel's forward. Per
# layer that is q and the output ([B, T, N, H] each), k and v ([B, T, K, H]) and [B, N, T].
REMAT_SAVED = tuple(f"blocked_attention_{x}" for x in ("q", "k", "v", "out", "lse"))


# Head dims at which "auto" takes the compiled CPU kernel: where it measured faster than the XLA
# blocked kernel (`python bench/attention_cpu.py`: one layer, 8 x 256, forward + backward, 2 cores:
# head dim 8 11.7 -> 4.1 ms, and faster with grouped-query heads and at 4 x 1024 too). At 16 and 32
# it did not win everywhere (grouped heads at 16, the forward at 32), and at 64 (GPT-2 small,
# SmolLM2) XLA's products were 1.2-2x faster (docs/performance.md, ninth pass).
CPU_KERNEL_AUTO_HEAD_DIMS = (8,)


def block_size(T: int) -> int:
    """Query rows per block: 32 keeps a block's scores in L2, at most 16 blocks bound compile time."""
    return max(32, math.ceil(T / 16))


def cudnn_available() -> bool:
    """True when this process computes on an NVIDIA GPU (cuDNN ships with JAX's CUDA plugin)."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in jax_backend.get_backend().platform_version.lower()


def resolve(cfg: ModelConfig, cached: bool) -> str:
    """The implementation actually used for `cfg.attention`.

    "auto" is the compiled kernel on CPU ("cpu_kernel": where it builds and the head dim is in
    `CPU_KERNEL_AUTO_HEAD_DIMS`; the XLA query-blocked kernel "blocked" otherwise), cuDNN's fused
    attention on an NVIDIA GPU when the dtype and head dim fit it (`ModelConfig.cudnn_fits`), XLA
    otherwise. Attending over a KV cache's earlier slots (`cached=True`) is always XLA's ops ("xla":
    `cached_attention`, with the [B, T, S] mask of `attention_mask`); a prompt's prefill into an empty
    cache has no earlier slots and takes the uncached choice (`models.transformer.KVCache.empty`).
    """
    impl = cfg.attention
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r}; expected one of {ATTENTION_IMPLS}")
    if cached:
        return "xla"
    if impl == "auto":
        if jax.default_backend() == "cpu":
            kernel = cfg.head_dim in CPU_KERNEL_AUTO_HEAD_DIMS and _cpu_kernel_builds()
            return "cpu_kernel" if kernel else "blocked"
        return "cudnn" if cfg.cudnn_fits() and cudnn_available() else "xla"
    if impl == "cudnn" and not cudnn_available():
        raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU; this process computes on "
                          f"{jax.default_backend()}. Use model.attention='auto'.")
    if impl == "cpu_kernel":
        if jax.default_backend() != "cpu":
            raise ConfigError(f"model.attention='cpu_kernel' runs on the CPU backend; this process computes on "
                              f"{jax.default_backend()}. Use model.attention='auto'.")
        reason = cpu_attention.unavailable_reason()
        if reason is not None:
            raise ConfigError(f"model.attention='cpu_kernel': the kernel is unavailable ({reason}). "
                              f"Use model.attention='blocked' (the same attention in XLA's ops).")
    return impl


@functools.cache
def _cpu_kernel_builds() -> bool:
    reason = cpu_attention.unavailable_reason()
    if reason is not None:
        log.warning("model.attention='auto' takes XLA's blocked attention on CPU: the compiled kernel is "
                    "unavailable (%s)", reason)
    return reason is None


def attention_mask(key_valid_BxS, query_slot_T=None, key_slot_S=None):
    """[B, T, S] boolean for XLA's attention: causal over slots, and key real or the query itself.

    A padding query still sees itself, so no softmax row is empty (its output is never used).
    Without slots, queries and keys are the same T positions (self-attention without a KV cache).
    """
    if query_slot_T is None:
        query_slot_T = key_slot_S = jnp.arange(key_valid_BxS.shape[1])
    causal_TxS = key_slot_S[None, :] <= query_slot_T[:, None]
    own_TxS = key_slot_S[None, :] == query_slot_T[:, None]
    return causal_TxS[None] & (key_valid_BxS[:, None, :] | own_TxS[None])


def cached_attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale: float):
    """T new queries attending over a KV cache's S slots (`models.transformer.KVCache`).

    Args:
      q_BxTxNxH: the new tokens' queries (K divides N: grouped-query heads share a key/value head).
      k_BxKxSxH, v_BxKxSxH: the cache's keys and values, heads-major, the new tokens' slots written.
      mask_BxTxS: which slots each query attends to (`attention_mask` over slots).
      scale: multiplier of q.k.

    The values are those of `jax.nn.dot_product_attention`'s XLA implementation: scores accumulated
    in float32 and scaled, masked, a float32 softmax, probabilities cast to the values' dtype. The
    layout is the point: with the cache stored [B, S, K, H] (what `dot_product_attention` takes),
    XLA:CPU copied every layer's whole keys and values into [B, K, H, S] at every decoded token to
    feed its products, the largest cost of sampling the TinyStories model at batch 512
    (docs/performance.md, thirteenth pass); heads-major, the products read the cache where it lies.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxKxSxH.shape[1]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bksh->bkgts", q_BxTxKxGxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    s = jnp.where(mask_BxTxS[:, None, None], s * jnp.float32(scale), _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v_BxKxSxH.dtype)
    # Output [B, K, G, T, H], then moved: asking the product for [B, T, K, G, H] directly made XLA:CPU
    # emit it as a slow transposed product instead of its matmul library's.
    o = jnp.einsum("bkgts,bksh->bkgth", p, v_BxKxSxH)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def cudnn_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, key_valid_BxT, scale: float,
                           implementation: str = "cudnn"):
    """Causal self-attention through cuDNN's fused (flash) kernel where the padding allows it.

    Args:
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH: half-precision queries, keys and values (K divides N).
      key_valid_BxT: True for real tokens.
      scale: multiplier of q.k.
      implementation: `jax.nn.dot_product_attention`'s implementation for the fused branch; tests
        pass "xla", which honours the same causal flag and sequence lengths, to check this function's
        logic on a machine without cuDNN.

    A batch whose every row is right-padded (real tokens first) takes the fused branch: causal, with
    each row's keys cut at its length, and all queries kept (a padding query attends to the row's
    real tokens; its output is never used, and a row without real tokens attends to its first key,
    so no row is empty and nothing is NaN). Any other batch takes XLA's masked attention over
    `attention_mask`. Real queries get the same attention either way. The masked branch is
    checkpointed: under autodiff `lax.cond` returns the residuals of both branches, so without it a
    batch on the fused branch would still carry zero-filled [B, N, T, T] probabilities.
    """
    B, T = key_valid_BxT.shape
    lengths_B = key_valid_BxT.sum(axis=1, dtype=jnp.int32)
    right_padded = jnp.all(key_valid_BxT == (jnp.arange(T)[None, :] < lengths_B[:, None]))

    def fused(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=jnp.full((B,), T, jnp.int32),
            key_value_seq_lengths=jnp.maximum(lengths_B, 1), implementation=implementation)

    @jax.checkpoint
    def masked(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(key_valid_BxT)[:, None], scale=scale)

    return jax.lax.cond(right_padded, fused, masked, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


def blocked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, key_valid_BxT, scale: float,
                             block_q: int | None = None, compiled: bool = False):
    """Causal self-attention with padding, computed one block of query rows at a time.

    Args:
      q_BxTxNxH: queries. k_BxTxKxH, v_BxTxKxH: keys and values (K divides N: grouped-query heads
        share a key/value head without being repeated).
      key_valid_BxT: True for real tokens. A padding query still attends to itself, as in the
        backbone's full mask, so no softmax row is empty.
      scale: multiplier of q.k.
      block_q: query rows per block (default `block_size(T)`) of XLA's ops.
      compiled: run the forward and backward as the compiled CPU kernel (`kernels.cpu_attention`,
        which takes R = 4 rows at a time and ignores block_q) instead of XLA's ops.

    Returns:
      [B, T, N, H] in the dtype of q; scores, softmax and products in float32.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    f32 = jnp.float32
    # Heads-major: a key/value head's G query heads stack their rows (g, t) over the same keys.
    q_BxKxGxTxH = (q_BxTxNxH.astype(f32) * scale).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    q_BxKxGxTxH = checkpoint_name(q_BxKxGxTxH, REMAT_SAVED[0])
    k_BxKxSxH = checkpoint_name(k_BxTxKxH.astype(f32).transpose(0, 2, 1, 3), REMAT_SAVED[1])
    v_BxKxSxH = checkpoint_name(v_BxTxKxH.astype(f32).transpose(0, 2, 1, 3), REMAT_SAVED[2])
    o_BxKxGxTxH = _attention(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, key_valid_BxT, block_q or block_size(T), compiled)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, key_valid_BxT, bq: int, compiled: bool):
    """q [B, K, G, T, H] (already scaled), k and v [B, K, S, H] -> [B, K, G, T, H]."""
    return _attention_fwd(q, k, v, key_valid_BxT, bq, compiled)[0]


def _attention_fwd(q, k, v, key_valid_BxT, bq, compiled):
    o, lse = (cpu_attention.forward if compiled else functools.partial(_forward, bq=bq))(q, k, v, key_valid_BxT)
    o, lse = checkpoint_name(o, REMAT_SAVED[3]), checkpoint_name(lse, REMAT_SAVED[4])
    return o, (q, k, v, key_valid_BxT, o, lse)


def _attention_bwd(bq, compiled, residuals, do):
    """p = exp(s - lse) recomputed per block; ds = p (dp - rowsum(do o)); dq, dk, dv from ds and p.

    dk and dv are accumulated transposed, as [B, K, H, S] = q^T ds and do^T p: contracted over the
    block's (g, q) rows, ds^T q would have XLA:CPU write each [GQ, S] block of ds and p transposed
    (a strided copy of the block's largest arrays) where q^T only transposes a [GQ, H] slab.
    """
    q, k, v, key_valid_BxT, o, lse = residuals
    if compiled:
        return (*cpu_attention.backward(q, k, v, key_valid_BxT, o, lse, do), None)
    B, K, _, T, H = q.shape
    delta = jnp.sum(do * o, axis=-1, keepdims=True)
    dqs = []
    dk_BxKxHxS = jnp.zeros((B, K, H, k.shape[2]), k.dtype)
    dv_BxKxHxS = jnp.zeros((B, K, H, v.shape[2]), v.dtype)
    for start, end in _blocks(T, bq):
        q_blk, do_blk = q[:, :, :, start:end], do[:, :, :, start:end]
        p = jnp.exp(_scores(q_blk, k, start, end, key_valid_BxT) - lse[:, :, :, start:end])
        dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v[:, :, :end])
        ds = p * (dp - delta[:, :, :, start:end])
        dqs.append(jnp.einsum("bkgqs,bksh->bkgqh", ds, k[:, :, :end]))
        dk_BxKxHxS = dk_BxKxHxS.at[..., :end].add(jnp.einsum("bkgqh,bkgqs->bkhs", q_blk, ds))
        dv_BxKxHxS = dv_BxKxHxS.at[..., :end].add(jnp.einsum("bkgqh,bkgqs->bkhs", do_blk, p))
    dk, dv = dk_BxKxHxS.transpose(0, 1, 3, 2), dv_BxKxHxS.transpose(0, 1, 3, 2)
    return jnp.concatenate(dqs, axis=3), dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
