"""Judging policies by their samples: gold reward, KL to the initial policy, win / tie / lose with
paired bootstrap intervals (policy.md "Best-of-N and win rates").

Both systems answer the same prompts with the same sampling seeds; win means gold(a) - gold(b) > tau,
tie |gold(a) - gold(b)| <= tau, with tau fixed in the config before the run.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import fill_rows
from ava_jax.losses.lm import token_logprobs
from ava_jax.sampling import SamplingConfig, generate, pad_prompts


@dataclasses.dataclass(frozen=True)
class Samples:
    """K samples for each of P prompts, rows prompt-major (row = p * K + k)."""

    prompts: list  # [P * K] token lists (each prompt repeated K times)
    responses: list  # [P * K] token lists (EOS included when sampled)
    num_prompts: int
    per_prompt: int


def sample_responses(backbone, prompts, key, cfg: SamplingConfig, per_prompt: int = 1, batch_size: int = 64):
    """`per_prompt` samples of each prompt, in batches of `batch_size` rows (one compiled shape).

    The key of row-batch i is fold_in(key, i), so two policies sampled with one key face the same
    prompts in the same order with the same random streams.
    """
    rows = [list(p) for p in prompts for _ in range(per_prompt)]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        gen = generate(backbone, pad_prompts(padded, cfg.pad_id, cfg.prompt_bucket), jax.random.fold_in(key, i), cfg)
        tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask, bool)
        out += [tokens[j][mask[j]].tolist() for j in range(len(chunk))]
    return Samples(rows, out, len(prompts), per_prompt)


def _layout(prompts, responses, pad_id: int):
    """Right-padded [N, T] tokens and mask of prompt + response, and the prompt lengths."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    tokens, mask = np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, True
    return tokens, mask, np.asarray([len(p) for p in prompts], np.int32)


@functools.cache
def _response_logprob_fn(graphdef, banned_ids: tuple[int, ...]):
    """The jitted per-batch log-prob sum, one per (graph, banned ids): an evaluation during training
    reuses the compiled program instead of tracing a fresh closure."""
    banned = np.asarray(banned_ids, np.int32)

    @xla.jit
    def one(state, tokens, mask, plen):
        logits = nnx.merge(graphdef, state)(tokens, mask).logits.astype(jnp.float32)
        if banned.size:
            logits = logits.at[..., banned].set(-jnp.inf)
        logp = token_logprobs(logits, tokens)
        pos = jnp.arange(tokens.shape[1])[None, 1:]
        counted = mask[:, 1:] & mask[:, :-1] & (pos >= plen[:, None])
        return jnp.sum(jnp.where(counted, logp, 0.0), axis=1)
    return one


def response_logprobs(backbone, prompts, responses, *, pad_id: int, banned_ids=(), batch_size: int = 64):
    """[N] summed log-probs of each response under `backbone`, with `banned_ids` removed from its
    distribution (renormalised, as the sampler draws them), float64 on the host."""
    graphdef, state = nnx.split(backbone)
    one = _response_logprob_fn(graphdef, tuple(int(i) for i in banned_ids))

    tokens, mask, plen = _layout(prompts, responses, pad_id)
    width = -(-tokens.shape[1] // 16) * 16  # one compiled shape per 16 tokens of length
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    out = []
    for i in range(0, len(tokens), batch_size):
        sl = slice(i, i + batch_size)
        n = len(tokens[sl])
        batch = fill_rows((tokens[sl], mask[sl], plen[sl]), batch_size)
        out.append(np.asarray(one(state, *batch))[:n])
    return np.concatenate(out).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class WinRate:
    win: float
    tie: float
    lose: float
    win_ci: tuple[float, float]  # paired bootstrap 95% interval over prompts
    lose_ci: tuple[float, float]
    tau: float
    n: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}win": self.win, f"{prefix}tie": self.tie, f"{prefix}lose": self.lose,
                f"{prefix}win_ci_low": self.win_ci[0], f"{prefix}win_ci_high": self.win_ci[1],
                f"{prefix}lose_ci_low": self.lose_ci[0], f"{prefix}lose_ci_high": self.lose_ci[1]}


def win_rate(gold_a_N, gold_b_N, *, tau: float, groups_N=None, n_boot: int = 2000, seed: int = 0) -> WinRate:
    """Win / tie / lose of system a against system b on paired samples.

    Args:
      gold_a_N, gold_b_N: gold returns of the two systems' answers, paired row by row (same prompt
        and sampling seed).
      tau: the tie threshold (>= 0): |difference| <= tau is a tie.
      groups_N: the prompt of each row; the bootstrap resamples prompts (all their rows together).
        Default: every row its own group.
      n_boot, seed: bootstrap replicates and their seed.
    """
    d = np.asarray(gold_a_N, np.float64) - np.asarray(gold_b_N, np.float64)
    if d.size == 0:
        raise ValueError("win_rate needs at least one paired sample")
    if tau < 0:
        raise ValueError(f"tie threshold tau={tau} must be >= 0")
    groups = np.arange(d.size) if groups_N is None else np.asarray(groups_N)
    win, lose = (d > tau).astype(np.float64), (d < -tau).astype(np.float64)
    uniq, inv = np.unique(groups, return_inverse=True)
    g_win, g_lose = np.bincount(inv, win), np.bincount(inv, lose)
    g_n = np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, uniq.size, (n_boot, uniq.size))
    n_b = g_n[pick].sum(1)
    bw, bl = g_win[pick].sum(1) / n_b, g_lose[pick].sum(1) / n_b
    ci = lambda x: (float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975)))
    return WinRate(float(win.mean()), float(1.0 - win.mean() - lose.mean()), float(lose.mean()), ci(bw), ci(bl),
                   float(tau), int(d.size))
