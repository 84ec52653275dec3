"""Jitted sampling with a KV cache: greedy, temperature, top-k, top-p; batches of ragged prompts.

Prompts are left-padded into a bucket of `prompt_bucket` tokens and the number of new tokens is
rounded up to `new_bucket`, so a run compiles once per (batch, bucket) shape, not once per prompt.
The decode loop is a `lax.while_loop` that stops as soon as every row has produced EOS.
This is what PPO rollouts, Best-of-N and win-rate evaluation call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.models.transformer import KVCache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    eos_id: int | None = None
    pad_id: int = 0
    prompt_bucket: int = 32
    new_bucket: int = 16
    # Token ids never sampled: their logits are set to -inf before temperature, top-k and top-p, so
    # `logprobs` are those of the renormalised policy actually sampled. E.g. (bos_id, eos_id) for
    # fixed-length responses with no early end.
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.banned_ids, tuple) or any(not isinstance(i, int) or i < 0 for i in self.banned_ids):
            raise ValueError(f"sampling.banned_ids must be a tuple of non-negative ints, got {self.banned_ids!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: temperature={self.temperature}, "
                             f"top_k={self.top_k}, top_p={self.top_p}")


@flax.struct.dataclass
class Generation:
    tokens: jax.Array  # [B, N] new tokens (pad after EOS)
    logprobs: jax.Array  # [B, N] log-prob under the temperature-scaled policy (T=1 when greedy), 0 on pad
    mask: jax.Array  # [B, N] 1 for generated tokens, EOS included
    prompt_tokens: jax.Array  # [B, P] left-padded prompts
    prompt_mask: jax.Array  # [B, P]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int):
    """Left-pads token lists to a common bucketed length. Returns (tokens [B,P], mask [B,P]) in NumPy."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    P = _round_up(max(len(p) for p in prompts), bucket)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return tokens, mask


def _filter_logits(logits_BxV, top_k: int, top_p: float):
    """Masks logits outside the top-k set and outside the top-p nucleus (the first token always stays)."""
    if top_k:
        kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token while the mass strictly before it is below top_p.
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
    return logits_BxV


def argmax_last(x_BxV):
    """`jnp.argmax(x, axis=-1)`, the same index (the first maximum; the first NaN where a row has one)
    as two vectorised reductions, a maximum and a minimum over the maxima's positions. XLA:CPU emits
    argmax as one reduction over (value, index) pairs that it does not vectorise: over [512, 512]
    logits (the TinyStories model sampled at batch 512) `jax.random.categorical` took 3.3 ms and
    `categorical` below 1.4 ms (docs/performance.md, thirteenth pass)."""
    nan_BxV = jnp.isnan(x_BxV)
    max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    hit_BxV = jnp.where(jnp.any(nan_BxV, axis=-1, keepdims=True), nan_BxV, x_BxV == max_Bx1)
    iota_BxV = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
    return jnp.min(jnp.where(hit_BxV, iota_BxV, x_BxV.shape[-1]), axis=-1)


def categorical(key, logits_BxV):
    """`jax.random.categorical(key, logits, axis=-1)`, the same draw (the Gumbel-max trick with the
    same noise), with `argmax_last` for its argmax."""
    return argmax_last(jax.random.gumbel(key, logits_BxV.shape, logits_BxV.dtype) + logits_BxV)


def _next_token(logits_BxV, key, cfg: SamplingConfig):
    if cfg.banned_ids:
        logits_BxV = logits_BxV.at[:, jnp.asarray(cfg.banned_ids)].set(-jnp.inf)
    if cfg.temperature == 0:
        token_B = argmax_last(logits_BxV)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled_BxV = logits_BxV / cfg.temperature
        logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
        token_B = categorical(key, _filter_logits(scaled_BxV, cfg.top_k, cfg.top_p))
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B


# XLA's default options, not xla.jit's: the decode loop runs many steps per compile, and -O2 measured
# 2-8% slower here (docs/performance.md, eighth pass; `python bench/compile.py`).
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "n_new"))
def _generate(graphdef, state, tokens_BxP, mask_BxP, key, *, cfg: SamplingConfig, n_new: int):
    model: Transformer = nnx.merge(graphdef, state)
    B, P = tokens_BxP.shape
    cache = KVCache.init(model.cfg, B, P + n_new)
    # Prompts are left-padded, so every row's last prompt token is in the last column: only its
    # logits are sampled from, so only its LM head is computed.
    out = model(tokens_BxP, mask_BxP, cache=cache, logits=False)
    first_logits_BxV = model.logits(out.hidden[:, -1:])[:, 0]
    eos = -1 if cfg.eos_id is None else cfg.eos_id

    def cond(carry):
        i, _, _, done_B, *_ = carry
        return (i < n_new) & ~jnp.all(done_B)

    def body(carry):
        i, cache, logits_BxV, done_B, tokens_BxN, logp_BxN, mask_BxN = carry
        token_B, logp_B = _next_token(logits_BxV, jax.random.fold_in(key, i), cfg)
        live_B = ~done_B
        token_B = jnp.where(live_B, token_B, cfg.pad_id)
        tokens_BxN = tokens_BxN.at[:, i].set(token_B)
        logp_BxN = logp_BxN.at[:, i].set(jnp.where(live_B, logp_B, 0.0))
        mask_BxN = mask_BxN.at[:, i].set(live_B)
        done_B = done_B | (token_B == eos)
        # Merged at the loop body's trace level: a module is only set up (e.g. LoRA adapters'
        # bookkeeping in models.lora) where it is traced.
        step = nnx.merge(graphdef, state)(token_B[:, None], live_B[:, None], cache=cache)
        return i + 1, step.cache, step.logits[:, -1], done_B, tokens_BxN, logp_BxN, mask_BxN

    init = (jnp.zeros((), jnp.int32), out.cache, first_logits_BxV, jnp.zeros((B,), bool),
            jnp.full((B, n_new), cfg.pad_id, jnp.int32), jnp.zeros((B, n_new), jnp.float32),
            jnp.zeros((B, n_new), bool))
    _, _, _, _, tokens_BxN, logp_BxN, mask_BxN = jax.lax.while_loop(cond, body, init)
    return tokens_BxN, logp_BxN, mask_BxN


def generate(backbone: Transformer, prompts, key: jax.Array, cfg: SamplingConfig) -> Generation:
    """Samples continuations of a batch of prompts.

    Args:
      backbone: the Transformer (e.g. `tqr.backbone`).
      prompts: a list of token-id lists (any lengths), or a (tokens [B,P], mask [B,P]) pair that is
        already left-padded.
      key: PRNG key (unused for greedy decoding).
      cfg: SamplingConfig.

    Returns:
      Generation with `tokens`, `logprobs` and `mask` of shape [B, max_new_tokens].
    """
    if isinstance(prompts, tuple):
        tokens_BxP, mask_BxP = (np.asarray(x) for x in prompts)
        if not np.all(mask_BxP[:, -1]):
            raise ValueError("pre-padded prompts must be left-padded (last column all real tokens)")
    else:
        tokens_BxP, mask_BxP = pad_prompts(prompts, cfg.pad_id, cfg.prompt_bucket)
    n_new = _round_up(cfg.max_new_tokens, cfg.new_bucket)
    if tokens_BxP.shape[1] + n_new > backbone.cfg.max_seq_len and backbone.cfg.rope is None:
        raise ValueError(f"prompt bucket {tokens_BxP.shape[1]} + {n_new} new tokens exceeds the model's "
                         f"{backbone.cfg.max_seq_len} learned positions")
    graphdef, state = nnx.split(backbone)
    tokens_BxN, logp_BxN, mask_BxN = _generate(graphdef, state, jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP),
                                               key, cfg=cfg, n_new=n_new)
    n = cfg.max_new_tokens
    return Generation(tokens_BxN[:, :n], logp_BxN[:, :n], mask_BxN[:, :n], jnp.asarray(tokens_BxP),
                      jnp.asarray(mask_BxP))
