"""Best-of-N from one pool of K samples per prompt, by order statistics (policy.md "Best-of-N").

For a prompt with K samples sorted by a proxy reward (ascending; ties broken by sample index), the
best of a uniformly random N-subset is the i-th smallest with probability C(i-1, N-1) / C(K, N), so
E[gold(BoN_N)] = sum_{i=N..K} C(i-1, N-1) / C(K, N) * gold(x_(i)): the whole curve N = 1..K from one
pool, with no subsampling noise. Two reward models choosing from the same random subset are compared
exactly too (`pairwise_choice_probs`). The x-axis KL_bon = log N - (N-1)/N is an upper bound on the
KL of Best-of-N to the sampling policy (Beirami et al. 2024).
"""
from __future__ import annotations

import math

import numpy as np


def kl_bound(n: int) -> float:
    """log N - (N-1)/N: the upper bound on KL(BoN_N || policy)."""
    return math.log(n) - (n - 1) / n


def _log_comb(n, k):
    """log C(n, k) elementwise for integer arrays (-inf where k < 0 or k > n), from a log-factorial table."""
    n, k = np.asarray(n, np.int64), np.asarray(k, np.int64)
    top = int(max(n.max(initial=0), 1))
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1, dtype=np.float64)))])
    ok = (k >= 0) & (k <= n)
    kk, nk = np.where(ok, k, 0), np.where(ok, n - k, 0)
    return np.where(ok, log_fact[n] - log_fact[kk] - log_fact[nk], -np.inf)


def _ranks(proxy_K: np.ndarray) -> np.ndarray:
    """rank[k] in 0..K-1 of each sample by proxy (ties: the higher index ranks higher)."""
    order = np.lexsort((np.arange(proxy_K.size), proxy_K))
    ranks = np.empty(proxy_K.size, np.int64)
    ranks[order] = np.arange(proxy_K.size)
    return ranks


def choice_probs(proxy_K: np.ndarray, n: int) -> np.ndarray:
    """[K] probability that each sample is the proxy's choice from a uniform random N-subset."""
    k = proxy_K.size
    if not 1 <= n <= k:
        raise ValueError(f"Best-of-N needs 1 <= N <= K; got N={n} with K={k} samples per prompt")
    r = _ranks(np.asarray(proxy_K, np.float64))
    return np.exp(_log_comb(r, n - 1) - _log_comb(k, n))


def best_of_n_curve(gold_PxK: np.ndarray, proxy_PxK: np.ndarray, ns) -> dict:
    """E[gold] and E[proxy] of Best-of-N for each N, averaged over prompts.

    Args:
      gold_PxK: gold rewards of K samples for each of P prompts.
      proxy_PxK: the reward model's scores of the same samples.
      ns: the N values (each 1..K).

    Returns:
      {"n", "kl_bound", "gold", "gold_se", "proxy"}: lists over ns (gold_se over prompts).
    """
    gold_PxK, proxy_PxK = np.asarray(gold_PxK, np.float64), np.asarray(proxy_PxK, np.float64)
    if gold_PxK.shape != proxy_PxK.shape or gold_PxK.ndim != 2:
        raise ValueError(f"gold {gold_PxK.shape} and proxy {proxy_PxK.shape} must both be [prompts, K]")
    out = {"n": [], "kl_bound": [], "gold": [], "gold_se": [], "proxy": []}
    for n in ns:
        w_PxK = np.stack([choice_probs(p, n) for p in proxy_PxK])
        g_P, q_P = (w_PxK * gold_PxK).sum(1), (w_PxK * proxy_PxK).sum(1)
        out["n"].append(int(n))
        out["kl_bound"].append(kl_bound(n))
        out["gold"].append(float(g_P.mean()))
        out["gold_se"].append(float(g_P.std(ddof=1) / np.sqrt(g_P.size)) if g_P.size > 1 else 0.0)
        out["proxy"].append(float(q_P.mean()))
    return out


def pairwise_choice_probs(proxy_a_K: np.ndarray, proxy_b_K: np.ndarray, n: int) -> np.ndarray:
    """[K, K] P(model a chooses sample i and model b chooses sample j) from one random N-subset.

    i == j: S holds i and N-1 samples below i under both models. i != j: i is above j under a, j above
    i under b, and S holds both plus N-2 samples below i under a and below j under b.
    """
    k = proxy_a_K.size
    if not 1 <= n <= k:
        raise ValueError(f"Best-of-N needs 1 <= N <= K; got N={n} with K={k} samples per prompt")
    ra, rb = _ranks(np.asarray(proxy_a_K, np.float64)), _ranks(np.asarray(proxy_b_K, np.float64))
    below_a = (ra[:, None] < ra[None, :]).astype(np.int64)  # [k, i]: k ranks below i under a
    below_b = (rb[:, None] < rb[None, :]).astype(np.int64)
    count = below_a.T @ below_b  # [i, j]: samples below i under a and below j under b (i, j excluded)
    log_total = _log_comb(k, n)
    same = np.exp(_log_comb(np.diag(count), n - 1) - log_total)
    cross = (ra[:, None] > ra[None, :]) & (rb[None, :] > rb[:, None])  # i over j under a, j over i under b
    probs = np.where(cross, np.exp(_log_comb(count, n - 2) - log_total), 0.0)
    probs[np.diag_indices(k)] = same
    return probs


def head_to_head(gold_PxK: np.ndarray, proxy_a_PxK: np.ndarray, proxy_b_PxK: np.ndarray, ns, *, tau: float) -> dict:
    """Win / tie / lose of reward model a's Best-of-N choice against b's, both choosing from the same
    random N-subset of each prompt's pool; gold(a's pick) - gold(b's pick) > tau is a win.

    Returns:
      {"n", "win", "tie", "lose"}: lists over ns, averaged over prompts.
    """
    if tau < 0:
        raise ValueError(f"tie threshold tau={tau} must be >= 0")
    out = {"n": [], "win": [], "tie": [], "lose": []}
    for n in ns:
        win = lose = 0.0
        for g, a, b in zip(np.asarray(gold_PxK, np.float64), proxy_a_PxK, proxy_b_PxK):
            p = pairwise_choice_probs(np.asarray(a), np.asarray(b), n)
            d = g[:, None] - g[None, :]
            win += float(p[d > tau].sum())
            lose += float(p[d < -tau].sum())
        m = len(gold_PxK)
        out["n"].append(int(n))
        out["win"].append(win / m)
        out["lose"].append(lose / m)
        out["tie"].append(1.0 - (win + lose) / m)
    return out
