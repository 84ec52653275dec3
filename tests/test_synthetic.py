"""Synthetic token MDP: layout, exact soft-optimal expert, Bradley-Terry labels, metrics."""
import itertools

import numpy as np
import pytest

from ava_jax.data import synthetic as syn

TINY = syn.SyntheticConfig(vocab_size=5, prompt_len=2, response_len=3, temperature=0.7, num_examples=64)


def _logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="bt_temperature"):
        syn.SyntheticConfig(bt_temperature=0.0)
    with pytest.raises(ValueError, match="min_prompt_len"):
        syn.SyntheticConfig(prompt_len=3, min_prompt_len=4)


def test_deterministic_by_seed_and_task_shared_across_data_seeds():
    cfg = syn.SyntheticConfig(num_examples=32, min_prompt_len=2)
    a, b = syn.make_preference_dataset(cfg), syn.make_preference_dataset(cfg)
    for field in ("chosen_tokens_NxT", "rejected_tokens_NxT", "chosen_true_reward_NxT", "first_won_N"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(syn.make_demonstrations(cfg).tokens_NxT, syn.make_demonstrations(cfg).tokens_NxT)
    other_data = syn.make_preference_dataset(syn.SyntheticConfig(num_examples=32, min_prompt_len=2, data_seed=1))
    np.testing.assert_array_equal(other_data.task.w_VxV, a.task.w_VxV)  # held-out split, same reward
    assert not np.array_equal(other_data.chosen_tokens_NxT, a.chosen_tokens_NxT)
    other_task = syn.make_task(syn.SyntheticConfig(seed=1))
    assert not np.allclose(other_task.w_VxV, a.task.w_VxV)


@pytest.mark.parametrize("maker", [syn.make_preference_dataset, syn.make_demonstrations])
def test_layout_right_padding_and_reward_alignment(maker):
    cfg = syn.SyntheticConfig(num_examples=200, prompt_len=5, min_prompt_len=1)
    data = maker(cfg)
    if maker is syn.make_preference_dataset:
        np.testing.assert_array_equal(data.chosen_prompt_len_N, data.rejected_prompt_len_N)
        np.testing.assert_array_equal(data.chosen_tokens_NxT[:, :2], data.rejected_tokens_NxT[:, :2])
        sides = [(data.chosen_tokens_NxT, data.chosen_mask_NxT, data.chosen_prompt_len_N,
                  data.chosen_true_reward_NxT, data.chosen_return_N),
                 (data.rejected_tokens_NxT, data.rejected_mask_NxT, data.rejected_prompt_len_N,
                  data.rejected_true_reward_NxT, data.rejected_return_N)]
    else:
        sides = [(data.tokens_NxT, data.mask_NxT, data.prompt_len_N, data.true_reward_NxT, data.return_N)]
    h, w_VxV = cfg.response_len, data.task.w_VxV
    for tokens_NxT, mask_NxT, plen_N, reward_NxT, ret_N in sides:
        assert tokens_NxT.dtype == np.int32 and mask_NxT.dtype == bool
        assert tokens_NxT.shape == (cfg.num_examples, cfg.seq_len)
        assert len(np.unique(plen_N)) > 1  # variable prompts really exercise padding
        np.testing.assert_array_equal(data.target_N, tokens_NxT[:, 1])
        for n in range(cfg.num_examples):
            p = plen_N[n]
            assert tokens_NxT[n, 0] == syn.BOS_ID
            assert np.all(tokens_NxT[n, 1:p + h] >= syn.FIRST_CONTENT_ID)
            assert tokens_NxT[n, p + h] == syn.EOS_ID
            np.testing.assert_array_equal(mask_NxT[n], np.arange(cfg.seq_len) < p + h + 1)
            np.testing.assert_array_equal(tokens_NxT[n, ~mask_NxT[n]], syn.EOS_ID)  # pad == eos
            assert np.all(reward_NxT[n, :p] == 0) and np.all(reward_NxT[n, p + h:] == 0)
            # Reward of the first response token: the transition from the last prompt token.
            a, prev = tokens_NxT[n, p], tokens_NxT[n, p - 1]
            expected = w_VxV[prev, a] + cfg.target_bonus * (a == tokens_NxT[n, 1])
            np.testing.assert_allclose(reward_NxT[n, p], expected, rtol=1e-6)
        np.testing.assert_allclose(reward_NxT.sum(1), ret_N, rtol=1e-5, atol=1e-5)


def test_true_token_rewards_penalises_early_eos_and_bos():
    task = syn.make_task(TINY)
    tokens_1xT = np.array([[0, 2, 3, 4, 1, 0, 1]])
    mask_1xT = np.ones_like(tokens_1xT, bool)
    r_1xT = syn.true_token_rewards(task, tokens_1xT, mask_1xT, np.array([3]))
    np.testing.assert_allclose(r_1xT[0, :3], 0.0)
    np.testing.assert_allclose(r_1xT[0, 3], task.w_VxV[3, 4])
    np.testing.assert_allclose(r_1xT[0, 4:6], TINY.invalid_reward)  # EOS at response index 1 < H, BOS
    assert r_1xT[0, 6] == 0.0  # EOS at response index H ends the episode at no cost
    # The prompt term: action 3 equals the first prompt content token (tokens[:, 1]) and earns the bonus.
    r_bonus = syn.true_token_rewards(task, np.array([[0, 3, 2, 3]]), np.ones((1, 4), bool), np.array([3]))
    np.testing.assert_allclose(r_bonus[0, 3], task.w_VxV[2, 3] + TINY.target_bonus)


def _brute_force_returns(task, g, prev, horizon):
    r_GxKxK = task.content_reward_GxKxK()
    seqs = list(itertools.product(range(task.cfg.num_content), repeat=horizon))
    rets = []
    for seq in seqs:
        prevs = (prev,) + seq[:-1]
        rets.append(sum(r_GxKxK[g, p, a] for p, a in zip(prevs, seq)))
    return seqs, np.array(rets)


def test_soft_values_match_brute_force_enumeration():
    task, tau, h = syn.make_task(TINY), TINY.temperature, TINY.response_len
    v_Hp1xGxK, logpi_HxGxKxK = syn.soft_value_iteration(task, tau)
    k = TINY.num_content
    for g, prev in itertools.product(range(k), range(k)):
        # V_t(prev) = tau * log sum over all remaining suffixes exp(R_suffix / tau), for every t.
        for t in range(h):
            _, rets = _brute_force_returns(task, g, prev, h - t)
            np.testing.assert_allclose(v_Hp1xGxK[t, g, prev], tau * _logsumexp(rets / tau), rtol=1e-10)
        # The Boltzmann policy's full-sequence probabilities are softmax(R* / tau).
        seqs, rets = _brute_force_returns(task, g, prev, h)
        target_p = np.exp(rets / tau - _logsumexp(rets / tau))
        policy_p = []
        for seq in seqs:
            prevs = (prev,) + seq[:-1]
            policy_p.append(np.exp(sum(logpi_HxGxKxK[t, g, p, a] for t, (p, a) in enumerate(zip(prevs, seq)))))
        np.testing.assert_allclose(policy_p, target_p, rtol=1e-9)
        assert target_p.max() > 2 * target_p.min()  # not uniform: the check has teeth


def test_demonstration_logprobs_equal_return_minus_soft_value():
    demos = syn.make_demonstrations(TINY)
    v_Hp1xGxK, _ = syn.soft_value_iteration(demos.task, TINY.temperature)
    g_N = demos.target_N - syn.FIRST_CONTENT_ID
    prev_N = demos.tokens_NxT[np.arange(TINY.num_examples), demos.prompt_len_N - 1] - syn.FIRST_CONTENT_ID
    expected_N = (demos.return_N - v_Hp1xGxK[0, g_N, prev_N]) / TINY.temperature
    np.testing.assert_allclose(demos.expert_logprob_NxT.sum(1), expected_N, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", [0.0, 0.3])
def test_sampled_sequence_frequencies_match_policy(mix):
    # Tiny MDP: 9 prompt states x 27 responses; chi-square of the empirical counts of whole responses
    # against the exact sequence probabilities of the (mixed) Boltzmann policy.
    task, n = syn.make_task(TINY), 50_000
    _, logpi_HxGxKxK = syn.soft_value_iteration(task, TINY.temperature)
    rng = np.random.default_rng(1)
    g_N, prev_N = rng.integers(0, 3, n), rng.integers(0, 3, n)
    actions_NxH, logprob_NxH = syn.sample_responses(rng, logpi_HxGxKxK, g_N, prev_N, mix)
    cell_N = (g_N * 3 + prev_N) * 27 + actions_NxH @ np.array([9, 3, 1])
    observed = np.bincount(cell_N, minlength=9 * 27)

    def probs_KxK(t, g):
        return (1 - mix) * np.exp(logpi_HxGxKxK[t, g]) + mix / 3

    expected = np.zeros(9 * 27)
    for g, prev, (a0, a1, a2) in itertools.product(range(3), range(3), itertools.product(range(3), repeat=3)):
        p = probs_KxK(0, g)[prev, a0] * probs_KxK(1, g)[a0, a1] * probs_KxK(2, g)[a1, a2]
        expected[(g * 3 + prev) * 27 + a0 * 9 + a1 * 3 + a2] = p * np.sum((g_N == g) & (prev_N == prev))
    chi2, df = np.sum((observed - expected) ** 2 / expected), 9 * 26
    assert chi2 < df + 5 * np.sqrt(2 * df)
    np.testing.assert_allclose(np.exp(logprob_NxH.sum(1)) * np.bincount(g_N * 3 + prev_N)[g_N * 3 + prev_N],
                               expected[cell_N], rtol=1e-9)


@pytest.mark.parametrize("which", ["expert", "reference"])
def test_sample_means_match_exact_expected_returns(which):
    cfg = syn.SyntheticConfig(num_examples=4000)
    if which == "expert":
        data = syn.make_demonstrations(cfg)
        tokens_NxT, plen_N, ret_N = data.tokens_NxT, data.prompt_len_N, data.return_N
        temperature, mix = cfg.temperature, 0.0
    else:
        data = syn.make_preference_dataset(cfg)
        tokens_NxT, plen_N = data.chosen_tokens_NxT, data.chosen_prompt_len_N
        ret_N = 0.5 * (data.chosen_return_N + data.rejected_return_N)  # both sides come from pi_ref
        temperature, mix = cfg.ref_temperature, cfg.ref_uniform_mix
    _, logpi_HxGxKxK = syn.soft_value_iteration(data.task, temperature)
    g_N = tokens_NxT[:, 1] - syn.FIRST_CONTENT_ID
    prev_N = tokens_NxT[np.arange(cfg.num_examples), plen_N - 1] - syn.FIRST_CONTENT_ID
    exact_N = syn.tabular_expected_return(data.task, logpi_HxGxKxK, g_N, prev_N, mix)
    se = np.std(ret_N - exact_N) / np.sqrt(cfg.num_examples)
    assert abs(np.mean(ret_N - exact_N)) < 4 * se
    uniform_N = syn.tabular_expected_return(data.task, logpi_HxGxKxK, g_N, prev_N, 1.0)
    assert np.mean(exact_N) > np.mean(uniform_N) + 1.0  # both policies beat uniform clearly


def test_bayes_optimal_accuracy_hand_value_and_monte_carlo():
    got = syn.bayes_optimal_accuracy(np.array([1.0, 0.0, -3.0]), np.array([0.0, 0.0, 1.0]), 2.0)
    np.testing.assert_allclose(got, (_sigmoid(0.5) + 0.5 + _sigmoid(2.0)) / 3, rtol=1e-12)

    prefs = syn.make_preference_dataset(syn.SyntheticConfig(num_examples=2000))
    bayes = prefs.bayes_optimal_accuracy
    assert 0.6 < bayes < 0.95
    # Resample the labels many times; the best predictor picks the higher true return.
    rng = np.random.default_rng(0)
    labels_SxN = rng.random((200, 2000)) < prefs.prob_first_wins_N
    first_higher_N = prefs.prob_first_wins_N > 0.5
    mc_S = np.mean(labels_SxN == first_higher_N, axis=1)
    assert abs(mc_S.mean() - bayes) < 4 * mc_S.std() / np.sqrt(len(mc_S))
    np.testing.assert_allclose(
        prefs.prob_chosen_N,
        _sigmoid((prefs.chosen_return_N - prefs.rejected_return_N) / prefs.task.cfg.bt_temperature), rtol=1e-9)


def test_true_ranking_accuracy_close_to_bayes_ceiling():
    prefs = syn.make_preference_dataset(syn.SyntheticConfig(num_examples=8000, data_seed=3))
    p_N = _sigmoid(np.abs(prefs.chosen_return_N - prefs.rejected_return_N) / prefs.task.cfg.bt_temperature)
    se = np.sqrt(np.sum(p_N * (1 - p_N))) / len(p_N)
    assert abs(prefs.true_ranking_accuracy - prefs.bayes_optimal_accuracy) < 4 * se
    assert se < 0.01


def test_label_rate_matches_bradley_terry_probabilities():
    prefs = syn.make_preference_dataset(syn.SyntheticConfig(num_examples=8000, data_seed=4))
    p_N, won_N = prefs.prob_first_wins_N, prefs.first_won_N
    edges = np.quantile(p_N, np.linspace(0, 1, 6))
    bin_N = np.clip(np.searchsorted(edges, p_N, side="right") - 1, 0, 4)
    for b in range(5):
        sel = bin_N == b
        se = np.sqrt(np.sum(p_N[sel] * (1 - p_N[sel]))) / sel.sum()
        assert abs(won_N[sel].mean() - p_N[sel].mean()) < 4 * se + 1e-9
    # prob_chosen is the BT probability of the sampled outcome, so it follows the label.
    np.testing.assert_allclose(np.where(won_N, p_N, 1 - p_N), prefs.prob_chosen_N)


def test_spearman_hand_values():
    # b has a tie: ranks (1, 2, 3.5, 5, 3.5); rho = 8 / sqrt(10 * 9.5).
    np.testing.assert_allclose(syn.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]), 8 / np.sqrt(95), rtol=1e-12)
    assert syn.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)
    assert syn.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(syn.spearman([1, 1, 1], [1, 2, 3]))
    a_2x3, b_2x3 = np.array([[1.0, 2, 9], [3, 4, 9]]), np.array([[4.0, 3, 0], [2, 1, 0]])
    mask_2x3 = np.array([[1, 1, 0], [1, 1, 0]])
    assert syn.spearman(a_2x3, b_2x3, mask_2x3) == pytest.approx(-1.0)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
    np.testing.assert_allclose(syn.spearman(a, b), stats.spearmanr(a, b).statistic, rtol=1e-10)


def test_prefix_pairs_and_their_accuracy():
    prefs = syn.make_preference_dataset(syn.SyntheticConfig(num_examples=300))
    pairs = syn.make_prefix_pairs(prefs)
    h = prefs.task.cfg.response_len
    assert set(np.unique(pairs.length_M)) == set(range(1, h))
    assert np.all(pairs.true_diff_M != 0)
    m = 7
    row, s, k = pairs.row_M[m], pairs.start_M[m], pairs.length_M[m]
    hand = (prefs.chosen_true_reward_NxT[row, s:s + k].astype(np.float64).sum()
            - prefs.rejected_true_reward_NxT[row, s:s + k].astype(np.float64).sum())
    np.testing.assert_allclose(pairs.true_diff_M[m], hand, rtol=1e-9)
    chosen, rejected = prefs.chosen_true_reward_NxT, prefs.rejected_true_reward_NxT
    assert syn.prefix_pair_accuracy(pairs, chosen, rejected) == 1.0
    assert syn.prefix_pair_accuracy(pairs, -chosen, -rejected) == 0.0
    assert syn.prefix_pair_accuracy(pairs, np.zeros_like(chosen), np.zeros_like(rejected)) == 0.5
    rng = np.random.default_rng(0)
    noise = syn.prefix_pair_accuracy(pairs, rng.standard_normal(chosen.shape), rng.standard_normal(chosen.shape))
    assert 0.4 < noise < 0.6
    with pytest.raises(ValueError, match="lengths"):
        syn.make_prefix_pairs(prefs, lengths=(0,))
