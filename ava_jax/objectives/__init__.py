"""Objectives: the registry (`get`, `names`) and each objective's loss, score and reward reader.

`get("ava_p").loss_fn(cfg)` is `loss_fn(model, batch, rng, frozen) -> (loss, metrics)` for the
train step; `get(name).score_fn(cfg, score)` scores sequences; `get(name).reward_reader(cfg)` reads
per-token rewards. See `registry.py` for what an objective declares.
"""
from ava_jax.objectives import ava, baselines, policy  # noqa: F401  registers the objectives
from ava_jax.objectives.forward import avril_inputs, forward_pair, forward_summary, lm_loglik
from ava_jax.objectives.registry import Objective, get, names, register

__all__ = ["Objective", "get", "names", "register", "avril_inputs", "forward_pair", "forward_summary",
           "lm_loglik"]
