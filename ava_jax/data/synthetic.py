"""Synthetic token MDP with a known per-token reward: ground truth for every claim (method.md section 5).

Token stream (right padding, pad == eos; masks, not ids, mark padding):
    [BOS, p_1 .. p_P, y_1 .. y_H, EOS?, pad ...]     prompt_len_N = 1 + P (BOS counts as prompt)
Ids: 0 = BOS, 1 = EOS/pad, content tokens 2 .. V-1 (K = V - 2 of them). Prompts are uniform random
content tokens (P fixed, or uniform in [min_prompt_len, prompt_len]); responses are exactly H
content tokens, then an EOS when `append_eos`.

Hidden reward of the transition whose action is token t (state = tokens 0..t-1):
    r*(s_t, a) = W[prev, a] + target_bonus * [a == target]
prev = token t-1 (the last prompt token for the first response token) and target = the first
prompt content token (tokens[:, 1]). W ~ N(0, reward_scale^2) over the full vocabulary. Why this
form: the W table makes every token carry its own reward (real intermediate rewards, not only a
terminal score); the target term makes the reward depend on the prompt through one lookup a small
transformer learns by attending to position 1; and because r* depends only on (prev, action,
target), the soft value over a finite horizon is exact by dynamic programming on
(position, target, prev). In a response, BOS, or EOS other than right after the H-th response token,
gets `invalid_reward` (scored policies cannot end early for free); that final EOS gets 0.

Demonstrations come from the Boltzmann-optimal (soft-optimal) expert at `temperature`, whose
sequence probabilities are exp((R*(y) - V_0)/temperature) exactly. Preference pairs are two
responses from a reference policy (the soft-optimal policy at `ref_temperature` mixed per token
with uniform), labelled by Bradley-Terry on the true returns at `bt_temperature`.

`seed` fixes the task (W); `data_seed` fixes the samples, so train and held-out sets with the same
`seed` and different `data_seed` share one reward. Everything is NumPy and deterministic.
"""
from __future__ import annotations

import dataclasses

import numpy as np

BOS_ID = 0
EOS_ID = 1  # also the pad id
FIRST_CONTENT_ID = 2


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic task (seed, reward) and the datasets drawn from it."""

    vocab_size: int = 16  # including BOS and EOS
    prompt_len: int = 4  # content tokens after BOS (the maximum when min_prompt_len is set)
    min_prompt_len: int | None = None  # None: every prompt has prompt_len content tokens
    response_len: int = 8  # H, content tokens per response
    append_eos: bool = True
    temperature: float = 1.0  # expert's Boltzmann temperature
    reward_scale: float = 1.0  # std of W
    target_bonus: float = 2.0
    invalid_reward: float = -2.0
    ref_temperature: float = 4.0  # reference policy for preference pairs
    ref_uniform_mix: float = 0.25
    bt_temperature: float = 2.0  # Bayes-optimal pairwise accuracy about 0.80 with the other defaults
    num_examples: int = 1024  # pairs or demonstrations
    seed: int = 0  # the task
    data_seed: int = 0  # the samples

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size >= 4, "prompt_len": self.prompt_len >= 1,
            "min_prompt_len": self.min_prompt_len is None or 1 <= self.min_prompt_len <= self.prompt_len,
            "response_len": self.response_len >= 1, "temperature": self.temperature > 0,
            "reward_scale": self.reward_scale >= 0, "ref_temperature": self.ref_temperature > 0,
            "ref_uniform_mix": 0.0 <= self.ref_uniform_mix <= 1.0,
            "bt_temperature": self.bt_temperature > 0, "num_examples": self.num_examples >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"SyntheticConfig.{key}={getattr(self, key)!r} is out of range")

    @property
    def num_content(self) -> int:
        return self.vocab_size - FIRST_CONTENT_ID

    @property
    def seq_len(self) -> int:
        return 1 + self.prompt_len + self.response_len + int(self.append_eos)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """The hidden reward. w_VxV[prev, action] is defined over the full vocabulary so any stream scores."""

    cfg: SyntheticConfig
    w_VxV: np.ndarray

    def content_reward_GxKxK(self) -> np.ndarray:
        """r*[g, prev, a] over content indices (id - 2); g = target content index."""
        w_KxK = self.w_VxV[FIRST_CONTENT_ID:, FIRST_CONTENT_ID:]
        return w_KxK[None, :, :] + self.cfg.target_bonus * np.eye(self.cfg.num_content)[:, None, :]


def make_task(cfg: SyntheticConfig) -> SyntheticTask:
    """The reward table for `cfg.seed` (independent of `cfg.data_seed`)."""
    rng = np.random.default_rng([cfg.seed, 0])
    w_VxV = cfg.reward_scale * rng.standard_normal((cfg.vocab_size, cfg.vocab_size))
    return SyntheticTask(cfg=cfg, w_VxV=w_VxV)


def _logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(z, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def _sigmoid(x: np.ndarray) -> np.ndarray:  # tanh form: no overflow for large |x|
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def soft_value_iteration(task: SyntheticTask, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Finite-horizon soft Bellman backup over (position, target, prev).

    Q_t(prev, a) = r*(prev, a) + V_{t+1}(a)   (after action a the next state's previous token is a)
    V_t(prev) = temperature * logsumexp_a Q_t(prev, a) / temperature,  V_H = 0.

    Returns:
        v_Hp1xGxK: soft values V_t for t = 0..H (content indices).
        logpi_HxGxKxK: log pi_t(a | prev, target) = (Q_t - V_t) / temperature.
    """
    r_GxKxK = task.content_reward_GxKxK()
    h, g, k = task.cfg.response_len, r_GxKxK.shape[0], r_GxKxK.shape[1]
    v_Hp1xGxK = np.zeros((h + 1, g, k))
    logpi_HxGxKxK = np.zeros((h, g, k, k))
    for t in reversed(range(h)):
        z_GxKxK = (r_GxKxK + v_Hp1xGxK[t + 1][:, None, :]) / temperature
        lse_GxK = _logsumexp(z_GxKxK)
        v_Hp1xGxK[t] = temperature * lse_GxK
        logpi_HxGxKxK[t] = z_GxKxK - lse_GxK[..., None]
    return v_Hp1xGxK, logpi_HxGxKxK


def _mixed_probs(logpi_NxK: np.ndarray, uniform_mix: float) -> np.ndarray:
    probs_NxK = np.exp(logpi_NxK)
    return (1.0 - uniform_mix) * probs_NxK + uniform_mix / probs_NxK.shape[-1]


def sample_responses(rng: np.random.Generator, logpi_HxGxKxK: np.ndarray, target_N: np.ndarray,
                     prev_N: np.ndarray, uniform_mix: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Roll out a tabular policy (content indices in and out); returns (actions_NxH, logprob_NxH)."""
    h, n = logpi_HxGxKxK.shape[0], target_N.shape[0]
    actions_NxH = np.zeros((n, h), np.int64)
    logprob_NxH = np.zeros((n, h))
    prev_N = np.asarray(prev_N).copy()
    for t in range(h):
        probs_NxK = _mixed_probs(logpi_HxGxKxK[t, target_N, prev_N], uniform_mix)
        u_Nx1 = rng.random((n, 1))
        # Inverse CDF; the clip guards against the last cumulative sum rounding below u.
        a_N = np.minimum((np.cumsum(probs_NxK, -1) < u_Nx1).sum(-1), probs_NxK.shape[-1] - 1)
        actions_NxH[:, t] = a_N
        logprob_NxH[:, t] = np.log(probs_NxK[np.arange(n), a_N])
        prev_N = a_N
    return actions_NxH, logprob_NxH


def tabular_expected_return(task: SyntheticTask, logpi_HxGxKxK: np.ndarray, target_N: np.ndarray,
                            prev_N: np.ndarray, uniform_mix: float = 0.0) -> np.ndarray:
    """Exact E[R*] of a tabular policy by propagating the distribution of the previous token."""
    r_GxKxK = task.content_reward_GxKxK()
    n, k = target_N.shape[0], r_GxKxK.shape[1]
    dist_NxK = np.eye(k)[prev_N]
    ret_N = np.zeros(n)
    for t in range(logpi_HxGxKxK.shape[0]):
        probs_NxKxK = _mixed_probs(logpi_HxGxKxK[t, target_N], uniform_mix)
        joint_NxKxK = dist_NxK[:, :, None] * probs_NxKxK
        ret_N += np.sum(joint_NxKxK * r_GxKxK[target_N], axis=(1, 2))
        dist_NxK = joint_NxKxK.sum(1)
    return ret_N


def true_token_rewards(task: SyntheticTask, tokens_NxT: np.ndarray, mask_NxT: np.ndarray,
                       prompt_len_N: np.ndarray) -> np.ndarray:
    """r* of every response token of any stream (e.g. a learned policy's samples), float64.

    reward_NxT[n, t] is the reward of the transition whose action is token t; 0 at prompt and pad.
    The target is tokens[:, 1], so streams must follow this module's layout (BOS, prompt, response).
    """
    cfg = task.cfg
    tokens_NxT = np.asarray(tokens_NxT)
    n, t = tokens_NxT.shape
    pos_1xT = np.arange(t)[None, :]
    resp_idx_NxT = pos_1xT - np.asarray(prompt_len_N)[:, None]  # response index of token t
    in_resp_NxT = np.asarray(mask_NxT, bool) & (resp_idx_NxT >= 0) & (pos_1xT >= 1)
    prev_NxT = np.concatenate([tokens_NxT[:, :1], tokens_NxT[:, :-1]], axis=1)
    r_NxT = task.w_VxV[prev_NxT, tokens_NxT] + cfg.target_bonus * (tokens_NxT == tokens_NxT[:, 1:2])
    r_NxT = np.where(tokens_NxT < FIRST_CONTENT_ID, cfg.invalid_reward, r_NxT)
    r_NxT = np.where((tokens_NxT == EOS_ID) & (resp_idx_NxT == cfg.response_len), 0.0, r_NxT)
    return np.where(in_resp_NxT, r_NxT, 0.0)


def _sample_prompts(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    lo = cfg.prompt_len if cfg.min_prompt_len is None else cfg.min_prompt_len
    plen_N = rng.integers(lo, cfg.prompt_len + 1, cfg.num_examples)
    content_NxP = rng.integers(0, cfg.num_content, (cfg.num_examples, cfg.prompt_len))
    return content_NxP, plen_N


def _assemble(task: SyntheticTask, content_NxP: np.ndarray, plen_N: np.ndarray,
              actions_NxH: np.ndarray) -> dict[str, np.ndarray]:
    """Lay out [BOS, prompt, response, EOS?] with right padding and score it."""
    cfg = task.cfg
    (n, p), h = content_NxP.shape, actions_NxH.shape[1]
    pos_1xT = np.arange(cfg.seq_len)[None, :]
    start_N = 1 + plen_N
    tokens_NxT = np.full((n, cfg.seq_len), EOS_ID, np.int32)
    tokens_NxT[:, 0] = BOS_ID
    # Boolean assignment fills row-major, and each row has exactly plen (resp. H) selected slots.
    in_prompt_NxT = (pos_1xT >= 1) & (pos_1xT < start_N[:, None])
    tokens_NxT[in_prompt_NxT] = (content_NxP + FIRST_CONTENT_ID)[np.arange(p)[None, :] < plen_N[:, None]]
    in_resp_NxT = (pos_1xT >= start_N[:, None]) & (pos_1xT < (start_N + h)[:, None])
    tokens_NxT[in_resp_NxT] = (actions_NxH + FIRST_CONTENT_ID).ravel()
    mask_NxT = pos_1xT < (start_N + h + int(cfg.append_eos))[:, None]
    reward_NxT = true_token_rewards(task, tokens_NxT, mask_NxT, start_N)
    return dict(tokens=tokens_NxT, mask=mask_NxT, prompt_len=start_N.astype(np.int32),
                reward=reward_NxT, ret=reward_NxT.sum(1))


def _prompt_state(content_NxP: np.ndarray, plen_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, previous token before the response), both content indices."""
    return content_NxP[:, 0], content_NxP[np.arange(content_NxP.shape[0]), plen_N - 1]


@dataclasses.dataclass(frozen=True)
class SyntheticDemonstrations:
    """Expert demonstrations. true_reward aligned with tokens (reward of the action at t)."""

    task: SyntheticTask
    tokens_NxT: np.ndarray  # int32
    mask_NxT: np.ndarray  # bool
    prompt_len_N: np.ndarray  # int32, includes BOS
    true_reward_NxT: np.ndarray  # float32
    return_N: np.ndarray  # float64
    expert_logprob_NxT: np.ndarray  # float32, log pi*(token t | tokens < t); 0 off-response and at EOS
    target_N: np.ndarray  # int32 token id


def make_demonstrations(cfg: SyntheticConfig) -> SyntheticDemonstrations:
    """cfg.num_examples responses of the Boltzmann-optimal expert at cfg.temperature."""
    task = make_task(cfg)
    rng = np.random.default_rng([cfg.seed, cfg.data_seed, 2])
    content_NxP, plen_N = _sample_prompts(rng, cfg)
    target_N, prev_N = _prompt_state(content_NxP, plen_N)
    _, logpi_HxGxKxK = soft_value_iteration(task, cfg.temperature)
    actions_NxH, logprob_NxH = sample_responses(rng, logpi_HxGxKxK, target_N, prev_N)
    seq = _assemble(task, content_NxP, plen_N, actions_NxH)
    logprob_NxT = np.zeros(seq["tokens"].shape, np.float32)
    resp_pos_NxH = seq["prompt_len"][:, None] + np.arange(cfg.response_len)[None, :]
    np.put_along_axis(logprob_NxT, resp_pos_NxH, logprob_NxH.astype(np.float32), axis=1)
    return SyntheticDemonstrations(
        task=task, tokens_NxT=seq["tokens"], mask_NxT=seq["mask"], prompt_len_N=seq["prompt_len"],
        true_reward_NxT=seq["reward"].astype(np.float32), return_N=seq["ret"],
        expert_logprob_NxT=logprob_NxT, target_N=(target_N + FIRST_CONTENT_ID).astype(np.int32))


def bayes_optimal_accuracy(return_a_N: np.ndarray, return_b_N: np.ndarray, bt_temperature: float) -> float:
    """Expected accuracy of the best predictor against Bradley-Terry labels: mean max(p, 1 - p).

    max(p, 1 - p) = sigmoid(|R_a - R_b| / bt_temperature): the best guess is the higher true return.
    """
    gap_N = np.abs(np.asarray(return_a_N, np.float64) - np.asarray(return_b_N, np.float64))
    return float(np.mean(_sigmoid(gap_N / bt_temperature)))


def pairwise_accuracy(score_chosen_N: np.ndarray, score_rejected_N: np.ndarray) -> float:
    """Share of pairs with score(chosen) > score(rejected); exact ties count one half."""
    diff_N = np.asarray(score_chosen_N, np.float64) - np.asarray(score_rejected_N, np.float64)
    return float(np.mean((diff_N > 0) + 0.5 * (diff_N == 0)))


_SIDE_FIELDS = (("tokens", "tokens_NxT"), ("mask", "mask_NxT"), ("prompt_len", "prompt_len_N"),
                ("ret", "return_N"), ("reward", "true_reward_NxT"))


@dataclasses.dataclass(frozen=True)
class BTPairs:
    """Two responses per prompt with known per-token rewards; chosen = the sampled Bradley-Terry winner.

    The fields every ground-truth task shares (synthetic, stories): the pipelines and diagnostics read
    only these. Subclasses say which Bradley-Terry temperature labelled them.
    """

    chosen_tokens_NxT: np.ndarray  # int32
    chosen_mask_NxT: np.ndarray  # bool
    chosen_prompt_len_N: np.ndarray  # int32, includes BOS
    chosen_true_reward_NxT: np.ndarray  # float32, the reward of the action token t
    chosen_return_N: np.ndarray  # float64
    rejected_tokens_NxT: np.ndarray
    rejected_mask_NxT: np.ndarray
    rejected_prompt_len_N: np.ndarray
    rejected_true_reward_NxT: np.ndarray
    rejected_return_N: np.ndarray
    prob_chosen_N: np.ndarray  # BT P(chosen beats rejected) from the true returns
    first_won_N: np.ndarray  # bool: the label as sampled (did the first drawn response win)
    prob_first_wins_N: np.ndarray  # BT P(first drawn response wins)

    @property
    def bt_temperature(self) -> float:
        raise NotImplementedError

    @property
    def bayes_optimal_accuracy(self) -> float:
        return bayes_optimal_accuracy(self.chosen_return_N, self.rejected_return_N, self.bt_temperature)

    @property
    def true_ranking_accuracy(self) -> float:
        """Accuracy of ranking by the true return on these sampled labels (Bayes ceiling + noise)."""
        return pairwise_accuracy(self.chosen_return_N, self.rejected_return_N)


def bradley_terry_label(first: dict, second: dict, bt_temperature: float, rng: np.random.Generator) -> dict:
    """Labels pairs (row i of `first` against row i of `second`) by Bradley-Terry on their true returns.

    Args:
      first, second: dicts of [N, ...] arrays "tokens", "mask", "prompt_len", "ret", "reward".
      bt_temperature: P(first wins) = sigmoid((R_first - R_second) / bt_temperature).
      rng: draws the labels (one uniform per pair).

    Returns:
      The `BTPairs` fields as keyword arguments (chosen = the drawn winner).
    """
    prob_first_N = _sigmoid((first["ret"] - second["ret"]) / bt_temperature)
    first_won_N = rng.random(prob_first_N.shape[0]) < prob_first_N
    out = {}
    for side, won_N in (("chosen", first_won_N), ("rejected", ~first_won_N)):
        for key, name in _SIDE_FIELDS:
            won = won_N.reshape((-1,) + (1,) * (first[key].ndim - 1))
            out[f"{side}_{name}"] = np.where(won, first[key], second[key])
        out[f"{side}_true_reward_NxT"] = out[f"{side}_true_reward_NxT"].astype(np.float32)
    return dict(out, prob_chosen_N=np.where(first_won_N, prob_first_N, 1.0 - prob_first_N),
                first_won_N=first_won_N, prob_first_wins_N=prob_first_N)


@dataclasses.dataclass(frozen=True)
class SyntheticPreferences(BTPairs):
    """Preference pairs on shared prompts of the synthetic task."""

    task: SyntheticTask
    target_N: np.ndarray  # int32 token id

    @property
    def bt_temperature(self) -> float:
        return self.task.cfg.bt_temperature


def make_preference_dataset(cfg: SyntheticConfig) -> SyntheticPreferences:
    """cfg.num_examples pairs from the reference policy, labelled by Bradley-Terry on R*."""
    task = make_task(cfg)
    rng = np.random.default_rng([cfg.seed, cfg.data_seed, 1])
    content_NxP, plen_N = _sample_prompts(rng, cfg)
    target_N, prev_N = _prompt_state(content_NxP, plen_N)
    # A hotter soft-optimal policy mixed with uniform: responses differ in quality but not so much
    # that every label is obvious, so the Bayes ceiling sits well inside (0.5, 1).
    _, logpi_ref_HxGxKxK = soft_value_iteration(task, cfg.ref_temperature)
    seqs = [_assemble(task, content_NxP, plen_N,
                      sample_responses(rng, logpi_ref_HxGxKxK, target_N, prev_N, cfg.ref_uniform_mix)[0])
            for _ in range(2)]
    return SyntheticPreferences(task=task, **bradley_terry_label(seqs[0], seqs[1], cfg.bt_temperature, rng),
                                target_N=(target_N + FIRST_CONTENT_ID).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class PrefixPairs:
    """Equal-length response prefixes of a preference row, labelled by true partial returns."""

    row_M: np.ndarray  # index into the SyntheticPreferences rows
    start_M: np.ndarray  # first response position (= prompt_len) of that row
    length_M: np.ndarray  # prefix length in response tokens
    true_diff_M: np.ndarray  # partial R*(chosen prefix) - partial R*(rejected prefix), never 0


def _partial_sums(x_NxT, row_M: np.ndarray, start_M: np.ndarray, length_M: np.ndarray) -> np.ndarray:
    x_NxT = np.asarray(x_NxT, np.float64)  # also takes JAX arrays
    csum_NxT1 = np.concatenate([np.zeros((x_NxT.shape[0], 1)), np.cumsum(x_NxT, axis=1)], axis=1)
    return csum_NxT1[row_M, start_M + length_M] - csum_NxT1[row_M, start_M]


def make_prefix_pairs(prefs: SyntheticPreferences, lengths: tuple[int, ...] | None = None,
                      response_len: int | None = None) -> PrefixPairs:
    """Prefix pairs (method.md section 5) from each preference row at each length (default 1..H-1).

    The label is deterministic (the larger true partial return wins): the claim under test is that
    learned per-token rewards order partial responses. Exact ties (e.g. identical prefixes) are
    dropped because they have no correct answer. `response_len` (H) defaults to
    prefs.task.cfg.response_len; pass it for other preference sets with the same fields (e.g.
    `stories.StoriesPreferences`, whose H is `prefs.response_len`).
    """
    h = prefs.task.cfg.response_len if response_len is None else response_len
    lengths = tuple(range(1, h)) if lengths is None else tuple(lengths)
    if not lengths or min(lengths) < 1 or max(lengths) > h:
        raise ValueError(f"make_prefix_pairs: lengths={lengths} must lie in 1..{h}")
    n = prefs.chosen_return_N.shape[0]
    row_M = np.repeat(np.arange(n), len(lengths))
    length_M = np.tile(np.asarray(lengths), n)
    start_M = prefs.chosen_prompt_len_N[row_M].astype(np.int64)
    diff_M = (_partial_sums(prefs.chosen_true_reward_NxT, row_M, start_M, length_M)
              - _partial_sums(prefs.rejected_true_reward_NxT, row_M, start_M, length_M))
    # Identical prefixes give exactly equal float32 sums; anything below 1e-6 is such a tie.
    keep_M = np.abs(diff_M) > 1e-6
    return PrefixPairs(row_M=row_M[keep_M], start_M=start_M[keep_M], length_M=length_M[keep_M],
                       true_diff_M=diff_M[keep_M])


def prefix_pair_accuracy(pairs: PrefixPairs, mu_chosen_NxT: np.ndarray, mu_rejected_NxT: np.ndarray) -> float:
    """Share of prefix pairs ordered correctly by summed per-token reward means.

    mu_*_NxT must already be aligned like true_reward (mu[n, t] = reward of the action token t);
    realign a `reward_align="next"` or `"state"` model output before calling. Ties count one half.
    """
    score_M = (_partial_sums(mu_chosen_NxT, pairs.row_M, pairs.start_M, pairs.length_M)
               - _partial_sums(mu_rejected_NxT, pairs.row_M, pairs.start_M, pairs.length_M))
    return pairwise_accuracy(score_M * np.sign(pairs.true_diff_M), np.zeros_like(score_M))


def _average_ranks(x_N: np.ndarray) -> np.ndarray:
    _, inverse_N, counts_U = np.unique(x_N, return_inverse=True, return_counts=True)
    ends_U = np.cumsum(counts_U)  # 1-based rank of the last member of each tie group
    return (ends_U - 0.5 * (counts_U - 1))[inverse_N]


def spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation (average ranks for ties; NaN if a side is constant) over `mask`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman: shapes differ, {a.shape} vs {b.shape}")
    if mask is not None:
        a, b = a[np.asarray(mask, bool)], b[np.asarray(mask, bool)]
    ra, rb = _average_ranks(a.ravel()), _average_ranks(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
    return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")
