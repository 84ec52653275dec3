"""AVA-d, AVA-p and the contrastive expected return (method.md section 2).

Every objective here is maximised in the method; the functions return the NEGATIVE, summed and
divided by one normaliser: the number of counted transitions (both sides of a pair for AVA-p)
under `normalize="token"`, the number of pairs (AVA-d: sequences) under `normalize="sequence"`.
Metrics are (sum, count) float32 pairs so micro-batch and device means stay exact; metrics["loss"]
is (loss_sum, count) with loss == loss_sum / count (a batch with no counted transition gives
loss 0 with count 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses.avril import AvrilInputs, avril_terms
from ava_jax.losses.config import AvaConfig


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _pair(total, count):
    return (_f32(total), _f32(count))


def _row_parts(terms: dict, cfg: AvaConfig, lik_BxN=None) -> dict:
    """Per-row likelihood, -KL and lambda * TD parts of the objective under `cfg.normalize`.

    "token": the per-row sums (the caller divides the batch total by the transition count);
    "sequence": each term averaged over its own row (likelihood and KL over the row's counted
    transitions, TD over those that have a TD error), so every sequence weighs the same.
    Returns [B] arrays "lik", "kl" (already negated), "td" (already times lambda).
    """
    lik_BxN = terms["lik_BxN"] if lik_BxN is None else lik_BxN
    lik_B = jnp.sum(lik_BxN, axis=1)
    kl_B = -jnp.sum(terms["kl_BxN"], axis=1)
    td_B = cfg.lam * jnp.sum(terms["td_BxN"], axis=1)
    if cfg.normalize == "sequence":
        n_B = jnp.maximum(jnp.sum(terms["mask_BxN"], axis=1, dtype=lik_B.dtype), 1.0)
        n_td_B = jnp.maximum(jnp.sum(terms["td_mask_BxN"], axis=1, dtype=lik_B.dtype), 1.0)
        lik_B, kl_B, td_B = lik_B / n_B, kl_B / n_B, td_B / n_td_B
    return {"lik": lik_B, "kl": kl_B, "td": td_B}


def _cer_score(terms: dict, cfg: AvaConfig):
    """The return CER compares: mu_last ("last", as printed) or the sum of mu_t over counted transitions."""
    if cfg.cer_score == "sum":
        return jnp.sum(jnp.where(terms["mask_BxN"], terms["mu_BxN"], 0.0), axis=1)
    return terms["mu_last_B"]


def _shares(parts: dict) -> dict:
    """Each part's share of the objective's absolute mass in this batch: |part| / sum |parts|.

    A (share, 1) metric per part, so an imbalance (e.g. TD dwarfing CER) is visible in the logs.
    """
    total = sum(jnp.abs(v) for v in parts.values())
    return {f"share_{k}": _pair(jnp.abs(v) / jnp.maximum(total, 1e-30), 1.0) for k, v in parts.items()}


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
    raise ValueError(f"AvaConfig.cer must be 'sigmoid' or 'logsigmoid', got {kind!r}")


def ava_d_from_terms(terms: dict, cfg: AvaConfig):
    """AVA-d loss from `avril_terms` output: -F_d per counted transition.

    AVA Eq. 13 / method.md section 2: F_d = sum_y sum_t [ lik_t - kl_t + lambda * td_t ];
    use_irl=False keeps only the likelihood. normalize="token" divides the batch sum by the
    counted transitions; "sequence" averages each term over its sequence, then over sequences.

    Args:
      terms: dict from `avril_terms`.
      cfg: uses lam, use_irl, normalize.

    Returns:
      (loss, metrics): metrics has "loss", "lik", "kl", "td", "mu_last", "part_<term>" (sum,
      count) pairs and "share_<term>" (see `ava_p_from_terms`).
    """
    mask_BxN = terms["mask_BxN"]
    dtype = terms["lik_BxN"].dtype
    count = jnp.sum(mask_BxN, dtype=dtype)
    rows = _row_parts(terms, cfg)
    # The normaliser: counted transitions ("token") or sequences with one ("sequence").
    norm = count if cfg.normalize == "token" else jnp.sum(terms["has_B"], dtype=dtype)
    parts = {"lik": jnp.sum(rows["lik"])}
    if cfg.use_irl:
        parts.update(kl=jnp.sum(rows["kl"]), td=jnp.sum(rows["td"]))
    loss_sum = -sum(parts.values())
    loss = loss_sum / jnp.maximum(norm, 1.0)
    metrics = {
        "loss": _pair(loss_sum, norm),
        "lik": _pair(jnp.sum(terms["lik_BxN"]), count),
        "kl": _pair(jnp.sum(terms["kl_BxN"]), count),
        "td": _pair(jnp.sum(terms["td_BxN"]), jnp.sum(terms["td_mask_BxN"])),
        "mu_last": _pair(jnp.sum(terms["mu_last_B"]), jnp.sum(terms["has_B"])),
        **{f"part_{k}": _pair(v, norm) for k, v in parts.items()},
        **_shares(parts),
    }
    return loss, metrics


def ava_d_loss(inputs: AvrilInputs, cfg: AvaConfig):
    """AVA-d (demonstrations): -F_d averaged per counted transition (AVA Eq. 13).

    With gamma = lambda = beta = 1, likelihood="boltzmann" this is the original AVRIL ELBO
    (Chan & van der Schaar 2021) on the token MDP, negated and divided by the transition count.

    Args:
      inputs: AvrilInputs of the demonstrations.
      cfg: AvaConfig.

    Returns:
      (loss, metrics), see `ava_d_from_terms`.
    """
    return ava_d_from_terms(avril_terms(*inputs, cfg), cfg)


def ava_p_from_terms(chosen: dict, rejected: dict, cfg: AvaConfig):
    """AVA-p loss from the two sides' `avril_terms`: -(F_p + cer_weight * F_c) / normaliser.

    method.md section 2:
      F_p = sum_t lik_t(y+) - sum_t lik_t(y-) + sum_{y in {y+, y-}} sum_t ( -kl_t + lambda * td_t )
      F_c = sum_pairs cer( mu_last(y+) - mu_last(y-) )   (cer_score="sum": sum_t mu_t instead of mu_last)
    normalize="token": sums over the batch, normaliser = counted transitions of y+ plus those
    of y-. normalize="sequence": each side's token terms are averaged over that side, CER is
    counted once per pair, normaliser = the number of pairs (see AvaConfig.normalize).

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
      cfg: uses lam, use_neg, use_irl, use_cer, neg_floor, cer, cer_weight, normalize.

    Returns:
      (loss, metrics): metrics has (sum, count) pairs "loss", "lik_chosen", "lik_rejected", "kl",
      "td", "cer" (per-token / per-pair means of the raw terms), "accuracy" (score(y+) >
      score(y-)), "margin" (score(y+) - score(y-), the scores CER compares), "part_<term>" (each term's signed
      contribution to the maximised objective, over the loss's normaliser) and "share_<term>"
      (|part| / sum |parts| in the batch).
    """
    if chosen["mu_last_B"].shape != rejected["mu_last_B"].shape:
        raise ValueError("chosen and rejected batches differ in batch size: "
                         f"{chosen['mu_last_B'].shape} vs {rejected['mu_last_B'].shape}")
    dtype = jnp.result_type(chosen["lik_BxN"], rejected["lik_BxN"])
    n_chosen = jnp.sum(chosen["mask_BxN"], dtype=dtype)
    n_rejected = jnp.sum(rejected["mask_BxN"], dtype=dtype)
    count = n_chosen + n_rejected
    pair_B = chosen["has_B"] & rejected["has_B"]
    n_pairs = jnp.sum(pair_B, dtype=dtype)

    lik_rej_BxN = rejected["lik_BxN"]
    if cfg.neg_floor is not None:
        lik_rej_BxN = jnp.where(rejected["mask_BxN"], jnp.maximum(lik_rej_BxN, cfg.neg_floor), 0.0)
    rows_c, rows_r = _row_parts(chosen, cfg), _row_parts(rejected, cfg, lik_rej_BxN)
    if cfg.normalize == "sequence":
        # Per pair: a pair whose other side is empty (batch filler) contributes nothing.
        rows_c, rows_r = ({k: jnp.where(pair_B, v, 0.0) for k, v in rows.items()} for rows in (rows_c, rows_r))
        norm = n_pairs
    else:
        norm = count

    margin_B = jnp.where(pair_B, _cer_score(chosen, cfg) - _cer_score(rejected, cfg), 0.0)
    cer_B = jnp.where(pair_B, contrastive_expected_return(margin_B, cfg.cer), 0.0)

    # Each part is a signed contribution to F (maximised); the loss is -sum(parts) / norm.
    parts = {"lik_chosen": jnp.sum(rows_c["lik"])}
    if cfg.use_neg:
        parts["lik_rejected"] = -jnp.sum(rows_r["lik"])
    if cfg.use_irl:
        parts["kl"] = jnp.sum(rows_c["kl"]) + jnp.sum(rows_r["kl"])
        parts["td"] = jnp.sum(rows_c["td"]) + jnp.sum(rows_r["td"])
    if cfg.use_cer:
        parts["cer"] = cfg.cer_weight * jnp.sum(cer_B)

    loss_sum = -sum(parts.values())
    loss = loss_sum / jnp.maximum(norm, 1.0)
    metrics = {
        "loss": _pair(loss_sum, norm),
        "lik_chosen": _pair(jnp.sum(chosen["lik_BxN"]), n_chosen),
        "lik_rejected": _pair(jnp.sum(rejected["lik_BxN"]), n_rejected),
        "kl": _pair(jnp.sum(chosen["kl_BxN"]) + jnp.sum(rejected["kl_BxN"]), count),
        "td": _pair(jnp.sum(chosen["td_BxN"]) + jnp.sum(rejected["td_BxN"]),
                    jnp.sum(chosen["td_mask_BxN"]) + jnp.sum(rejected["td_mask_BxN"])),
        "cer": _pair(jnp.sum(cer_B), n_pairs),
        "accuracy": _pair(jnp.sum(pair_B & (margin_B > 0)), n_pairs),
        "margin": _pair(jnp.sum(margin_B), n_pairs),
        **{f"part_{k}": _pair(v, norm) for k, v in parts.items()},
        **_shares(parts),
    }
    return loss, metrics


def ava_p_loss(chosen: AvrilInputs, rejected: AvrilInputs, cfg: AvaConfig):
    """AVA-p (preference pairs): -(F_p + cer_weight * F_c) per counted transition.

    Args:
      chosen: AvrilInputs of y+ (row b pairs with row b of `rejected`).
      rejected: AvrilInputs of y-; T may differ from chosen's.
      cfg: AvaConfig.

    Returns:
      (loss, metrics), see `ava_p_from_terms`.
    """
    return ava_p_from_terms(avril_terms(*chosen, cfg), avril_terms(*rejected, cfg), cfg)
