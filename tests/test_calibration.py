"""Calibration of AVA's sigma on pairs: values against float64 NumPy and hand computations."""
import math

import numpy as np
import pytest

from ava_jax.eval import calibration as cal


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _scores(score_c, score_r, sigma_c, sigma_r):
    return {k: np.asarray(v, np.float64) for k, v in
            dict(score_c=score_c, score_r=score_r, sigma_c=sigma_c, sigma_r=sigma_r).items()}


def _ece_loops(p, y, n_bins):
    """Independent ECE: explicit loops over bins, symmetrised by hand."""
    pts = [(pi, yi) for pi, yi in zip(p, y)] + [(1 - pi, 1 - yi) for pi, yi in zip(p, y)]
    total = 0.0
    for b in range(n_bins):
        inb = [(pi, yi) for pi, yi in pts if min(int(math.floor(pi * n_bins)), n_bins - 1) == b]
        if inb:
            total += len(inb) * abs(sum(pi for pi, _ in inb) / len(inb) - sum(yi for _, yi in inb) / len(inb))
    return total / len(pts)


def test_preference_probability_matches_phi():
    s = _scores([1.0, 0.0, -2.0, 0.3], [0.0, 0.0, 1.0, 0.3], [1.0, 0.5, 3.0, 0.0], [0.0, 0.5, 4.0, 0.0])
    p = cal.preference_probability(s)
    want = [_phi(1.0), 0.5, _phi(-3.0 / 5.0)]
    np.testing.assert_allclose(p[:3], want, rtol=0, atol=1e-14)
    assert np.isnan(p[3])  # sigma 0 on both sides: no probability


def test_perfectly_calibrated_has_near_zero_ece():
    rng = np.random.default_rng(0)
    n = 200_000
    p_first = rng.random(n)
    first_won = rng.random(n) < p_first
    # Stored as (chosen, rejected): the probability of the side that won, label always 1.
    p_chosen = np.where(first_won, p_first, 1 - p_first)
    ece = cal.expected_calibration_error(p_chosen)
    assert ece < 0.005, ece
    # Unsymmetrised, every label is 1 and the same calibrated predictions look badly off.
    assert cal.expected_calibration_error(p_chosen, symmetrise=False) > 0.3


def test_symmetrisation_makes_ece_orientation_free():
    rng = np.random.default_rng(1)
    n = 5000
    p_first = rng.beta(0.5, 0.5, n)
    first_won = rng.random(n) < np.clip(p_first * 1.2 - 0.1, 0, 1)
    p_chosen = np.where(first_won, p_first, 1 - p_first)
    a = cal.expected_calibration_error(p_chosen)  # (chosen, rejected) order, labels all 1
    b = cal.expected_calibration_error(p_first, first_won.astype(float))  # drawn order
    assert a == pytest.approx(b, abs=1e-12)
    assert a == pytest.approx(_ece_loops(p_chosen, np.ones(n), 10), abs=1e-12)
    bins = cal.reliability_bins(p_chosen)
    # The symmetrised diagram is symmetric about (0.5, 0.5).
    np.testing.assert_array_equal(bins.count_B, bins.count_B[::-1])
    np.testing.assert_allclose(bins.freq_B, 1 - bins.freq_B[::-1], atol=1e-12)
    assert bins.count_B.sum() == 2 * n


def test_overconfident_tiny_example_by_hand():
    # 85% sure on every pair, right on 3 of 4. Symmetrised: bin 8 holds 0.85 x4 with labels 1,1,1,0
    # (frequency 0.75), bin 1 holds 0.15 x4 with labels 1,0,0,0 (0.25); ECE = 0.5*0.1 + 0.5*0.1.
    # (Values mid-bin: 1 - 0.9 rounds below 0.1 and would change bins.)
    p = np.array([0.85, 0.85, 0.15, 0.85])
    assert cal.expected_calibration_error(p) == pytest.approx(0.1, abs=1e-12)
    rows = cal.reliability_bins(p).as_rows()
    assert rows[8] == pytest.approx((0.85, 0.75, 4))
    assert rows[1] == pytest.approx((0.15, 0.25, 4))
    assert all(c == 0 for i, (_, _, c) in enumerate(rows) if i not in (1, 8))
    assert cal.expected_calibration_error(p, symmetrise=False) == pytest.approx(
        (3 * (1 - 0.85) + (1 - 0.15)) / 4, abs=1e-12)


def test_coin_flip_predictions_are_calibrated():
    # p = 0.5 on every pair: both orientations share the 0.5 bin, whose frequency is 1/2.
    assert cal.expected_calibration_error(np.full(7, 0.5)) == 0.0


def test_overconfident_large_ece_matches_loops():
    rng = np.random.default_rng(2)
    n = 4000
    p_true = rng.random(n)
    won = rng.random(n) < p_true
    logit = np.log(p_true / (1 - p_true))
    p_over = 1 / (1 + np.exp(-4 * logit))  # four times too sharp
    p_chosen = np.where(won, p_over, 1 - p_over)
    ece = cal.expected_calibration_error(p_chosen)
    assert ece == pytest.approx(_ece_loops(p_chosen, np.ones(n), 10), abs=1e-12)
    assert ece > 0.1
    calibrated = cal.expected_calibration_error(np.where(won, p_true, 1 - p_true))
    assert ece > calibrated + 0.08


def test_mean_abs_error_to_truth():
    assert cal.mean_abs_error_to_truth(np.array([0.2, 0.9]), np.array([0.5, 0.8])) == pytest.approx(0.2)
    assert np.isnan(cal.mean_abs_error_to_truth(np.array([np.nan, 0.9]), np.array([0.5, 0.8])))


def test_accuracy_by_sigma_quantile_crafted():
    # sigma = 1..8 (sigma_r = 0): quartile edges 2.75, 4.5, 6.25, 8 -> {1,2}, {3,4}, {5,6}, {7,8}.
    diff = np.array([1, 1, 1, -1, 0, -1, -1, -1], np.float64)
    s = _scores(diff, np.zeros(8), np.arange(1, 9), np.zeros(8))
    out = cal.accuracy_by_sigma_quantile(s, 4)
    assert [e for e, _, _ in out] == pytest.approx([2.75, 4.5, 6.25, 8.0])
    assert [a for _, a, _ in out] == pytest.approx([1.0, 0.5, 0.25, 0.0])  # the tie counts one half
    assert [c for _, _, c in out] == [2, 2, 2, 2]
    # A constant sigma (a baseline): everything in the first quantile.
    base = cal.accuracy_by_sigma_quantile(_scores(diff, np.zeros(8), np.zeros(8), np.zeros(8)), 4)
    assert base[0][1:] == pytest.approx((3.5 / 8, 8)) and all(c == 0 for _, _, c in base[1:])


def test_calibration_metrics_keys_and_baseline():
    rng = np.random.default_rng(3)
    n = 400
    s = _scores(rng.normal(size=n), rng.normal(size=n), rng.random(n) + 0.1, rng.random(n) + 0.1)
    m = cal.calibration_metrics(s, p_true_N=np.full(n, 0.5))
    assert {"ece", "mae_to_truth", "calib_pairs", "acc_sigma_q1", "acc_sigma_q4"} <= set(m)
    assert m["ece"] == pytest.approx(cal.expected_calibration_error(cal.preference_probability(s)))
    assert m["calib_pairs"] == n
    base = cal.calibration_metrics(_scores(s["score_c"], s["score_r"], np.zeros(n), np.zeros(n)))
    assert base["calib_pairs"] == 0 and "ece" not in base


def test_plot_reliability_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(4)
    path = cal.plot_reliability(cal.reliability_bins(rng.random(500)), str(tmp_path / "rel.png"), "test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
