"""SIGTERM during training: a complete checkpoint at the next step boundary, exit status 0 on the
command line, and a resume that equals the uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ava_jax.pipelines import reward_model
from ava_jax.train import loop
from ava_jax.train.preemption import Preempted
from conftest import REPO


def _config(workdir):
    c = reward_model.default_config("bt", "synthetic_tiny")
    c.workdir, c.train.progress = str(workdir), False
    c.train.update(steps=24, checkpoint_every=0, eval_every=0, log_every=4)
    return c


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    full = reward_model.run(_config(tmp_path / "full"))
    real = loop.IteratorBatches.next_batch

    def signalling(self, state, step):
        if step == 9:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the watcher's handler, not the default
        return real(self, state, step)
    monkeypatch.setattr(loop.IteratorBatches, "next_batch", signalling)
    with pytest.raises(Preempted) as info:
        reward_model.run(_config(tmp_path / "cut"))
    assert info.value.step == 10 and (tmp_path / "cut" / "checkpoints" / "10").is_dir()
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again
    monkeypatch.setattr(loop.IteratorBatches, "next_batch", real)
    resumed = reward_model.run(_config(tmp_path / "cut"))
    for split in ("validation", "test"):
        for k in ("accuracy", "margin"):
            np.testing.assert_allclose(resumed.metrics[split][k], full.metrics[split][k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_on_the_command_line_exits_zero_with_a_checkpoint(tmp_path):
    """The real signal to a running `python -m ava_jax.main` (about 40 s)."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ava_jax.main", "--config=configs/bt.py:synthetic_tiny",
                             f"--config.workdir={workdir}", "--config.train.steps=100000",
                             "--config.train.log_every=1", "--config.train.progress=False"],
                            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("train/loss") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: stopped at step" in err
    steps = [int(p) for p in os.listdir(workdir / "checkpoints")]
    assert steps and 3 <= max(steps) < 100000
