"""The training loop shared by the pipelines: resume, progress, metrics, evaluation, checkpoints.

The host never waits on the device without need: each step is dispatched before the previous
step's metrics are fetched, and full metric means are pulled only on log steps.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
from tqdm.auto import tqdm

from ava_jax.train.checkpoint import RunCheckpointer
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.step import metric_means

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    num_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: checkpoint only at the end (if a checkpointer is given)
    max_consecutive_bad_steps: int = 5
    progress: bool = True


def train_loop(step_fn, state, data_iter, key, options: LoopOptions, *, writer: MetricWriter,
               checkpointer: RunCheckpointer | None = None, eval_fn: Callable | None = None,
               on_batch: Callable | None = None):
    """Runs `step_fn(state, batch, key)` from `state.step` to `options.num_steps`.

    Args:
      step_fn: the jitted step from `make_train_step`.
      state: a TrainState (already restored if resuming; the loop starts at `state.step`).
      data_iter: an iterator of host batches (its position is checkpointed with the state).
      key: the run's PRNG key (each step folds in its step number).
      options: LoopOptions.
      writer: where metrics go (`train/...`, `eval/...`).
      checkpointer: saves the latest state + data position, and the best state by its metric.
      eval_fn: `eval_fn(state) -> dict[str, float]`, run every `eval_every` steps and at the end.
      on_batch: optional host-side transform of each batch before it is fed to the step.

    Returns:
      (state, last eval metrics or None).
    """
    start = int(jax.device_get(state.step))
    prev = None
    evals = None
    bar = tqdm(total=options.num_steps, initial=start, disable=not options.progress, desc="train", unit="step")
    for step in range(start, options.num_steps):
        batch = next(data_iter)
        if on_batch is not None:
            batch = on_batch(batch)
        state, metrics = step_fn(state, batch, key)
        if prev is not None:  # the previous step's flag: dispatched one step ago, so this rarely waits
            _check_bad(prev, options)
        prev = (step + 1, metrics)
        done = step + 1
        if done % options.log_every == 0 or done == options.num_steps:
            means = metric_means(metrics)
            writer.write(done, means, prefix="train/")
            bar.set_postfix(loss=f"{means['loss']:.4f}")
        bar.update(1)
        if eval_fn is not None and ((options.eval_every and done % options.eval_every == 0)
                                    or done == options.num_steps):
            evals = eval_fn(state)
            writer.write(done, evals, prefix="eval/")
            log.info("step %d eval: %s", done, ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
            if checkpointer is not None:
                checkpointer.save_best(done, state, evals)
        if checkpointer is not None and ((options.checkpoint_every and done % options.checkpoint_every == 0)
                                         or done == options.num_steps):
            checkpointer.save(done, state, data_iter, force=True)
    if prev is not None:
        _check_bad(prev, options)
    bar.close()
    return state, evals


def _check_bad(prev, options):
    """Raises once the step's consecutive non-finite count (kept in TrainState) reaches the limit."""
    step, metrics = prev
    run = int(jax.device_get(metrics["bad_run"][0]))
    if run:
        log.warning("step %d: non-finite loss or gradient, update skipped", step)
    if run >= options.max_consecutive_bad_steps:
        raise NonFiniteError(
            f"{run} consecutive steps had a non-finite loss or gradient (steps "
            f"{list(range(step - run + 1, step + 1))}); stopping (train.max_consecutive_bad_steps="
            f"{options.max_consecutive_bad_steps})")
