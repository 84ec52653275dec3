"""Reference rows that need no neural network: logistic regression on count features, length heuristics.

On the synthetic task the true return is linear in bigram counts,
    R*(y) = sum_t W[prev_t, a_t] + target_bonus * #{t : a_t = target}
(see `ava_jax.data.synthetic`), and labels are Bradley-Terry on R* / bt_temperature, so a logistic
regression on the difference of (prev, action) counts plus target-hit counts is the well-specified
model: with enough pairs it reaches the Bayes ceiling. It tells how much of the gap between a
reward model and the ceiling is the network's and how much is the data's. On real text the
unigram variant (bag of response tokens) and the length heuristics are the usual sanity rows.
"""
from __future__ import annotations

import numpy as np
from scipy import optimize, sparse

from ava_jax.data import synthetic as syn


def _pairwise_accuracy(margin_N: np.ndarray) -> float:
    """Share of margins > 0; exact ties count one half (as `synthetic.pairwise_accuracy`)."""
    return float(np.mean((margin_N > 0) + 0.5 * (margin_N == 0)))


def fit_logistic_regression(x_NxF, y_N: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """L2-regularised logistic regression without intercept, by L-BFGS with the analytic gradient.

    Minimises sum_i log(1 + exp(-s_i w.x_i)) + l2 / 2 |w|^2 with s_i = 2 y_i - 1, i.e. the MAP
    estimate under a N(0, 1 / l2) prior on each weight (the objective is divided by N for the
    optimiser; the minimiser is the same).

    Args:
      x_NxF: [N, F] features, a dense array or a scipy.sparse matrix.
      y_N: [N] labels in {0, 1}.
      l2: prior precision (> 0 keeps the problem strictly convex).

    Returns:
      w_F: float64 weights.
    """
    y_N = np.asarray(y_N, np.float64)
    s_N = 2.0 * y_N - 1.0
    n, f = x_NxF.shape
    if y_N.shape != (n,):
        raise ValueError(f"y_N {y_N.shape} does not match x_NxF {x_NxF.shape}")
    x_NxF = x_NxF.tocsr() if sparse.issparse(x_NxF) else np.asarray(x_NxF, np.float64)

    def objective(w_F):
        m_N = s_N * (x_NxF @ w_F)
        loss = np.sum(np.logaddexp(0.0, -m_N)) + 0.5 * l2 * np.dot(w_F, w_F)
        # d/dm log(1 + e^-m) = -sigmoid(-m); sigmoid in tanh form does not overflow.
        g_N = -s_N * 0.5 * (1.0 + np.tanh(-0.5 * m_N))
        grad_F = np.asarray(x_NxF.T @ g_N).ravel() + l2 * w_F
        return loss / n, grad_F / n

    res = optimize.minimize(objective, np.zeros(f), jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "gtol": 1e-10, "ftol": 1e-14})
    if not res.success and res.status != 1:  # status 1: iteration limit, still a usable fit
        raise RuntimeError(f"logistic regression did not converge: {res.message}")
    return res.x


def pair_logistic_regression(fdiff_train_NxF, fdiff_test_MxF, l2: float = 1.0, seed: int = 0):
    """Fits on feature differences f(chosen) - f(rejected) and scores the test pairs.

    Half of the training pairs (chosen at random, `seed`) are flipped, features and label, so the
    data set has both classes: with every label 1, a model with a bias term would learn "the first
    side wins" and nothing else. Without an intercept, as here, a flipped pair's loss equals the
    unflipped one's, so the fit does not depend on the flip (a check the tests make).

    Args:
      fdiff_train_NxF: [N, F] training differences (dense or scipy.sparse).
      fdiff_test_MxF: [M, F] test differences.
      l2: prior precision, see `fit_logistic_regression`.
      seed: the flip's seed.

    Returns:
      (test accuracy, w_F): accuracy is the share of test pairs with w.(f(c) - f(r)) > 0, ties one half.
    """
    n = fdiff_train_NxF.shape[0]
    rng = np.random.default_rng(seed)
    sign_N = np.ones(n)
    sign_N[rng.permutation(n)[: n // 2]] = -1.0
    if sparse.issparse(fdiff_train_NxF):
        x_NxF = sparse.diags(sign_N) @ fdiff_train_NxF
    else:
        x_NxF = sign_N[:, None] * np.asarray(fdiff_train_NxF, np.float64)
    w_F = fit_logistic_regression(x_NxF, (sign_N > 0).astype(np.float64), l2)
    return _pairwise_accuracy(np.asarray(fdiff_test_MxF @ w_F).ravel()), w_F


def bigram_features(tokens_NxT: np.ndarray, mask_NxT: np.ndarray, prompt_len_N: np.ndarray,
                    vocab_size: int) -> np.ndarray:
    """Counts of (previous token, action) over response transitions, then the count of action == target.

    A response transition is a real (mask) position t >= prompt_len (the EOS included); its previous
    token is token t - 1, so the first response token's is the last prompt token. target = tokens[:, 1]
    as in `synthetic.true_token_rewards`. Column prev * V + action, then one target column.

    Args:
      tokens_NxT: [N, T] token ids (right padded).
      mask_NxT: [N, T] real positions.
      prompt_len_N: [N] prompt tokens, BOS included.
      vocab_size: V.

    Returns:
      f_NxF: float64 [N, V * V + 1].
    """
    tokens_NxT = np.asarray(tokens_NxT, np.int64)
    n, t = tokens_NxT.shape
    pos_1xT = np.arange(t)[None, :]
    resp_NxT = np.asarray(mask_NxT, bool) & (pos_1xT >= np.asarray(prompt_len_N)[:, None]) & (pos_1xT >= 1)
    prev_NxT = np.concatenate([tokens_NxT[:, :1], tokens_NxT[:, :-1]], axis=1)
    n_feat = vocab_size * vocab_size + 1
    rows_N1 = np.arange(n)[:, None] * n_feat
    pair_idx = (rows_N1 + prev_NxT * vocab_size + tokens_NxT)[resp_NxT]
    hit_idx = np.broadcast_to(rows_N1 + n_feat - 1, (n, t))[resp_NxT & (tokens_NxT == tokens_NxT[:, 1:2])]
    counts = np.bincount(np.concatenate([pair_idx, hit_idx]), minlength=n * n_feat)
    return counts.reshape(n, n_feat).astype(np.float64)


def _bigram_diff(prefs: syn.SyntheticPreferences) -> np.ndarray:
    v = prefs.task.cfg.vocab_size
    return (bigram_features(prefs.chosen_tokens_NxT, prefs.chosen_mask_NxT, prefs.chosen_prompt_len_N, v)
            - bigram_features(prefs.rejected_tokens_NxT, prefs.rejected_mask_NxT, prefs.rejected_prompt_len_N, v))


def bigram_logistic_regression(train_prefs: syn.SyntheticPreferences, test_prefs: syn.SyntheticPreferences,
                               l2: float = 1.0, seed: int = 0) -> float:
    """Test accuracy of logistic regression on bigram + target-hit count differences (synthetic task).

    The features span the true return exactly (up to the EOS transitions, whose true weight is 0), so
    this is the well-specified model of the Bradley-Terry labels; l2 = 1 is a N(0, 1) prior on
    W / bt_temperature and target_bonus / bt_temperature.

    Args:
      train_prefs: pairs to fit on.
      test_prefs: pairs to score (same task: same vocabulary and seed).
      l2: prior precision.
      seed: seed of the random orientation flip.

    Returns:
      Test accuracy, ties counted one half.
    """
    if train_prefs.task.cfg.vocab_size != test_prefs.task.cfg.vocab_size:
        raise ValueError("train and test pairs come from tasks with different vocabularies")
    return pair_logistic_regression(_bigram_diff(train_prefs), _bigram_diff(test_prefs), l2, seed)[0]


def _response_ids(seqs) -> tuple[np.ndarray, np.ndarray]:
    """(row index, token id) of every response token of a SeqArrays-like object."""
    resp = [np.asarray(t[int(p):], np.int64) for t, p in zip(seqs.tokens, seqs.prompt_len_N)]
    rows = np.repeat(np.arange(len(resp)), [len(r) for r in resp])
    ids = np.concatenate(resp) if resp else np.zeros((0,), np.int64)
    return rows, ids


def unigram_features(seqs, vocab_size: int) -> sparse.csr_matrix:
    """Bag of response tokens (EOS included): counts of each id after the prompt, as a sparse [N, V] matrix.

    Args:
      seqs: SeqArrays-like (tokens tuple of int arrays, prompt_len_N).
      vocab_size: V; every id must be below it.

    Returns:
      scipy.sparse CSR float64 [N, V].
    """
    rows, ids = _response_ids(seqs)
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(f"token id {ids.max()} >= vocab_size={vocab_size}")
    return sparse.csr_matrix((np.ones(ids.size), (rows, ids)), shape=(len(seqs.tokens), vocab_size))


def unigram_logistic_regression(train_arrays, test_arrays, vocab_size: int | None = None, l2: float = 1.0,
                                seed: int = 0) -> float:
    """Test accuracy of logistic regression on bag-of-response-token count differences (any PairArrays).

    Args:
      train_arrays: PairArrays-like (chosen/rejected SeqArrays) to fit on.
      test_arrays: PairArrays-like to score.
      vocab_size: V (default: 1 + the largest id in either set).
      l2: prior precision.
      seed: seed of the random orientation flip.

    Returns:
      Test accuracy, ties counted one half.
    """
    sides = (train_arrays.chosen, train_arrays.rejected, test_arrays.chosen, test_arrays.rejected)
    if vocab_size is None:
        vocab_size = 1 + max(int(_response_ids(s)[1].max(initial=0)) for s in sides)
    fc, fr, tc, tr = (unigram_features(s, vocab_size) for s in sides)
    return pair_logistic_regression(fc - fr, tc - tr, l2, seed)[0]


def length_heuristics(arrays, eos_id: int) -> dict[str, float]:
    """Accuracy of "the shorter / longer response wins" and "the response that ends with EOS wins".

    Response length counts the tokens after the prompt, a final EOS excluded (so length and
    completeness are separate signals). Ties (equal lengths; both or neither ending with EOS) count
    one half, so shorter_wins + longer_wins = 1.

    Args:
      arrays: PairArrays-like (chosen/rejected with tokens tuple and prompt_len_N).
      eos_id: the end-of-sequence id.

    Returns:
      {"shorter_wins", "longer_wins", "ends_with_eos_wins": accuracies, "both_eos_pairs": count}.
    """
    def side(seqs):
        eos = np.asarray([len(t) > int(p) and int(t[-1]) == eos_id for t, p in zip(seqs.tokens, seqs.prompt_len_N)])
        length = np.asarray([len(t) - int(p) for t, p in zip(seqs.tokens, seqs.prompt_len_N)]) - eos
        return length.astype(np.float64), eos.astype(np.float64)

    if len(arrays.chosen.tokens) == 0:
        raise ValueError("length_heuristics: no pairs")
    len_c, eos_c = side(arrays.chosen)
    len_r, eos_r = side(arrays.rejected)
    return {"shorter_wins": _pairwise_accuracy(len_r - len_c), "longer_wins": _pairwise_accuracy(len_c - len_r),
            "ends_with_eos_wins": _pairwise_accuracy(eos_c - eos_r), "both_eos_pairs": float(np.sum(eos_c * eos_r))}
