"""Evaluating a trained reward model on held-out splits: pairwise accuracy, the calibration of its
uncertainty, and, on a task with a known per-token reward, the ground-truth diagnostics."""
from __future__ import annotations

import os

import numpy as np

from ava_jax.eval.calibration import calibration_metrics, plot_reliability, preference_probability, reliability_bins
from ava_jax.eval.ground_truth import ground_truth_diagnostics
from ava_jax.eval.intermediate import make_token_reward_reader
from ava_jax.eval.reward import make_pair_scorer, pair_scores, pairwise_metrics


class RewardModelEvaluator:
    """Scores the pairs of each split with one compiled scorer (built once, reused every evaluation).

    Args:
      objective: the `objectives.Objective` trained.
      cfg: its typed config.
      graphdef: the model's graph (the parameters come with each call).
      splits: {split: PairArrays}.
      score: `config.eval.score`.
      pad_id, batch_size, pad_to_multiple: batching of the forward passes.
    """

    def __init__(self, objective, cfg, graphdef, splits: dict, *, score: str, pad_id: int, batch_size: int,
                 pad_to_multiple: int | None):
        self.objective, self.cfg, self.graphdef, self.splits = objective, cfg, graphdef, splits
        self.pad_id, self.batch_size, self.pad_to_multiple = pad_id, batch_size, pad_to_multiple
        self.scorer = make_pair_scorer(objective.score_fn(cfg, score), graphdef)
        self._token_reader = None  # the ground-truth diagnostics' per-token reader, built on first use

    def scores(self, split: str, params) -> dict:
        return pair_scores(self.scorer, params, self.splits[split], batch_size=self.batch_size, pad_id=self.pad_id,
                           pad_to_multiple=self.pad_to_multiple)

    def metrics(self, split: str, params) -> dict[str, float]:
        """Pairwise metrics of one split (the loop's periodic evaluation)."""
        return pairwise_metrics(self.scores(split, params))

    def final(self, split: str, params, prefs=None, plot_dir: str = ""):
        """(metrics, scores, diagnostics) of one split after training.

        metrics: pairwise metrics, plus calibration when the objective has an uncertainty (against
        the true preference probabilities when `prefs`, the split's ground-truth preferences, are
        given). diagnostics: `ground_truth_diagnostics` when `prefs` is given, else {}. With
        `plot_dir`, the test split's reliability diagram is written there.
        """
        scores = self.scores(split, params)
        metrics = pairwise_metrics(scores)
        if self.objective.uncertainty:  # is sigma calibrated? (the baselines have none)
            metrics.update(calibration_metrics(scores, None if prefs is None else prefs.prob_chosen_N))
            p_N = preference_probability(scores)
            if plot_dir and split == "test" and not np.isnan(p_N).all():
                plot_reliability(reliability_bins(p_N[~np.isnan(p_N)]), os.path.join(plot_dir, "reliability_test.png"),
                                 f"{self.objective.name}: P(chosen) = Phi(dmu / sigma), test pairs")
        diagnostics = {}
        if prefs is not None:
            if self._token_reader is None:
                self._token_reader = make_token_reward_reader(self.objective.reward_reader(self.cfg), self.graphdef)
            diagnostics = ground_truth_diagnostics(split, prefs, self._token_reader, params, self.splits[split],
                                                   pad_id=self.pad_id, batch_size=self.batch_size,
                                                   pad_to_multiple=self.pad_to_multiple)
        return metrics, scores, diagnostics
