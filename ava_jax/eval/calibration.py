"""How well AVA's uncertainty is calibrated on preference pairs.

A reward model with Gaussian scores score ~ N(mu, sigma^2) per sequence predicts that the chosen
side wins with probability

    p = P(score_c > score_r) = Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2))

(independent Gaussians; Phi the standard normal CDF). This module measures that probability
against the labels (expected calibration error, reliability bins), against the true preference
probability where the task knows it (the synthetic MDP's Bradley-Terry `prob_chosen_N`), and checks
whether pairs the model is less sure of are really harder (accuracy per quantile of the pair's
sigma). Everything is NumPy float64 on the [N] arrays `ava_jax.eval.reward.pair_scores` returns.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special


def _pair_sigma(scores: dict) -> np.ndarray:
    sc, sr = (np.asarray(scores[k], np.float64) for k in ("sigma_c", "sigma_r"))
    return np.sqrt(sc**2 + sr**2)


def preference_probability(scores: dict) -> np.ndarray:
    """The model's probability that the chosen side wins, Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2)).

    A pair whose total sigma is 0 (the baselines BT and PT, which have no uncertainty) has no such
    probability: it comes back NaN rather than a 0/1 step, so a baseline can never look calibrated
    (or miscalibrated) by accident. `calibration_metrics` drops those pairs.

    Args:
      scores: dict with [N] arrays score_c, sigma_c, score_r, sigma_r (`pair_scores`' output).

    Returns:
      p_N: float64 probabilities in [0, 1]; NaN where sigma_c = sigma_r = 0.
    """
    diff_N = np.asarray(scores["score_c"], np.float64) - np.asarray(scores["score_r"], np.float64)
    sd_N = _pair_sigma(scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_N = diff_N / sd_N
    return np.where(sd_N > 0, special.ndtr(z_N), np.nan)


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of predicted probability; mean_pred and freq are NaN in empty bins."""

    edges_Bp1: np.ndarray  # bin edges, 0 .. 1
    mean_pred_B: np.ndarray  # mean predicted probability of the points in each bin
    freq_B: np.ndarray  # empirical frequency of label 1 in each bin
    count_B: np.ndarray  # int64, points per bin (twice the pairs when symmetrised)

    def as_rows(self) -> list[tuple[float, float, int]]:
        """[(mean predicted, empirical frequency, count)] per bin."""
        return [(float(m), float(f), int(c)) for m, f, c in zip(self.mean_pred_B, self.freq_B, self.count_B)]


def _check_probs(p_N: np.ndarray, label_N: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    p_N = np.asarray(p_N, np.float64)
    label_N = np.ones_like(p_N) if label_N is None else np.asarray(label_N, np.float64)
    if p_N.shape != label_N.shape or p_N.ndim != 1:
        raise ValueError(f"p_N {p_N.shape} and label_N {label_N.shape} must be equal 1-D shapes")
    if np.isnan(p_N).any():
        raise ValueError("p_N has NaN (a pair with sigma 0?); drop those pairs first")
    if ((p_N < 0) | (p_N > 1)).any() or not np.isin(label_N, (0.0, 1.0)).all():
        raise ValueError("p_N must lie in [0, 1] and label_N be 0 or 1")
    return p_N, label_N


def reliability_bins(p_N: np.ndarray, label_N: np.ndarray | None = None, n_bins: int = 10,
                     symmetrise: bool = True) -> ReliabilityBins:
    """Reliability diagram data: per equal-width bin, mean prediction, label frequency and count.

    p_N is the predicted probability that the first listed side wins and label_N whether it did
    (None: all ones, the (chosen, rejected) storage order, where the first side always won). With
    that order every label is 1, so unsymmetrised bins only measure how high p is: a model that
    always says p = 1 would look perfect. Symmetrising lets each pair contribute both orientations,
    (p, label) and (1 - p, 1 - label); the result is then the same for any ordering of the pairs'
    sides, and the diagram is symmetric about (0.5, 0.5).

    A point falls in bin floor(p * n_bins), with p = 1 in the last bin.

    Args:
      p_N: [N] predicted probabilities in [0, 1] (no NaN).
      label_N: [N] 0/1 outcomes, or None for all ones.
      n_bins: number of equal-width bins on [0, 1].
      symmetrise: add the flipped orientation of every pair (see above).

    Returns:
      ReliabilityBins with [n_bins] arrays.
    """
    p_N, label_N = _check_probs(p_N, label_N)
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    if symmetrise:
        p_N, label_N = np.concatenate([p_N, 1.0 - p_N]), np.concatenate([label_N, 1.0 - label_N])
    bin_N = np.minimum(np.floor(p_N * n_bins).astype(np.int64), n_bins - 1)
    count_B = np.bincount(bin_N, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pred_B = np.bincount(bin_N, weights=p_N, minlength=n_bins) / count_B
        freq_B = np.bincount(bin_N, weights=label_N, minlength=n_bins) / count_B
    return ReliabilityBins(edges_Bp1=np.linspace(0.0, 1.0, n_bins + 1), mean_pred_B=mean_pred_B, freq_B=freq_B,
                           count_B=count_B)


def expected_calibration_error(p_N: np.ndarray, label_N: np.ndarray | None = None, n_bins: int = 10,
                               symmetrise: bool = True) -> float:
    """ECE = sum_b (n_b / n) |mean prediction_b - label frequency_b| over equal-width bins.

    Pairs are symmetrised by default (see `reliability_bins`: with (chosen, rejected) storage every
    label is 1, and only the symmetrised ECE is invariant to which side is listed first).

    Args:
      p_N: [N] predicted probabilities that the first side wins.
      label_N: [N] 0/1, or None for all ones (the (chosen, rejected) order).
      n_bins: equal-width bins on [0, 1].
      symmetrise: count each pair in both orientations.

    Returns:
      The ECE, in [0, 1].
    """
    bins = reliability_bins(p_N, label_N, n_bins, symmetrise)
    full_B = bins.count_B > 0
    gap_B = np.abs(bins.mean_pred_B[full_B] - bins.freq_B[full_B])
    return float(np.sum(bins.count_B[full_B] * gap_B) / np.sum(bins.count_B))


def mean_abs_error_to_truth(p_N: np.ndarray, p_true_N: np.ndarray) -> float:
    """Mean |p - p_true| against the known preference probability (same orientation for both).

    Orientation does not matter here: |(1 - p) - (1 - p_true)| = |p - p_true|. NaN in p_N (a pair
    with sigma 0) makes the result NaN.

    Args:
      p_N: [N] predicted probabilities that the chosen side wins.
      p_true_N: [N] true probabilities (e.g. SyntheticPreferences.prob_chosen_N).

    Returns:
      The mean absolute error.
    """
    p_N, p_true_N = np.asarray(p_N, np.float64), np.asarray(p_true_N, np.float64)
    if p_N.shape != p_true_N.shape:
        raise ValueError(f"p_N {p_N.shape} and p_true_N {p_true_N.shape} differ")
    return float(np.mean(np.abs(p_N - p_true_N)))


def accuracy_by_sigma_quantile(scores: dict, n_quantiles: int = 4) -> list[tuple[float, float, int]]:
    """Accuracy of score_c > score_r (ties count one half) within quantiles of sqrt(sigma_c^2 + sigma_r^2).

    Quantile k holds the pairs with edge_{k-1} < sigma <= edge_k, edges = np.quantile(sigma, k / n)
    (edge_0 = -inf). Tied sigmas therefore stay in one bin: with a constant sigma (the baselines)
    every pair lands in the first quantile and the others are empty (accuracy NaN, count 0). A
    useful uncertainty has accuracy falling from the first quantile to the last.

    Args:
      scores: dict with [N] arrays score_c, sigma_c, score_r, sigma_r.
      n_quantiles: number of quantile bins.

    Returns:
      [(upper sigma edge, accuracy, count)] for k = 1 .. n_quantiles.
    """
    if n_quantiles < 1:
        raise ValueError(f"n_quantiles={n_quantiles} must be >= 1")
    diff_N = np.asarray(scores["score_c"], np.float64) - np.asarray(scores["score_r"], np.float64)
    if diff_N.size == 0:
        raise ValueError("accuracy_by_sigma_quantile: no pairs")
    correct_N = (diff_N > 0) + 0.5 * (diff_N == 0)
    sd_N = _pair_sigma(scores)
    edges_Q = np.quantile(sd_N, np.arange(1, n_quantiles + 1) / n_quantiles)
    bin_N = np.searchsorted(edges_Q[:-1], sd_N, side="left")
    out = []
    for k in range(n_quantiles):
        sel_N = bin_N == k
        acc = float(np.mean(correct_N[sel_N])) if sel_N.any() else float("nan")
        out.append((float(edges_Q[k]), acc, int(sel_N.sum())))
    return out


def calibration_metrics(scores: dict, p_true_N: np.ndarray | None = None, n_bins: int = 10,
                        n_quantiles: int = 4) -> dict[str, float]:
    """Calibration numbers for a pipeline to log.

    Keys: `acc_sigma_q1` .. `acc_sigma_q{n_quantiles}` (accuracy per sigma quantile; NaN for an empty
    quantile), and, over the pairs with sigma > 0 (`calib_pairs` of them): `ece` (symmetrised,
    `n_bins` equal-width bins) and, when p_true_N is given, `mae_to_truth`. A baseline (sigma 0
    everywhere) gets only the quantile accuracies and `calib_pairs` = 0.

    Args:
      scores: dict with [N] arrays score_c, sigma_c, score_r, sigma_r.
      p_true_N: optional [N] true probabilities that the chosen side wins.
      n_bins: ECE bins.
      n_quantiles: sigma quantiles.

    Returns:
      dict of floats.
    """
    metrics = {f"acc_sigma_q{k + 1}": acc for k, (_, acc, _) in
               enumerate(accuracy_by_sigma_quantile(scores, n_quantiles))}
    p_N = preference_probability(scores)
    keep_N = ~np.isnan(p_N)
    metrics["calib_pairs"] = float(keep_N.sum())
    if keep_N.any():
        metrics["ece"] = expected_calibration_error(p_N[keep_N], None, n_bins)
        if p_true_N is not None:
            metrics["mae_to_truth"] = mean_abs_error_to_truth(p_N[keep_N], np.asarray(p_true_N)[keep_N])
    return metrics


def plot_reliability(bins: ReliabilityBins, path: str, title: str = "") -> str:
    """Writes a reliability diagram (frequency against mean prediction, counts below) as a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend is changed).

    Args:
      bins: `reliability_bins` output.
      path: the PNG file to write.
      title: figure title.

    Returns:
      path.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is a test extra, not a core dependency
        raise ImportError("plot_reliability needs matplotlib: pip install 'ava_jax[test]' "
                          "(or pip install matplotlib)") from e
    fig = Figure(figsize=(4.5, 5.5))
    FigureCanvasAgg(fig)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers_B = 0.5 * (bins.edges_Bp1[:-1] + bins.edges_Bp1[1:])
    width = float(np.min(np.diff(bins.edges_Bp1)))
    full_B = bins.count_B > 0
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(centers_B[full_B], bins.freq_B[full_B], width=0.9 * width, alpha=0.4, label="label frequency")
    ax.plot(bins.mean_pred_B[full_B], bins.freq_B[full_B], "o-", label="(mean p, frequency)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="empirical frequency", title=title)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centers_B, bins.count_B, width=0.9 * width, color="gray")
    ax_n.set(xlabel="predicted probability", ylabel="count")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
