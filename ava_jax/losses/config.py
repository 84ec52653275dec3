"""Typed, frozen configurations of the objectives in `ava_jax.losses`: one class per objective family.

Each objective of `ava_jax.objectives` names its class; the ConfigDict section `config.loss` holds
exactly that class's fields (the conversion lives in `ava_jax/config.py`). This module only defines
the fields and validates them, so a bad value fails at construction with the field's name.
`alpha` (the Q head's temperature) is a model field, not a loss field.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

LIKELIHOODS = ("boltzmann", "raw_q")
CERS = ("sigmoid", "logsigmoid")
REWARD_ALIGNS = ("next", "state")
NORMALIZES = ("token", "sequence")
TD_TERMINALS = ("none", "zero")
CER_SCORES = ("last", "sum")


@dataclasses.dataclass(frozen=True)
class BradleyTerryConfig:
    """Bradley-Terry (method.md section 3): no switches; the score is the reward at the last real token."""


@dataclasses.dataclass(frozen=True)
class PreferenceTransformerConfig:
    """Preference Transformer (method.md section 3): no switches; the score is sum_t w_t r_t."""


@dataclasses.dataclass(frozen=True)
class AvaConfig:
    """AVA-p and AVA-d: the AVRIL terms and their switches (method.md sections 1, 2 and the ablations).

    Attributes:
      gamma: discount in the TD error delta_t = Q_a(t) - gamma * Q_a(t+1); in [0, 1].
      lam: lambda, weight of the TD log-likelihood; >= 0.
      beta: inverse temperature of the Boltzmann policy; > 0.
      likelihood: "boltzmann" (log_softmax(beta * Q)[a], AVA Eq. 3) or "raw_q" (beta * Q_a, the
        literal AVA Eq. 13).
      cer: "sigmoid" (as printed) or "logsigmoid" (Bradley-Terry form) for the contrastive
        expected return.
      reward_align: "next" (reward of transition t read at position t+1, which has seen the action)
        or "state" (read at position t, the paper's literal indexing).
      include_prompt: count transitions whose action is a prompt token too.
      use_neg: keep the rejected-likelihood term of AVA-p (ablation "neg" sets False).
      use_irl: keep the KL and TD terms (ablation "irl" sets False).
      use_cer: keep the contrastive expected return of AVA-p (ablation "cer" sets False).
      neg_floor: None, or a floor on the rejected side's per-token log-likelihood (a guard against
        the unlikelihood failure mode, see `ava_p_loss`).
      cer_weight: weight of the CER term; >= 0.
      normalize: how the summed terms are weighted (method.md section 6).
        "token" (default): every term is summed over the batch and divided by the number of
        counted transitions (both sides of a pair for AVA-p); equal to the paper's literal sums
        up to a per-batch constant, so CER is one term per pair against ~T TD terms.
        "sequence": each token term (likelihood, KL, TD) is averaged over its own sequence, CER
        is counted once per pair, and the objective is the mean over pairs (AVA-d: over
        sequences), so a pair's CER weighs as much as its whole TD term.
      td_terminal: the TD term of a sequence's last transition, which has no successor.
        "none" (default, as printed): no TD term there, so mu_last (the score) is trained only by
        the KL pull, CER and extrapolation. "zero": a terminal-state convention, V = 0 after the
        final token, so delta_last = Q_a(last) and the scored position gets a TD target.
      cer_score: which return the contrastive expected return compares. "last" (as printed):
        mu_last, the reward mean of the last transition. "sum": sum_t mu_t over the counted
        transitions, the sequence's expected return under the per-token reward model (what PT
        scores, and `eval.score="sum"` reads).
    """

    gamma: float = 1.0
    lam: float = 1.0
    beta: float = 1.0
    likelihood: str = "boltzmann"
    cer: str = "sigmoid"
    reward_align: str = "next"
    include_prompt: bool = False
    use_neg: bool = True
    use_irl: bool = True
    use_cer: bool = True
    neg_floor: float | None = None
    cer_weight: float = 1.0
    normalize: str = "token"
    td_terminal: str = "none"
    cer_score: str = "last"

    def __post_init__(self):
        for name, allowed in (("likelihood", LIKELIHOODS),
                              ("cer", CERS), ("reward_align", REWARD_ALIGNS),
                              ("normalize", NORMALIZES), ("td_terminal", TD_TERMINALS),
                              ("cer_score", CER_SCORES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"AvaConfig.{name} must be one of {allowed}, got {value!r}")
        for name in ("include_prompt", "use_neg", "use_irl", "use_cer"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"AvaConfig.{name} must be a bool, got {value!r}")
        self._set_float("gamma", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        self._set_float("lam", lambda v: v >= 0.0, ">= 0")
        self._set_float("beta", lambda v: v > 0.0, "> 0")
        self._set_float("cer_weight", lambda v: v >= 0.0, ">= 0")
        if self.neg_floor is not None:
            self._set_float("neg_floor", lambda v: True, "finite")

    def _set_float(self, name, ok, what):
        value = getattr(self, name)
        # bool is an int subclass; True as a discount is almost surely a config slip.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"AvaConfig.{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"AvaConfig.{name} must be finite and {what}, got {value!r}")
        # Coerce ints to float so equal configs hash equally (the config is a jit static arg).
        object.__setattr__(self, name, value)
