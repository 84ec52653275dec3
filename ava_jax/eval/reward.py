"""Pairwise accuracy, margin and uncertainty calibration of a reward model on held-out pairs."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import eval_batches
from ava_jax.eval.intermediate import place_token_means, token_columns


def make_pair_scorer(score_fn, graphdef, reader=None):
    """The jitted `(params, batch) -> ((score_c, sigma_c, lm_c), (score_r, sigma_r, lm_r))`; build it
    once per run so repeated evaluations reuse the compiled program.

    With `reader` (an objective's per-transition reward reader, `Objective.reward_reader`), it
    returns `(side_c, side_r, (mu_c, mu_r))` as well: both sides' per-token reward means in
    `intermediate.token_columns`' layout, for the ground-truth diagnostics. The reader's forward is
    the score's, on the same tokens in the same program, and XLA computes it once (common
    subexpressions): the diagnostics cost a readout, not a second pass over the split.
    """
    @xla.jit
    def both(params, batch):
        model = nnx.merge(graphdef, params)
        sides = score_fn(model, batch["chosen"]), score_fn(model, batch["rejected"])
        if reader is None:
            return sides
        return (*sides, tuple(token_columns(reader, model, batch[side]) for side in ("chosen", "rejected")))
    return both


def pair_scores(scorer, params, arrays, *, batch_size: int, pad_id: int, pad_to_multiple: int | None,
                token_length: int | None = None):
    """Scores every pair in file order with `make_pair_scorer`'s function.

    Returns a dict of [N] arrays: score/sigma/lm (mean LM log-likelihood per response token, NaN
    where the objective has none) for chosen/rejected. The last short batch is padded with repeats
    of its first row so no extra shape is compiled. A scorer made with a `reader` adds "mu_c" and
    "mu_r", [N, token_length] float32 (`intermediate.token_reward_means`' values and layout;
    token_length defaults to the longest a row can be, `arrays.max_len`).
    """
    keys = ("score_c", "sigma_c", "lm_c", "score_r", "sigma_r", "lm_r")
    out = {k: [] for k in keys}
    means = {"mu_c": [], "mu_r": []}
    for batch, n in eval_batches(arrays, batch_size, pad_id=pad_id, pad_to_multiple=pad_to_multiple):
        side_c, side_r, *mu = jax.device_get(scorer(params, {"chosen": batch["chosen"], "rejected": batch["rejected"]}))
        for k, v in zip(keys, (*side_c, *side_r)):
            out[k].append(np.asarray(v[:n], np.float64))
        for k, v in zip(means, mu[0] if mu else ()):  # a scorer with a reader: (mu_c, mu_r)
            means[k].append(place_token_means(v, n, token_length or arrays.max_len))
    scores = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}
    if means["mu_c"]:
        scores.update({k: np.concatenate(v) for k, v in means.items()})
    return scores


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
