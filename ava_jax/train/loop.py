"""The training loop shared by the pipelines: resume, progress, metrics, evaluation, checkpoints.

The loop asks a `BatchSource` for `next_batch(state, step)`, so a data iterator (`IteratorBatches`)
and a rollout generator (which samples from the current policy in `state`) are the same to it. A
source whose position must survive a resume exposes it as `checkpoint_iterator` (a grain iterator,
saved with the state); a source that rebuilds its batches from the state and the step needs none.

The host never waits on the device without need: each step is dispatched before the previous
step's metrics are fetched, and full metric means are pulled only on log steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Protocol

import jax
from tqdm.auto import tqdm

from ava_jax.train.checkpoint import RunCheckpointer
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.preemption import Preempted, PreemptionWatcher
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


class BatchSource(Protocol):
    """What the loop trains on: `next_batch(state, step)` returns the batch of step `step`."""

    checkpoint_iterator: Any  # a grain iterator whose position is saved with the state, or None

    def next_batch(self, state, step: int):
        ...


class IteratorBatches:
    """A BatchSource over a (grain) iterator of host batches; its position is checkpointed.

    transform: optional host-side function applied to each batch before the step sees it.
    """

    def __init__(self, iterator, transform: Callable | None = None):
        self.checkpoint_iterator = iterator
        self.transform = transform

    def next_batch(self, state, step: int):
        del state, step
        batch = next(self.checkpoint_iterator)
        return batch if self.transform is None else self.transform(batch)


def train_loop(step_fn, state, batches: BatchSource, key, options: LoopOptions, *, writer: MetricWriter,
               checkpointer: RunCheckpointer | None = None, eval_fn: Callable | None = None):
    """Runs `step_fn(state, batch, key)` from `state.step` to `options.num_steps`.

    Args:
      step_fn: the step from `make_train_step`.
      state: a TrainState (already restored if resuming; the loop starts at `state.step`).
      batches: a BatchSource (e.g. `IteratorBatches(grain_iterator)`).
      key: the run's PRNG key (each step folds in its step number).
      options: LoopOptions.
      writer: where metrics go (`train/...`, `eval/...`).
      checkpointer: saves the latest state (+ the source's iterator position), and the best state by
        its metric.
      eval_fn: `eval_fn(state) -> dict[str, float]`, run every `eval_every` steps and at the end.

    Returns:
      (state, last eval metrics or None).

    Raises:
      Preempted: after SIGTERM (`train.preemption`), at the first step boundary the source can resume
        from (`batches.resumable_at(step)`, e.g. a PPO iteration boundary; any step by default), with
        that step's state saved.
    """
    with PreemptionWatcher() as watcher:
        return _loop(step_fn, state, batches, key, options, writer, checkpointer, eval_fn, watcher)


class _AboveBars(logging.Handler):
    """Hands each record to a console handler with the progress bars cleared, then draws them
    again, so that the record prints on a line of its own instead of after the bar's text."""

    def __init__(self, inner: logging.Handler, stream):
        super().__init__(inner.level)
        self.inner, self.stream = inner, stream

    def handle(self, record):
        with tqdm.external_write_mode(file=self.stream):
            return self.inner.handle(record)


def _console_stream(handler: logging.Handler):
    """The stream of a handler that may share a terminal with the bar: a StreamHandler's (not a
    FileHandler's) or, for absl's handler (which `app.run` installs on the root), its Python
    handler's; None for any other handler."""
    inner = getattr(handler, "python_handler", handler)
    if isinstance(inner, logging.StreamHandler) and not isinstance(inner, logging.FileHandler):
        return inner.stream
    return None


@contextlib.contextmanager
def logs_above_bars(loggers=None):
    """While open, the console handlers of `loggers` (default: the root and `ava_jax`) print their
    records above the tqdm bars. tqdm's own `logging_redirect_tqdm` replaces only plain
    StreamHandlers, so with absl's handler the records would print twice."""
    loggers = [logging.getLogger(), logging.getLogger("ava_jax")] if loggers is None else loggers
    saved = [(logger, logger.handlers) for logger in loggers]
    try:
        for logger in loggers:
            logger.handlers = [h if (stream := _console_stream(h)) is None else _AboveBars(h, stream)
                               for h in logger.handlers]
        yield
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


def _loop(step_fn, state, batches, key, options, writer, checkpointer, eval_fn, watcher):
    start = int(jax.device_get(state.step))
    prev = None
    evals = None
    stop = False
    # A context manager, so an error raised mid-run closes the bar and prints on a line of its own;
    # log records (evaluations, checkpoints, the libraries' warnings) print above the bar.
    show = options.progress and jax.process_index() == 0
    with tqdm(total=options.num_steps, initial=start, disable=not show, desc="train", unit="step") as bar, \
            (logs_above_bars() if show else contextlib.nullcontext()):
        for step in range(start, options.num_steps):
            batch = batches.next_batch(state, step)
            if step == start and hasattr(step_fn, "describe_compiled"):  # style point 10: before step 1
                log.info("%s", step_fn.describe_compiled(state, batch, key))
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
                checkpointer.save(done, state, batches.checkpoint_iterator, force=True)
            elif done < options.num_steps:
                stop = stop or watcher.reached(done)  # latched: the sync point answers once
                if stop and getattr(batches, "resumable_at", lambda s: True)(done):
                    _check_bad(prev, options)
                    if checkpointer is not None:
                        checkpointer.save(done, state, batches.checkpoint_iterator, force=True)
                    raise Preempted(done, checkpointer.workdir if checkpointer is not None else None)
        if prev is not None:
            _check_bad(prev, options)
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
