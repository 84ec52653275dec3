"""From a TQR model and a batch to the objectives and scores of method.md sections 2-4.

This is the glue between `models` (which know nothing of losses) and `losses` (pure functions of
arrays): it runs the model on a pair batch, derives masks with `token_positions`, and calls the
objective named by `LossConfig.objective`. Batches are the dicts `ava_jax.data` produces:
`{"chosen": {"tokens_BxT", "mask_BxT", "prompt_len_B"}, "rejected": {...}}`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses import (AvrilInputs, LossConfig, QSummary, ava_d_loss, ava_p_loss, avril_terms,
                            bradley_terry_loss, gather_last, preference_transformer_loss, transition_masks)
from ava_jax.losses.lm import token_logprobs
from ava_jax.models.positions import token_positions
from ava_jax.models.tqr import TQROutput


def _split(out: TQROutput, n: int):
    first = jax.tree.map(lambda x: x[:n], out)
    second = jax.tree.map(lambda x: x[n:], out)
    return first, second


def _stacked(batch):
    """Chosen and rejected stacked on the batch axis: (tokens [2B, T], mask [2B, T], B)."""
    c, r = batch["chosen"], batch["rejected"]
    tokens = jnp.concatenate([c["tokens_BxT"], r["tokens_BxT"]], axis=0)
    mask = jnp.concatenate([c["mask_BxT"], r["mask_BxT"]], axis=0)
    return tokens, mask, c["tokens_BxT"].shape[0]


def forward_pair(model, batch):
    """One forward over chosen and rejected stacked on the batch axis (one compiled shape, better
    utilisation than two calls). Returns (out_chosen, out_rejected)."""
    tokens, mask, n = _stacked(batch)
    return _split(model(tokens, mask), n)


def _chunked(model, vocab_chunks: bool) -> bool:
    """Whether the AVA terms read Q per transition in vocabulary chunks (TQR.q_summary)."""
    return vocab_chunks and model.heads.q_param == "lm_logprobs"


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


def _last(out: TQROutput, side):
    _, last_B = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    return gather_last(out.reward_mean, last_B)


def _per_row_lm_loglik(out: TQROutput, side, include_prompt: bool, logp_BxN=None):
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
    total_B, count_B = _per_row_lm_loglik(out, side, include_prompt, logp_BxN)
    return jnp.sum(total_B), jnp.sum(count_B)


def make_loss_fn(cfg: LossConfig, vocab_chunks: bool = True):
    """`loss_fn(model, batch, rng) -> (loss, metrics)` for the train-step builder.

    vocab_chunks: the AVA objectives read Q per transition in vocabulary chunks (`TQR.q_summary`,
    no [B, T, V] array; q_param="lm_logprobs" only, the others always take full rows). False takes
    the full Q rows; both give the same loss and gradients (tests/test_objectives.py).
    """
    def loss_fn(model, batch, rng):
        del rng
        if cfg.objective == "ava_d":  # demonstrations: the chosen halves only
            side = batch["chosen"]
            if _chunked(model, vocab_chunks):
                out, summary, lm = forward_summary(model, side["tokens_BxT"], side["mask_BxT"], cfg.beta)
            else:
                out, summary, lm = model(side["tokens_BxT"], side["mask_BxT"]), None, None
            loss, metrics = ava_d_loss(avril_inputs(out, side, summary), cfg)
            return loss, {**metrics, "lm_loglik_chosen": lm_loglik(out, side, cfg.include_prompt, lm)}
        if cfg.objective == "ava_p" and _chunked(model, vocab_chunks):
            c, r = batch["chosen"], batch["rejected"]
            tokens, mask, n = _stacked(batch)
            out, summary, lm = forward_summary(model, tokens, mask, cfg.beta)
            (out_c, out_r), (s_c, s_r), (lm_c, lm_r) = _split(out, n), _split(summary, n), _split(lm, n)
            loss, metrics = ava_p_loss(avril_inputs(out_c, c, s_c), avril_inputs(out_r, r, s_r), cfg)
            return loss, {**metrics, "lm_loglik_chosen": lm_loglik(out_c, c, cfg.include_prompt, lm_c),
                          "lm_loglik_rejected": lm_loglik(out_r, r, cfg.include_prompt, lm_r)}
        out_c, out_r = forward_pair(model, batch)
        if cfg.objective == "ava_p":
            loss, metrics = ava_p_loss(avril_inputs(out_c, batch["chosen"]), avril_inputs(out_r, batch["rejected"]),
                                       cfg)
            return loss, {**metrics, "lm_loglik_chosen": lm_loglik(out_c, batch["chosen"], cfg.include_prompt),
                          "lm_loglik_rejected": lm_loglik(out_r, batch["rejected"], cfg.include_prompt)}
        if cfg.objective == "bt":
            return bradley_terry_loss(_last(out_c, batch["chosen"]), _last(out_r, batch["rejected"]))
        if cfg.objective == "pt":
            # reward_mean already carries w_t (TQR multiplies the head by the weighting), so the
            # score sum_t w_t r_t is the plain sum of reward_mean over real positions.
            c, r = batch["chosen"], batch["rejected"]
            ones_c, ones_r = jnp.ones_like(out_c.reward_mean), jnp.ones_like(out_r.reward_mean)
            return preference_transformer_loss(out_c.reward_mean, ones_c, out_r.reward_mean, ones_r,
                                               c["mask_BxT"], r["mask_BxT"])
        raise ValueError(f"objective={cfg.objective!r} has no loss here")
    return loss_fn


def make_score_fn(cfg: LossConfig, score: str = "last"):
    """`score_fn(model, side) -> (score_B, sigma_B, lm_B)`: the reward-model score of each sequence.

    AVA: `eval.score="last"` is the reward mean of the last response transition (its sigma is the
    uncertainty); `"sum"` sums the reward means over response transitions (sigma adds in quadrature).
    BT: the scalar reward at the last real token. PT: sum_t w_t r_t. Baselines have sigma 0.
    lm_B: AVA only, the backbone LM's mean log-likelihood per response token (NaN for the baselines,
    whose LM head is not trained and not computed).
    """
    if score not in ("last", "sum"):
        raise ValueError(f"eval.score={score!r} is not one of ('last', 'sum')")

    def score_fn(model, side):
        out = model(side["tokens_BxT"], side["mask_BxT"])
        zeros = jnp.zeros(side["tokens_BxT"].shape[:1], jnp.float32)
        if cfg.objective in ("ava_p", "ava_d"):
            terms = avril_terms(*avril_inputs(out, side), cfg)
            lm_total, lm_count = _per_row_lm_loglik(out, side, cfg.include_prompt)
            lm_B = lm_total / jnp.maximum(lm_count, 1.0)
            if score == "last":
                return terms["mu_last_B"], terms["sigma_last_B"], lm_B
            m = terms["mask_BxN"]
            mu = jnp.sum(jnp.where(m, terms["mu_BxN"], 0.0), axis=1)
            var = jnp.sum(jnp.where(m, jnp.square(terms["sigma_BxN"]), 0.0), axis=1)
            return mu, jnp.sqrt(var), lm_B
        if cfg.objective == "bt":
            return _last(out, side), zeros, zeros + jnp.nan
        if cfg.objective == "pt":
            return (jnp.sum(jnp.where(side["mask_BxT"].astype(bool), out.reward_mean, 0.0), axis=1), zeros,
                    zeros + jnp.nan)
        raise ValueError(f"objective={cfg.objective!r} has no score here")
    return score_fn
