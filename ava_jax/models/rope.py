"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama/Qwen2).

llama2.c checkpoints store Q/K rows with interleaved pairs; the llama2.c importer permutes them into
this layout once at load time, so there is a single RoPE implementation here.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ava_jax.models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, max_seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, for every supported `rope_type`.

    Computed in float64 NumPy at trace time (they are constants), following the formulas of the
    Llama 3 and YaRN papers as transformers implements them, so imported checkpoints match exactly.
    """
    base, dim = rope.theta, head_dim
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        factor = rope.factor
        orig = rope.original_max_position_embeddings or max_seq_len

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = rope.attention_factor
        if attn_factor is None:
            if rope.mscale and rope.mscale_all_dim:
                attn_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
            else:
                attn_factor = mscale(factor)

        def correction_dim(n_rot):
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        return (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate, float(attn_factor)
    raise ValueError(f"rope_type={rope.rope_type!r} is not supported")


def apply_rope(x_BxTxNxH: jnp.ndarray, pos_BxT: jnp.ndarray, inv_freq, scale: float) -> jnp.ndarray:
    """Rotates query or key vectors by their positions (rotate-half convention).

    out = x cos + rotate_half(x) sin, with rotate_half(x) = (-x2, x1) for the halves x1, x2 of the
    head dimension. The halves are an axis of size 2 ([..., 2, H/2]), so rotate_half is a reversal
    of that axis and a sign, not a concatenation of slices: its backward is the same reversal, where
    a concatenation's is pads and slices that XLA:CPU computes slowly and once per consumer (the
    TinyStories train step: 4% faster, docs/performance.md, twelfth pass). cos and sin are taken at
    the H/2 frequencies and broadcast over both halves.
    """
    f32 = jnp.float32
    freqs_BxTxF = pos_BxT[..., None].astype(f32) * jnp.asarray(inv_freq, f32)
    cos = (jnp.cos(freqs_BxTxF) * scale)[:, :, None, None, :]  # [B, T, 1, 1, H/2]
    sin = (jnp.sin(freqs_BxTxF) * scale)[:, :, None, None, :]
    *lead, H = x_BxTxNxH.shape
    x_BxTxNx2xF = x_BxTxNxH.astype(f32).reshape(*lead, 2, H // 2)
    rotated = x_BxTxNx2xF[..., ::-1, :] * jnp.asarray([[-1.0], [1.0]], f32)  # (-x2, x1)
    return (x_BxTxNx2xF * cos + rotated * sin).reshape(*lead, H).astype(x_BxTxNxH.dtype)
