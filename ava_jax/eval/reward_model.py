"""Evaluating a trained reward model on held-out splits: pairwise accuracy, the calibration of its
uncertainty, and, on a task with a known per-token reward, the ground-truth diagnostics."""
from __future__ import annotations

import os

import numpy as np

from ava_jax.eval.calibration import calibration_metrics, plot_reliability, preference_probability, reliability_bins
from ava_jax.eval.ground_truth import ground_truth_diagnostics
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
      token_means: the task has a per-token ground truth (`final` gets `prefs`): every evaluation
        reads the per-token reward means with the scores (`make_pair_scorer`'s reader; a readout of
        the same forward), so the periodic and the final evaluations share one compiled program.
    """

    def __init__(self, objective, cfg, graphdef, splits: dict, *, score: str, pad_id: int, batch_size: int,
                 pad_to_multiple: int | None, token_means: bool = False):
        self.objective, self.cfg, self.graphdef, self.splits, self.score = objective, cfg, graphdef, splits, score
        self.pad_id, self.batch_size, self.pad_to_multiple = pad_id, batch_size, pad_to_multiple
        self.scorer = self._make_scorer(token_means)
        # The scorer that reads the per-token reward means too (the ground-truth diagnostics of
        # `final`): with token_means the periodic evaluations' own, else built on first use.
        self._scorer_with_means = self.scorer if token_means else None

    def _make_scorer(self, token_means: bool):
        return make_pair_scorer(self.objective.score_fn(self.cfg, self.score), self.graphdef,
                                reader=self.objective.reward_reader(self.cfg) if token_means else None)

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
        given). scores: `pair_scores`' per-pair arrays. diagnostics: `ground_truth_diagnostics` when
        `prefs` is given (the per-token reward means read in the same pass as the scores), else {}.
        With `plot_dir`, the test split's reliability diagram is written there.
        """
        scorer, length = self.scorer, None
        if prefs is not None:
            if self._scorer_with_means is None:
                self._scorer_with_means = self._make_scorer(True)
            scorer, length = self._scorer_with_means, prefs.chosen_tokens_NxT.shape[1]
        scores = pair_scores(scorer, params, self.splits[split], batch_size=self.batch_size, pad_id=self.pad_id,
                             pad_to_multiple=self.pad_to_multiple, token_length=length)
        means = [scores.pop(k, None) for k in ("mu_c", "mu_r")]
        metrics = pairwise_metrics(scores)
        if self.objective.uncertainty:  # is sigma calibrated? (the baselines have none)
            metrics.update(calibration_metrics(scores, None if prefs is None else prefs.prob_chosen_N))
            p_N = preference_probability(scores)
            if plot_dir and split == "test" and not np.isnan(p_N).all():
                plot_reliability(reliability_bins(p_N[~np.isnan(p_N)]), os.path.join(plot_dir, "reliability_test.png"),
                                 f"{self.objective.name}: P(chosen) = Phi(dmu / sigma), test pairs")
        diagnostics = {} if prefs is None else ground_truth_diagnostics(split, prefs, *means)
        return metrics, scores, diagnostics
