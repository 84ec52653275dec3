"""The Best-of-N order-statistics estimator and head-to-head choice probabilities against brute force."""
import itertools
import math

import numpy as np
import pytest

from ava_jax.eval.best_of_n import best_of_n_curve, choice_probs, head_to_head, kl_bound, pairwise_choice_probs


def _pick(proxy, subset):
    """The brute-force choice: the subset's highest proxy, ties to the higher index."""
    return max(subset, key=lambda i: (proxy[i], i))


@pytest.mark.parametrize("ties", [False, True])
def test_estimator_equals_enumeration_of_all_subsets(ties):
    rng = np.random.default_rng(0)
    K = 7
    gold = rng.normal(size=(3, K))
    proxy = rng.integers(0, 3, (3, K)).astype(float) if ties else gold + rng.normal(size=(3, K))
    curve = best_of_n_curve(gold, proxy, range(1, K + 1))
    for n in range(1, K + 1):
        brute = np.mean([np.mean([gold[p, _pick(proxy[p], s)] for s in itertools.combinations(range(K), n)])
                         for p in range(3)])
        assert curve["gold"][n - 1] == pytest.approx(brute, abs=1e-12)
        for p in range(3):
            counts = np.zeros(K)
            for s in itertools.combinations(range(K), n):
                counts[_pick(proxy[p], s)] += 1
            np.testing.assert_allclose(choice_probs(proxy[p], n), counts / math.comb(K, n), atol=1e-12)
    assert curve["gold"][0] == pytest.approx(gold.mean())  # N = 1: the policy itself
    assert curve["kl_bound"][0] == 0.0 and curve["kl_bound"][3] == pytest.approx(math.log(4) - 0.75)
    assert kl_bound(K) < math.log(K)


@pytest.mark.parametrize("ties", [False, True])
def test_head_to_head_equals_enumeration(ties):
    rng = np.random.default_rng(1)
    K = 6
    gold = rng.integers(0, 3, K).astype(float)  # gold ties too, so tau matters
    a = rng.integers(0, 3, K).astype(float) if ties else rng.normal(size=K)
    b = rng.integers(0, 3, K).astype(float) if ties else rng.normal(size=K)
    for n in range(1, K + 1):
        joint = np.zeros((K, K))
        subsets = list(itertools.combinations(range(K), n))
        for s in subsets:
            joint[_pick(a, s), _pick(b, s)] += 1 / len(subsets)
        np.testing.assert_allclose(pairwise_choice_probs(a, b, n), joint, atol=1e-12)
        h = head_to_head(gold[None], a[None], b[None], [n], tau=0.5)
        d = gold[:, None] - gold[None, :]
        assert h["win"][0] == pytest.approx(joint[d > 0.5].sum(), abs=1e-12)
        assert h["lose"][0] == pytest.approx(joint[d < -0.5].sum(), abs=1e-12)
        assert h["win"][0] + h["tie"][0] + h["lose"][0] == pytest.approx(1.0)


def test_n_larger_than_the_pool_is_an_error():
    with pytest.raises(ValueError, match="N=5 with K=4"):
        choice_probs(np.zeros(4), 5)
    with pytest.raises(ValueError, match="N=5 with K=4"):
        best_of_n_curve(np.zeros((2, 4)), np.zeros((2, 4)), [5])
