"""AVA-p and AVA-d as reward-model objectives (method.md sections 2 and 4; the paper's Eqs. 13-15)."""
from __future__ import annotations

import jax.numpy as jnp

from ava_jax.losses import AvaConfig, ava_d_loss, ava_p_loss, avril_terms
from ava_jax.objectives.forward import (avril_inputs, forward_pair, forward_summary, lm_loglik, per_row_lm_loglik,
                                        split_rows, stacked)
from ava_jax.objectives.registry import Objective, register


def _chunked(model, vocab_chunks: bool) -> bool:
    """Whether the AVA terms read Q per transition in vocabulary chunks (TQR.q_summary)."""
    return vocab_chunks and model.heads.q_param == "lm_logprobs"


def make_ava_d_loss(cfg: AvaConfig, vocab_chunks: bool = True):
    """AVA-d on the chosen halves of a pair batch (demonstrations).

    vocab_chunks: read Q per transition in vocabulary chunks (`TQR.q_summary`, no [B, T, V] array;
    q_param="lm_logprobs" only, the others always take full rows). False takes the full Q rows; both
    give the same loss and gradients (tests/test_objectives.py).
    """
    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        side = batch["chosen"]
        if _chunked(model, vocab_chunks):
            out, summary, lm = forward_summary(model, side["tokens_BxT"], side["mask_BxT"], cfg.beta)
        else:
            out, summary, lm = model(side["tokens_BxT"], side["mask_BxT"]), None, None
        loss, metrics = ava_d_loss(avril_inputs(out, side, summary), cfg)
        return loss, {**metrics, "lm_loglik_chosen": lm_loglik(out, side, cfg.include_prompt, lm)}
    return loss_fn


def make_ava_p_loss(cfg: AvaConfig, vocab_chunks: bool = True):
    """AVA-p on preference pairs, chosen and rejected in one forward (`vocab_chunks`: see AVA-d)."""
    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        c, r = batch["chosen"], batch["rejected"]
        if _chunked(model, vocab_chunks):
            tokens, mask, n = stacked(batch)
            out, summary, lm = forward_summary(model, tokens, mask, cfg.beta)
            (out_c, out_r), (s_c, s_r), (lm_c, lm_r) = split_rows(out, n), split_rows(summary, n), split_rows(lm, n)
        else:
            (out_c, out_r), (s_c, s_r), (lm_c, lm_r) = forward_pair(model, batch), (None, None), (None, None)
        loss, metrics = ava_p_loss(avril_inputs(out_c, c, s_c), avril_inputs(out_r, r, s_r), cfg)
        return loss, {**metrics, "lm_loglik_chosen": lm_loglik(out_c, c, cfg.include_prompt, lm_c),
                      "lm_loglik_rejected": lm_loglik(out_r, r, cfg.include_prompt, lm_r)}
    return loss_fn


def make_ava_score(cfg: AvaConfig, score: str = "last"):
    """`score_fn(model, side) -> (score_B, sigma_B, lm_B)`.

    score="last": the reward mean of the last response transition (its sigma is the uncertainty);
    "sum": the reward means summed over response transitions (sigma adds in quadrature). lm_B: the
    backbone LM's mean log-likelihood per response token (is the policy flattened?).
    """
    def score_fn(model, side):
        out = model(side["tokens_BxT"], side["mask_BxT"])
        terms = avril_terms(*avril_inputs(out, side), cfg)
        lm_total, lm_count = per_row_lm_loglik(out, side, cfg.include_prompt)
        lm_B = lm_total / jnp.maximum(lm_count, 1.0)
        if score == "last":
            return terms["mu_last_B"], terms["sigma_last_B"], lm_B
        m = terms["mask_BxN"]
        mu = jnp.sum(jnp.where(m, terms["mu_BxN"], 0.0), axis=1)
        var = jnp.sum(jnp.where(m, jnp.square(terms["sigma_BxN"]), 0.0), axis=1)
        return mu, jnp.sqrt(var), lm_B
    return score_fn


def make_ava_reward_reader(cfg: AvaConfig):
    """Per-transition (mu, sigma, mask) through `avril_terms`, so `reward_align` is respected; mu is
    zero outside the counted transitions."""
    def reader(model, side):
        out = model(side["tokens_BxT"], side["mask_BxT"])
        terms = avril_terms(*avril_inputs(out, side), cfg)
        mask_BxN = terms["mask_BxN"]
        return jnp.where(mask_BxN, terms["mu_BxN"], 0.0), terms["sigma_BxN"], mask_BxN
    return reader


# AVA-p's reward-model defaults, chosen on the stories validation split (docs/lab.md): CER on the
# summed reward means, counted once per pair in the Bradley-Terry form, a terminal TD target, the
# weighting on the reward head only, and the summed reward means as the score. As printed
# (token / sigmoid / last / none / both / last) it scored 57.5% there against 71.6%.
_READINGS = {"normalize": "sequence", "cer": "logsigmoid", "cer_score": "sum", "td_terminal": "zero"}
AVA_P_DEFAULTS = {"loss": _READINGS, "model": {"weight_heads": "reward"}, "eval": {"score": "sum"}}
# As a policy objective (pipeline `direct`) the TQR sits on the policy and its LM head gives Q
# (q_param=lm_logprobs): the weighting stays on the reward head, so Q(s_t, .) never sees later tokens
# and the fine-tuned LM can be sampled; the same readings keep the TD term from swamping CER.
AVA_POLICY_DEFAULTS = {"loss": _READINGS, "model": {"weight_heads": "reward", "q_param": "lm_logprobs"}}

AVA_P = register(Objective(
    name="ava_p", title="AVA-p", equation="method.md section 2 (paper Eq. 15: AVRIL + contrastive expected return)",
    kinds=("reward_model", "policy"), data="pairs", config_cls=AvaConfig, make_loss=make_ava_p_loss,
    make_score=make_ava_score, make_reward_reader=make_ava_reward_reader,
    defaults={"reward_model": AVA_P_DEFAULTS, "policy": AVA_POLICY_DEFAULTS}, uncertainty=True,
    score_keys=("last", "sum")))

AVA_D = register(Objective(
    name="ava_d", title="AVA-d", equation="method.md section 2 (paper Eq. 13: the AVRIL ELBO on demonstrations)",
    kinds=("reward_model", "policy"), data="demonstrations", config_cls=AvaConfig, make_loss=make_ava_d_loss,
    make_score=make_ava_score, make_reward_reader=make_ava_reward_reader, defaults={"policy": AVA_POLICY_DEFAULTS},
    uncertainty=True,
    score_keys=("last", "sum")))
