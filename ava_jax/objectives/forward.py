"""From a TQR model and a batch to the arrays the losses read (shared by every objective).

This is the glue between `models` (which know nothing of losses) and `losses` (pure functions of
arrays): it runs the model on a pair batch and derives masks with `token_positions`. Batches are
the dicts `ava_jax.data` produces: `{"chosen": {"tokens_BxT", "mask_BxT", "prompt_len_B"},
"rejected": {...}}`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses import AvrilInputs, QSummary, gather_last, transition_masks
from ava_jax.losses.lm import token_logprobs
from ava_jax.models.positions import token_positions
from ava_jax.models.tqr import TQROutput


def split_rows(tree, n: int):
    """A pytree of [2B, ...] arrays -> (first B rows, last B rows)."""
    return jax.tree.map(lambda x: x[:n], tree), jax.tree.map(lambda x: x[n:], tree)


def stacked(batch):
    """Chosen and rejected stacked on the batch axis: (tokens [2B, T], mask [2B, T], B)."""
    c, r = batch["chosen"], batch["rejected"]
    tokens = jnp.concatenate([c["tokens_BxT"], r["tokens_BxT"]], axis=0)
    mask = jnp.concatenate([c["mask_BxT"], r["mask_BxT"]], axis=0)
    return tokens, mask, c["tokens_BxT"].shape[0]


def forward_pair(model, batch):
    """One forward over chosen and rejected stacked on the batch axis (one compiled shape, better
    utilisation than two calls). Returns (out_chosen, out_rejected)."""
    tokens, mask, n = stacked(batch)
    return split_rows(model(tokens, mask), n)


def forward_summary(model, tokens_BxT, mask_BxT, beta: float):
    """The model without its [B, T, V] outputs, plus (QSummary, lm_logp_BxN) from `TQR.q_summary`."""
    out = model(tokens_BxT, mask_BxT, vocab=False)
    q_a, beta_lse, lm_logp = model.q_summary(out, tokens_BxT, beta)
    return out, QSummary(q_a, beta_lse), lm_logp


def avril_inputs(out: TQROutput, side, summary: QSummary | None = None) -> AvrilInputs:
    response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    q = out.q_values if summary is None else summary
    return AvrilInputs(q, out.reward_mean, out.reward_sigma, side["tokens_BxT"], response_BxT,
                       side["mask_BxT"].astype(bool))


def last_reward(out: TQROutput, side):
    """[B] reward head output at each row's last real token."""
    _, last_B = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    return gather_last(out.reward_mean, last_B)


def per_row_lm_loglik(out: TQROutput, side, include_prompt: bool, logp_BxN=None):
    """([B] sum, [B] count) of the backbone LM's log-likelihood of each row's counted actions
    (from the logits, or from `logp_BxN` when the chunked path computed it)."""
    response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    mask_BxN = transition_masks(response_BxT, side["mask_BxT"], include_prompt)[0]
    if logp_BxN is None:
        tokens_BxT = jnp.where(side["mask_BxT"].astype(bool), side["tokens_BxT"], 0)
        logp_BxN = token_logprobs(out.logits, tokens_BxT)
    return jnp.sum(jnp.where(mask_BxN, logp_BxN, 0.0), axis=1), jnp.sum(mask_BxN, axis=1, dtype=jnp.float32)


def lm_loglik(out: TQROutput, side, include_prompt: bool = False, logp_BxN=None):
    """(sum, count) of the backbone LM's log-likelihood of the counted actions (response tokens).

    Read from the LM logits (or `logp_BxN`, the LM's own log-probs from `TQR.q_summary`), not from
    Q, so a policy flattened by the TD term shows here whatever the Q parameterisation (method.md
    section 6).
    """
    total_B, count_B = per_row_lm_loglik(out, side, include_prompt, logp_BxN)
    return jnp.sum(total_B), jnp.sum(count_B)
