"""The objective registry: the one place an objective is named.

An `Objective` says everything the pipelines need to know about it: its typed config (the fields of
`config.loss`), the defaults it sets in other config sections (its head, its evaluation score), its
loss factory, its score function, its per-token reward reader and the frozen models its loss needs.
Every list of valid names is derived from here (`names()`), and an unknown name is an error listing
the known ones. Objectives register themselves when `ava_jax.objectives` is imported.

A loss function has the signature `loss_fn(model, batch, rng, frozen) -> (loss, metrics)`:
`model` is the trained NNX module, `frozen` a dict of the frozen NNX modules the objective names in
`Objective.frozen` (e.g. a reference policy); the train step passes their parameters into the jitted
step as sharded, non-donated arguments, never as constants baked into the program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ava_jax.errors import ConfigError

KINDS = ("reward_model", "policy")
DATA = ("pairs", "demonstrations")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective.

    Attributes:
      name: the config value (`config.objective`).
      title: how tables and plots name it ("AVA-p").
      equation: where the objective is defined (method.md section or paper equation).
      kinds: the pipelines' kinds it serves: "reward_model" (trains a scorer of sequences) and/or
        "policy" (trains the LM that generates; AVA serves both).
      data: "pairs" (preference pairs) or "demonstrations" (the chosen halves only).
      config_cls: frozen dataclass of its switches; `config.loss` holds exactly its fields.
      make_loss: `make_loss(cfg, **options) -> loss_fn(model, batch, rng, frozen)`.
      make_score: `make_score(cfg, score) -> score_fn(model, side) -> (score_B, sigma_B, lm_B)`, the
        sequence score a reward model ranks by (`score` is `config.eval.score`); None if it has none.
      make_reward_reader: `make_reward_reader(cfg) -> reader(model, side) -> (mu_BxN, sigma_BxN,
        mask_BxN)`, the per-transition rewards (transition t's action is token t+1); None if none.
      defaults: {kind: {config section: {key: value}}} it sets over that kind of pipeline's
        defaults, e.g. BT's {"reward_model": {"model": {"reward_weighting": "none"}}}.
      frozen: names of the frozen models its loss reads from `frozen` (e.g. ("reference",)).
      uncertainty: its score has a meaningful sigma (calibration is reported).
      score_keys: the `config.eval.score` values make_score accepts.
    """

    name: str
    title: str
    equation: str
    kinds: tuple[str, ...]
    data: str
    config_cls: type
    make_loss: Callable[..., Callable]
    make_score: Callable[..., Callable] | None = None
    make_reward_reader: Callable[..., Callable] | None = None
    defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    uncertainty: bool = False
    score_keys: tuple[str, ...] = ("last",)

    def __post_init__(self):
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"Objective {self.name!r}: kinds={self.kinds!r} must be drawn from {KINDS}")
        if any(k not in self.kinds for k in self.defaults):
            raise ValueError(f"Objective {self.name!r}: defaults for kinds {sorted(self.defaults)} it does not serve")
        if self.data not in DATA:
            raise ValueError(f"Objective {self.name!r}: data={self.data!r} is not one of {DATA}")
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"Objective {self.name!r}: config_cls must be a dataclass, got {self.config_cls!r}")

    def config(self, **values):
        """Its typed config from `config.loss` values; an unknown key is an error listing the known ones."""
        known = [f.name for f in dataclasses.fields(self.config_cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"config.loss.{unknown[0]} is not a setting of objective {self.name!r}; "
                              f"its settings: {known or 'none'}")
        return self.config_cls(**values)

    def loss_fn(self, cfg=None, **options):
        """`make_loss(cfg or the default config, **options)`."""
        return self.make_loss(self.config_cls() if cfg is None else cfg, **options)

    def score_fn(self, cfg=None, score: str = "last"):
        if self.make_score is None:
            raise ConfigError(f"objective {self.name!r} has no sequence score (it is not a reward-model objective)")
        if score not in self.score_keys:
            raise ConfigError(f"eval.score={score!r} is not one of {self.score_keys} for objective {self.name!r}")
        return self.make_score(self.config_cls() if cfg is None else cfg, score)

    def reward_reader(self, cfg=None):
        if self.make_reward_reader is None:
            raise ConfigError(f"objective {self.name!r} has no per-token reward")
        return self.make_reward_reader(self.config_cls() if cfg is None else cfg)


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    if objective.name in _REGISTRY:
        raise ValueError(f"objective {objective.name!r} is registered twice")
    _REGISTRY[objective.name] = objective
    return objective


def names(kind: str | None = None, data: str | None = None) -> tuple[str, ...]:
    """Registered objective names (sorted), optionally of one kind and data type."""
    return tuple(sorted(n for n, o in _REGISTRY.items()
                        if (kind is None or kind in o.kinds) and (data is None or o.data == data)))


def get(name: str, kind: str | None = None) -> Objective:
    """The objective called `name`; ConfigError listing the known ones (of `kind`) if there is none."""
    obj = _REGISTRY.get(name)
    if obj is None or (kind is not None and kind not in obj.kinds):
        what = f"a {kind} objective" if kind else "a known objective"
        raise ConfigError(f"config.objective={name!r} is not {what}; known: {', '.join(names(kind))}")
    return obj
