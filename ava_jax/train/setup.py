"""Run set-up shared by the pipelines: the optimizer, the train state in its shardings, the step,
the checkpointer, the metric writer, and resuming a run directory.

    run = start_run(model, loss_fn, batches, example, mesh=mesh, optimizer=opt_cfg, loop=loop_opts,
                    workdir=workdir, best_metric="accuracy", frozen={"reference": ref_model})
    state = run.train(key, eval_fn)
    run.close()

Call it inside `jax.set_mesh(mesh)`. The ConfigDict conversions (`config.optimizer_config`,
`config.loop_options`, `config.step_options`) live in `ava_jax/config.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import jax
import optax
from flax import nnx

from ava_jax.train.checkpoint import RunCheckpointer
from ava_jax.train.loop import BatchSource, LoopOptions, train_loop
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.step import (NO_FROZEN, StepOptions, TrainStep, fixed_params, freeze,
                                init_train_state, make_train_step)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (b1 0.9, b2 0.95) after global-norm clipping, on a warmup + cosine schedule (the
    `config.train` keys of the same names)."""

    learning_rate: float
    steps: int
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        checks = (("learning_rate", self.learning_rate > 0), ("steps", self.steps >= 1),
                  ("warmup_steps", self.warmup_steps >= 0), ("final_lr_fraction", 0 <= self.final_lr_fraction <= 1),
                  ("weight_decay", self.weight_decay >= 0), ("grad_clip", self.grad_clip > 0))
        for name, ok in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"OptimizerConfig.{name}={value!r} is out of range")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.steps, cfg.warmup_steps + 1),
                                                  end_value=cfg.learning_rate * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))


@dataclasses.dataclass
class TrainingRun:
    """What `start_run` set up; `train` runs the loop from the (possibly resumed) state."""

    graphdef: object
    state: object
    step: TrainStep
    batches: BatchSource
    options: LoopOptions
    writer: MetricWriter
    checkpointer: RunCheckpointer | None
    resumed_from: int | None
    fixed: object = None  # the parameters the state does not train (a LoRA run's base weights), or None

    def full_params(self, state=None):
        """Every parameter of the model: the trained ones of `state` (default: the run's) and the fixed ones."""
        params = (self.state if state is None else state).params
        return params if self.fixed is None else nnx.merge_state(params, self.fixed)

    def model(self, state=None):
        """The NNX module with the parameters of `state` (default: the run's)."""
        return nnx.merge(self.graphdef, self.full_params(state))

    def train(self, key, eval_fn: Callable | None = None):
        """Runs the loop to `options.num_steps`; returns (and keeps) the final state."""
        self.state, _ = train_loop(self.step, self.state, self.batches, key, self.options, writer=self.writer,
                                   checkpointer=self.checkpointer, eval_fn=eval_fn)
        return self.state

    @property
    def checkpoint_dir(self) -> str | None:
        """The directory of the latest saved step, or None without a run directory."""
        if self.checkpointer is None or self.checkpointer.latest_step() is None:
            return None
        return f"{self.checkpointer.workdir}/checkpoints/{self.checkpointer.latest_step()}"

    def close(self):
        self.writer.close()
        if self.checkpointer is not None:
            self.checkpointer.close()


def start_run(model, loss_fn, batches: BatchSource, batch_example, *, mesh, optimizer: OptimizerConfig,
              loop: LoopOptions, step_options: StepOptions = StepOptions(), workdir: str = "",
              best_metric: str | None = None, best_mode: str = "max", frozen: dict | None = None,
              trainable=None, views: dict | None = None) -> TrainingRun:
    """Creates the state, the jitted step and the run directory's writer and checkpointer; resumes.

    Args:
      model: the NNX module to train (its parameters are copied into their shardings).
      loss_fn: `loss_fn(model, batch, rng, frozen) -> (loss, metrics)`.
      batches: the BatchSource the loop reads (its iterator position is restored on resume).
      batch_example: one batch, for the step's input shardings.
      mesh: the device mesh (the caller is inside `jax.set_mesh(mesh)`).
      optimizer, loop, step_options: typed `config.train`.
      workdir: the run directory ("" writes nothing and never resumes); one that holds a checkpoint
        is resumed from its latest step (parameters, optimizer, step, data position).
      best_metric: the eval metric whose best value `best/` keeps (None: no best checkpoint);
        best_mode: "max" or "min".
      frozen: {name: NNX module} the loss reads but does not train (a reference policy, a reward
        model), passed to the step as sharded, non-donated arguments.
      trainable: the NNX filter of what is trained (None: every parameter; `models.lora.trainable`
        for LoRA). The rest is `TrainingRun.fixed`: non-donated step arguments, not in the optimizer
        and not checkpointed (a resume rebuilds them from the model given here).
      views: {name: (graphdef, key)} frozen models made of the fixed parameters under `key` (a LoRA
        run's reference: the backbone without adapters, read from the same base weights).
    """
    tx = make_optimizer(optimizer)
    if trainable is None:
        if views:
            raise ValueError("start_run: views read the fixed parameters, which only a `trainable` filter leaves")
        graphdef, state = init_train_state(model, tx, mesh)
        fixed = None
    else:
        graphdef, state = init_train_state(model, tx, mesh, trainable)
        fixed = fixed_params(model, trainable, mesh)
    frozen_models = freeze(frozen or {}, mesh, views) if (frozen or views) else NO_FROZEN
    step = make_train_step(graphdef, loss_fn, tx, mesh, state, batch_example, step_options, frozen_models, fixed)
    ckpt = RunCheckpointer(workdir, best_metric=best_metric, best_mode=best_mode) if workdir else None
    resumed = None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(state, batches.checkpoint_iterator)
        resumed = int(jax.device_get(state.step))
        log.info("resuming %s at step %d", workdir, resumed)
    return TrainingRun(graphdef, state, step, batches, loop, MetricWriter(workdir or None), ckpt, resumed, fixed)
