"""AVA-d, AVA-p and the contrastive expected return (method.md section 2).

Every objective here is maximised in the method; the functions return the NEGATIVE, summed and
divided by one normaliser, the number of counted transitions (both sides of a pair for AVA-p).
Metrics are (sum, count) float32 pairs so micro-batch and device means stay exact; metrics["loss"]
is (loss_sum, count) with loss == loss_sum / count (a batch with no counted transition gives
loss 0 with count 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses.avril import AvrilInputs, avril_terms
from ava_jax.losses.config import LossConfig


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _pair(total, count):
    return (_f32(total), _f32(count))


def _irl_sum(terms, cfg: LossConfig):
    # The AVRIL prior and TD terms: sum_t ( -kl_t + lambda * td_t ).
    return jnp.sum(-terms["kl_BxN"] + cfg.lam * terms["td_BxN"])


def contrastive_expected_return(diff_B, kind: str):
    """cer(mu_last(y+) - mu_last(y-)) per pair (method.md section 2, F_c).

    Args:
      diff_B: mu_last(y+) - mu_last(y-).
      kind: "sigmoid" (as printed in the paper) or "logsigmoid" (Bradley-Terry form).

    Returns:
      cer_B, to be maximised.
    """
    if kind == "sigmoid":
        return jax.nn.sigmoid(diff_B)
    if kind == "logsigmoid":
        return jax.nn.log_sigmoid(diff_B)
    raise ValueError(f"LossConfig.cer must be 'sigmoid' or 'logsigmoid', got {kind!r}")


def ava_d_from_terms(terms: dict, cfg: LossConfig):
    """AVA-d loss from `avril_terms` output: -F_d per counted transition.

    AVA Eq. 13 / method.md section 2: F_d = sum_y sum_t [ lik_t - kl_t + lambda * td_t ];
    use_irl=False keeps only the likelihood.

    Args:
      terms: dict from `avril_terms`.
      cfg: uses lam, use_irl.

    Returns:
      (loss, metrics): metrics has "loss", "lik", "kl", "td", "mu_last" (sum, count) pairs.
    """
    mask_BxN = terms["mask_BxN"]
    dtype = terms["lik_BxN"].dtype
    count = jnp.sum(mask_BxN, dtype=dtype)
    lik_sum = jnp.sum(terms["lik_BxN"])
    f_sum = lik_sum + (_irl_sum(terms, cfg) if cfg.use_irl else 0.0)
    loss_sum = -f_sum
    loss = loss_sum / jnp.maximum(count, 1.0)
    metrics = {
        "loss": _pair(loss_sum, count),
        "lik": _pair(lik_sum, count),
        "kl": _pair(jnp.sum(terms["kl_BxN"]), count),
        "td": _pair(jnp.sum(terms["td_BxN"]), jnp.sum(terms["td_mask_BxN"])),
        "mu_last": _pair(jnp.sum(terms["mu_last_B"]), jnp.sum(terms["has_B"])),
    }
    return loss, metrics


def ava_d_loss(inputs: AvrilInputs, cfg: LossConfig):
    """AVA-d (demonstrations): -F_d averaged per counted transition (AVA Eq. 13).

    With gamma = lambda = beta = 1, likelihood="boltzmann" this is the original AVRIL ELBO
    (Chan & van der Schaar 2021) on the token MDP, negated and divided by the transition count.

    Args:
      inputs: AvrilInputs of the demonstrations.
      cfg: LossConfig.

    Returns:
      (loss, metrics), see `ava_d_from_terms`.
    """
    return ava_d_from_terms(avril_terms(*inputs, cfg), cfg)


def ava_p_from_terms(chosen: dict, rejected: dict, cfg: LossConfig):
    """AVA-p loss from the two sides' `avril_terms`: -(F_p + cer_weight * F_c) / count.

    method.md section 2:
      F_p = sum_t lik_t(y+) - sum_t lik_t(y-) + sum_{y in {y+, y-}} sum_t ( -kl_t + lambda * td_t )
      F_c = sum_pairs cer( mu_last(y+) - mu_last(y-) )
    count = counted transitions of y+ plus those of y- (one normaliser for the pair).

    Switches: use_neg=False drops -sum lik(y-) (ablation "neg"); use_irl=False drops the KL and TD
    terms of both sides (ablation "irl"); use_cer=False drops F_c (ablation "cer").

    neg_floor: with a log-softmax Q ("lm_logprobs") the term -sum_t lik_t(y-) is unbounded: the
    optimiser can always gain by pushing log pi(y-_t) towards -inf, and because chosen and
    rejected responses share most tokens this drags log pi(y+) down too (the unlikelihood failure
    mode, method.md section 2). With a floor the rejected term uses max(lik_t(y-), neg_floor) per
    token, so a token already below the floor contributes a constant and gets zero gradient: the
    push stops there instead of running to -inf. The metric "lik_rejected" reports the unfloored
    value so the collapse stays visible.

    A pair enters F_c and the pair metrics only if both sides have a counted transition (an
    all-padding pair, e.g. batch filler, contributes nothing).

    Args:
      chosen: dict from `avril_terms` for y+.
      rejected: dict from `avril_terms` for y-, same batch size.
      cfg: uses lam, use_neg, use_irl, use_cer, neg_floor, cer, cer_weight.

    Returns:
      (loss, metrics): metrics has (sum, count) pairs "loss", "lik_chosen", "lik_rejected", "kl",
      "td", "cer", "accuracy" (mu_last(y+) > mu_last(y-)), "margin" (mu_last(y+) - mu_last(y-)).
    """
    if chosen["mu_last_B"].shape != rejected["mu_last_B"].shape:
        raise ValueError("chosen and rejected batches differ in batch size: "
                         f"{chosen['mu_last_B'].shape} vs {rejected['mu_last_B'].shape}")
    dtype = jnp.result_type(chosen["lik_BxN"], rejected["lik_BxN"])
    n_chosen = jnp.sum(chosen["mask_BxN"], dtype=dtype)
    n_rejected = jnp.sum(rejected["mask_BxN"], dtype=dtype)
    count = n_chosen + n_rejected

    lik_chosen_sum = jnp.sum(chosen["lik_BxN"])
    lik_rejected_sum = jnp.sum(rejected["lik_BxN"])
    f_sum = lik_chosen_sum
    if cfg.use_neg:
        lik_rej_BxN = rejected["lik_BxN"]
        if cfg.neg_floor is not None:
            lik_rej_BxN = jnp.where(rejected["mask_BxN"],
                                    jnp.maximum(lik_rej_BxN, cfg.neg_floor), 0.0)
        f_sum = f_sum - jnp.sum(lik_rej_BxN)
    if cfg.use_irl:
        f_sum = f_sum + _irl_sum(chosen, cfg) + _irl_sum(rejected, cfg)

    pair_B = chosen["has_B"] & rejected["has_B"]
    n_pairs = jnp.sum(pair_B, dtype=dtype)
    margin_B = jnp.where(pair_B, chosen["mu_last_B"] - rejected["mu_last_B"], 0.0)
    cer_B = jnp.where(pair_B, contrastive_expected_return(margin_B, cfg.cer), 0.0)
    if cfg.use_cer:
        f_sum = f_sum + cfg.cer_weight * jnp.sum(cer_B)

    loss_sum = -f_sum
    loss = loss_sum / jnp.maximum(count, 1.0)
    metrics = {
        "loss": _pair(loss_sum, count),
        "lik_chosen": _pair(lik_chosen_sum, n_chosen),
        "lik_rejected": _pair(lik_rejected_sum, n_rejected),
        "kl": _pair(jnp.sum(chosen["kl_BxN"]) + jnp.sum(rejected["kl_BxN"]), count),
        "td": _pair(jnp.sum(chosen["td_BxN"]) + jnp.sum(rejected["td_BxN"]),
                    jnp.sum(chosen["td_mask_BxN"]) + jnp.sum(rejected["td_mask_BxN"])),
        "cer": _pair(jnp.sum(cer_B), n_pairs),
        "accuracy": _pair(jnp.sum(pair_B & (margin_B > 0)), n_pairs),
        "margin": _pair(jnp.sum(margin_B), n_pairs),
    }
    return loss, metrics


def ava_p_loss(chosen: AvrilInputs, rejected: AvrilInputs, cfg: LossConfig):
    """AVA-p (preference pairs): -(F_p + cer_weight * F_c) per counted transition.

    Args:
      chosen: AvrilInputs of y+ (row b pairs with row b of `rejected`).
      rejected: AvrilInputs of y-; T may differ from chosen's.
      cfg: LossConfig.

    Returns:
      (loss, metrics), see `ava_p_from_terms`.
    """
    return ava_p_from_terms(avril_terms(*chosen, cfg), avril_terms(*rejected, cfg), cfg)
