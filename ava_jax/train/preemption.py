"""Preemption: a run that receives SIGTERM (what TPU and cloud schedulers send before they take the
machine) saves a checkpoint at the next step boundary and stops with `Preempted`, which the command
line turns into exit status 0; rerunning the same command resumes from that checkpoint.

On one process the signal sets a flag. On several, the hosts must agree on the step at which all of
them save, so the flag is JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`,
served by `jax.distributed`'s coordination service), which Orbax uses for the same purpose.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped at `step` after a preemption signal; the checkpoint of that step is saved."""

    def __init__(self, step: int, workdir: str | None):
        self.step, self.workdir = step, workdir
        where = f" in {workdir}" if workdir else " (no run directory: nothing was saved)"
        super().__init__(f"preempted: stopped at step {step}, checkpoint saved{where}; rerun the same command to "
                         "resume")


class PreemptionWatcher:
    """Context manager: installs a SIGTERM handler (main thread only) and restores the previous one."""

    def __init__(self):
        self.signalled = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint at the next step boundary, then stopping", signum)
        self.signalled = True

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (every process gets the same answer)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signalled
