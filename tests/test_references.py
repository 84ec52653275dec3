"""Reference rows without a network: logistic regression on counts, length heuristics."""
import dataclasses

import numpy as np
import pytest

from ava_jax.data import PairArrays, SeqArrays
from ava_jax.data import synthetic as syn
from ava_jax.eval import references as ref


def test_logistic_regression_recovers_planted_weights():
    rng = np.random.default_rng(0)
    n, f = 20_000, 5
    w_true = np.array([1.5, -2.0, 0.0, 0.5, 1.0])
    x = rng.normal(size=(n, f))
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
    w = ref.fit_logistic_regression(x, y, l2=1e-3)
    np.testing.assert_allclose(w, w_true, atol=0.1)
    # The gradient used by L-BFGS is the loss's: the fit is a stationary point of the float64 objective.
    m = (2 * y - 1) * (x @ w)
    grad = -(((2 * y - 1) / (1 + np.exp(m)))[:, None] * x).sum(0) + 1e-3 * w
    assert np.max(np.abs(grad)) / n < 1e-6


def test_pair_regression_flip_does_not_change_the_fit_and_learns():
    rng = np.random.default_rng(1)
    w_true = np.array([2.0, -1.0, 0.0])
    d = rng.normal(size=(3000, 3))
    p_first = 1 / (1 + np.exp(-d @ w_true))
    first_won = rng.random(3000) < p_first
    fdiff = np.where(first_won[:, None], d, -d)  # f(chosen) - f(rejected)
    acc, w = ref.pair_logistic_regression(fdiff[:2000], fdiff[2000:], l2=1.0, seed=0)
    _, w_other = ref.pair_logistic_regression(fdiff[:2000], fdiff[2000:], l2=1.0, seed=7)
    np.testing.assert_allclose(w, w_other, atol=1e-5)
    bayes = np.mean(np.maximum(p_first[2000:], 1 - p_first[2000:]))
    assert acc > bayes - 0.04, (acc, bayes)
    assert np.corrcoef(w, w_true)[0, 1] > 0.99


def test_bigram_features_by_hand():
    # [BOS, p1=5, p2=3 | y1=5, y2=4, EOS, pad]: transitions (3,5), (5,4), (4,EOS); target = 5 hit once.
    v = 6
    tokens = np.array([[0, 5, 3, 5, 4, 1, 1]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)
    f = ref.bigram_features(tokens, mask, np.array([3]), v)
    want = np.zeros(v * v + 1)
    want[[3 * v + 5, 5 * v + 4, 4 * v + 1]] = 1
    want[-1] = 1
    np.testing.assert_array_equal(f[0], want)


def test_bigram_features_span_the_true_return():
    cfg = syn.SyntheticConfig(num_examples=64)
    p = syn.make_preference_dataset(cfg)
    w = np.concatenate([p.task.w_VxV.ravel(), [cfg.target_bonus]])
    f = ref.bigram_features(p.chosen_tokens_NxT, p.chosen_mask_NxT, p.chosen_prompt_len_N, cfg.vocab_size)
    eos_cols = np.arange(cfg.vocab_size) * cfg.vocab_size + syn.EOS_ID  # the final EOS transition is worth 0
    w[eos_cols] = 0.0
    np.testing.assert_allclose(f @ w, p.chosen_return_N, atol=1e-9)


def test_bigram_logistic_regression_beats_70_percent():
    base = syn.SyntheticConfig()
    train = syn.make_preference_dataset(dataclasses.replace(base, num_examples=2048, data_seed=0))
    test = syn.make_preference_dataset(dataclasses.replace(base, num_examples=2048, data_seed=1))
    acc = ref.bigram_logistic_regression(train, test)
    assert 0.70 < acc <= test.bayes_optimal_accuracy + 0.03, (acc, test.bayes_optimal_accuracy)


def _arrays(chosen, rejected, prompt_len=2):
    def side(rows):
        return SeqArrays(tokens=tuple(np.asarray(r, np.int32) for r in rows),
                         prompt_len_N=np.full(len(rows), prompt_len, np.int32),
                         line_N=np.arange(1, len(rows) + 1, dtype=np.int32), max_len=16)
    return PairArrays(chosen=side(chosen), rejected=side(rejected))


def test_length_heuristics_crafted():
    eos = 1
    # Response lengths without the final EOS (prompt = 2 tokens):
    #   pair 0: chosen 2 (EOS), rejected 4 (EOS)  -> shorter right, EOS tie
    #   pair 1: chosen 3 (EOS), rejected 3 (none) -> length tie, EOS right
    #   pair 2: chosen 5 (none), rejected 1 (EOS) -> shorter wrong, EOS wrong
    #   pair 3: chosen 1 (none), rejected 2 (none)-> shorter right, EOS tie
    chosen = [[0, 7, 3, 4, 1], [0, 7, 3, 4, 5, 1], [0, 7, 3, 4, 5, 6, 3], [0, 7, 9]]
    rejected = [[0, 7, 3, 4, 5, 6, 1], [0, 7, 3, 4, 5], [0, 7, 8, 1], [0, 7, 9, 9]]
    h = ref.length_heuristics(_arrays(chosen, rejected), eos)
    assert h["shorter_wins"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert h["longer_wins"] == pytest.approx(1 - h["shorter_wins"])
    assert h["ends_with_eos_wins"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert h["both_eos_pairs"] == 1


def test_unigram_logistic_regression_learns_a_token_preference():
    # The chosen response contains the "good" token 5 more often than the rejected one.
    rng = np.random.default_rng(2)

    def draw(n):
        chosen, rejected = [], []
        for _ in range(n):
            good = rng.random() < 0.9
            a = [0, 2] + list(rng.integers(2, 8, 4)) + [5, 1]
            b = [0, 2] + list(rng.integers(2, 8, 4)) + [6, 1]
            chosen.append(a if good else b)
            rejected.append(b if good else a)
        return _arrays(chosen, rejected)

    acc = ref.unigram_logistic_regression(draw(600), draw(400), vocab_size=10)
    assert acc > 0.8, acc
