"""Diagnostics on a task with a known per-token reward (synthetic MDP, stories): prefix pairs, rank
correlation of learned per-token reward means with the truth, and the Bayes ceiling beside them.

`prefs` is a `SyntheticPreferences` or a `StoriesPreferences`: both carry chosen/rejected token
arrays, prompt lengths and `true_reward_NxT` (the reward of the action token t at index t).
"""
from __future__ import annotations

import numpy as np

from ava_jax.data import synthetic as syn


def response_positions(tokens_NxT: np.ndarray, mask_NxT: np.ndarray, prompt_len_N: np.ndarray) -> np.ndarray:
    """bool [N, T]: real response tokens (the positions a true per-token reward is defined for)."""
    pos_1xT = np.arange(tokens_NxT.shape[1])[None, :]
    return np.asarray(mask_NxT, bool) & (pos_1xT >= np.asarray(prompt_len_N)[:, None])


def ground_truth_diagnostics(split: str, prefs, mu_c: np.ndarray, mu_r: np.ndarray) -> dict[str, float]:
    """Bayes ceiling, prefix-pair accuracy and Spearman(mu_t, r*_t) of a trained model on one split.

    Args:
      split: name used as the key prefix.
      prefs: the split's ground-truth preferences.
      mu_c, mu_r: [N, T] the trained model's reward means of the chosen and rejected rows,
        `intermediate.token_reward_means`' layout (mu[n, t] for the transition whose action is token
        t; T = prefs.chosen_tokens_NxT.shape[1]), read by the objective's per-transition reward reader
        (`Objective.reward_reader`, which decides where mu_t is read, e.g. AVA's reward_align).
        `eval.reward.pair_scores` returns them with the pair scores, from the same forward.

    Returns:
      {f"{split}_bayes_optimal_accuracy", f"{split}_prefix_accuracy", f"{split}_reward_spearman"}.
    """
    length = prefs.chosen_tokens_NxT.shape[1]
    for name, mu in (("mu_c", mu_c), ("mu_r", mu_r)):
        if np.shape(mu) != (len(prefs.chosen_tokens_NxT), length):
            raise ValueError(f"ground_truth_diagnostics({split!r}): {name} has shape {np.shape(mu)}, the split's "
                             f"preferences need {(len(prefs.chosen_tokens_NxT), length)}")
    response_len = getattr(prefs, "response_len", None) or prefs.task.cfg.response_len
    pairs = syn.make_prefix_pairs(prefs, response_len=response_len)
    mask = np.concatenate([response_positions(prefs.chosen_tokens_NxT, prefs.chosen_mask_NxT, prefs.chosen_prompt_len_N),
                           response_positions(prefs.rejected_tokens_NxT, prefs.rejected_mask_NxT,
                                              prefs.rejected_prompt_len_N)])
    true = np.concatenate([prefs.chosen_true_reward_NxT, prefs.rejected_true_reward_NxT])
    rho = syn.spearman(np.concatenate([mu_c, mu_r]), true, mask=mask)
    return {f"{split}_bayes_optimal_accuracy": prefs.bayes_optimal_accuracy,
            f"{split}_prefix_accuracy": syn.prefix_pair_accuracy(pairs, mu_c, mu_r),
            f"{split}_reward_spearman": float(rho)}
