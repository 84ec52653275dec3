"""Run checkpoints over Orbax: model parameters, optimizer state, step, and the data-iterator position.

Two managers under the run directory: `checkpoints/` keeps the latest few saves (resume point) and
`best/` keeps the single best by a validation metric. Orbax writes each save to a temporary
directory and renames it when complete, so a save that was killed midway is never listed and never
resumed from.

Resume order, highest priority first:
  1. the run directory already holds a checkpoint -> resume from its latest step (params, optimizer,
     step, data position);
  2. `init_from` names a checkpoint -> start from its parameters at step 0;
  3. otherwise -> the freshly initialised / pretrained parameters.
"""
from __future__ import annotations

import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class RunCheckpointer:
    """Saves and restores `TrainState` pytrees plus a grain iterator position."""

    def __init__(self, workdir: str, *, keep: int = 2, best_metric: str | None = None, best_mode: str = "max",
                 save_every: int = 1):
        self.workdir = os.path.abspath(workdir)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "data"))
        self.best = None
        if best_metric:
            self.best = ocp.CheckpointManager(
                os.path.join(self.workdir, "best"),
                options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[best_metric],
                                                     best_mode=best_mode, create=True,
                                                     enable_async_checkpointing=False),
                item_names=("state",))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.latest.save(step, args=ocp.args.Composite(**items), force=force)
        self.latest.wait_until_finished()
        return saved

    def save_best(self, step: int, state, metrics: dict) -> None:
        if self.best is None:
            return
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                       metrics={self.best_metric: float(metrics[self.best_metric])}, force=True)
        self.best.wait_until_finished()

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the latest (or given) step into the shardings of `abstract_state`.

        `abstract_state` is a pytree of arrays or ShapeDtypeStructs with shardings (e.g. the freshly
        created state); a checkpoint whose shapes differ raises an error naming the array.
        The data iterator, if given, is restored in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.workdir}/checkpoints")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            raise _shape_error(e, target, f"{self.workdir}/checkpoints/{step}") from None
        log.info("restored step %d from %s", step, self.workdir)
        return restored["state"]

    def restore_best(self, abstract_state):
        step = self.best.best_step() if self.best else None
        if step is None:
            raise FileNotFoundError(f"no best checkpoint under {self.workdir}/best")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    @property
    def best_dir(self) -> str | None:
        step = self.best.best_step() if self.best else None
        return None if step is None else os.path.join(self.workdir, "best", str(step))

    def close(self):
        self.latest.close()
        if self.best:
            self.best.close()


def _shape_error(err: ValueError, target, where: str) -> Exception:
    """Orbax's shape mismatch, as a user error naming the array (Orbax gives only the two shapes);
    any other ValueError unchanged."""
    from ava_jax.errors import CheckpointError
    m = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))", str(err))
    if not m:
        return err
    requested, stored = m.groups()
    names = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
             if str(tuple(getattr(leaf, "shape", ()))) == requested]
    name = names[0] if len(names) == 1 else (f"one of {', '.join(names[:4])}" if names else "an array")
    return CheckpointError(f"{where}: {name} has shape {stored} in the checkpoint but {requested} in this model; "
                           "the checkpoint is of another model shape (check model.* and the run directory)")
