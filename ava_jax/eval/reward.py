"""Pairwise accuracy, margin and uncertainty calibration of a reward model on held-out pairs."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import eval_batches


def make_pair_scorer(score_fn, graphdef):
    """The jitted `(params, batch) -> ((score_c, sigma_c, lm_c), (score_r, sigma_r, lm_r))`; build it
    once per run so repeated evaluations reuse the compiled program."""
    @xla.jit
    def both(params, batch):
        model = nnx.merge(graphdef, params)
        return score_fn(model, batch["chosen"]), score_fn(model, batch["rejected"])
    return both


def pair_scores(scorer, params, arrays, *, batch_size: int, pad_id: int, pad_to_multiple: int | None):
    """Scores every pair in file order with `make_pair_scorer`'s function.

    Returns a dict of [N] arrays: score/sigma/lm (mean LM log-likelihood per response token, NaN
    where the objective has none) for chosen/rejected. The last short batch is padded with repeats
    of its first row so no extra shape is compiled.
    """
    out = {k: [] for k in ("score_c", "sigma_c", "lm_c", "score_r", "sigma_r", "lm_r")}
    for batch, n in eval_batches(arrays, batch_size, pad_id=pad_id, pad_to_multiple=pad_to_multiple):
        side_c, side_r = jax.device_get(scorer(params, {"chosen": batch["chosen"], "rejected": batch["rejected"]}))
        for k, v in zip(out, (*side_c, *side_r)):
            out[k].append(np.asarray(v[:n], np.float64))
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def pairwise_metrics(scores: dict) -> dict[str, float]:
    """accuracy (a tie counts one half), mean margin, and calibration of the uncertainty.

    Calibration: pairs are split at the median of sqrt(sigma_c^2 + sigma_r^2); a useful uncertainty
    has higher accuracy on the low-uncertainty half (`calib_gap` = acc_low - acc_high > 0).
    """
    diff = scores["score_c"] - scores["score_r"]
    correct = (diff > 0) + 0.5 * (diff == 0)
    metrics = {"accuracy": float(np.mean(correct)), "margin": float(np.mean(diff)), "pairs": float(diff.size)}
    for side in ("c", "r"):  # the backbone LM after training (AVA only): is the policy flattened?
        lm = scores.get(f"lm_{side}")
        if lm is not None and lm.size and not np.isnan(lm).any():
            metrics[f"lm_loglik_{'chosen' if side == 'c' else 'rejected'}"] = float(np.mean(lm))
    unc = np.sqrt(scores["sigma_c"] ** 2 + scores["sigma_r"] ** 2)
    if diff.size >= 4 and np.ptp(unc) > 0:
        order = np.argsort(unc, kind="stable")
        low, high = order[: diff.size // 2], order[diff.size // 2:]
        metrics.update(acc_low_sigma=float(np.mean(correct[low])), acc_high_sigma=float(np.mean(correct[high])))
        metrics["calib_gap"] = metrics["acc_low_sigma"] - metrics["acc_high_sigma"]
    return metrics
