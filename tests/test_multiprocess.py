"""Several JAX processes on this machine (a localhost coordinator, fake CPU devices, gloo
collectives): a 2-process run equals a 1-process run on as many devices, and a coordinator that
never answers is one error line, not a hang."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(n, devices, args, timeout=600):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_run.py"), str(i), str(n), str(port),
                               str(devices), "--", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return outs


def _losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir, step):
    """The saved parameters as NumPy arrays (no mesh needed to read them)."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)["params"]


@pytest.mark.slow
@pytest.mark.parametrize("config,steps", [("configs/bt.py:synthetic_tiny", 20), ("configs/dpo.py:synthetic_tiny", 6)])
def test_two_processes_equal_one_process_on_as_many_devices(tmp_path, config, steps):
    """2 processes x 4 devices against 1 process x 8 devices (about 1 min each): the same losses
    and final parameters within 1e-6; only process 0 prints the result and writes the summary."""
    common = [f"--config={config}", "--config.train.progress=False", "--config.train.log_every=2",
              f"--config.train.steps={steps}"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _launch(1, 8, common + [f"--config.workdir={one}"])
    outs = _launch(2, 4, common + [f"--config.workdir={two}"])
    assert "finished in" in outs[0][0] and "finished in" not in outs[1][0]
    la, lb = _losses(one), _losses(two)
    assert sorted(la) == sorted(lb) == list(range(2, steps + 1, 2))
    np.testing.assert_allclose([lb[k] for k in sorted(lb)], [la[k] for k in sorted(la)], rtol=0, atol=1e-6)
    pa, pb = _params(one, steps), _params(two, steps)
    import jax
    # Bradley-Terry's loss is invariant to the reward head's bias (it cancels in chosen - rejected):
    # its gradient is rounding noise, which Adam normalises into full-size steps of either sign, so
    # that one parameter is not comparable; every other one is.
    diffs = {jax.tree_util.keystr(k): float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(pa)[0], jax.tree.leaves(pb))
             if not (config.startswith("configs/bt") and "reward_head']['bias" in jax.tree_util.keystr(k))}
    assert len(diffs) > 10 and max(diffs.values()) < 1e-6, {k: v for k, v in diffs.items() if v >= 1e-6}
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    if "metrics" in s1:  # reward model: the same test accuracy
        assert s1["metrics"]["test"]["accuracy"] == pytest.approx(s2["metrics"]["test"]["accuracy"], abs=1e-9)
    else:  # policy: the same samples, so the same gold reward
        assert s1["final"]["gold_reward"] == pytest.approx(s2["final"]["gold_reward"], abs=1e-6)


def test_a_coordinator_that_never_answers_is_one_error_line_in_bounded_time():
    port = _free_port()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multiprocess_run.py"), "1", "2", str(port), "1", "--",
                           "--config=configs/generate.py:tiny"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "AVA_DIST_TIMEOUT": "3"})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --multihost: the coordinator localhost:") and "did not answer" in last


@pytest.mark.slow
def test_ppo_on_two_processes_equals_one_process_on_as_many_devices(tmp_path):
    """About 3 min: PPO on 2 processes x 4 devices against 1 process x 8, from the same reward model
    and SFT policy (the 1-process run trains them; retraining them on 2 processes differs at 1e-6,
    which the reward scale then amplifies): every process collects the same rollout and feeds the
    step its share of each minibatch, so the losses, the final parameters and the gold reward agree
    within 1e-6; process 0 alone writes the summary and the rollouts."""
    common = ["--config=configs/ppo.py:synthetic_tiny", "--config.train.progress=False"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _launch(1, 8, common + [f"--config.workdir={one}"], timeout=900)
    same = [f"--config.reward.path={one}/reward_model_ava_p", f"--config.model.path={one}/sft/policy",
            "--config.sft.enabled=False"]
    outs = _launch(2, 4, common + same + [f"--config.workdir={two}"], timeout=900)
    assert "finished in" in outs[0][0] and "finished in" not in outs[1][0]
    la, lb = _losses(one), _losses(two)
    assert la and sorted(la) == sorted(lb)
    np.testing.assert_allclose([lb[k] for k in sorted(lb)], [la[k] for k in sorted(la)], rtol=0, atol=1e-6)
    last = max(la)
    import jax
    pa, pb = _params(one, last), _params(two, last)
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))]
    assert len(diffs) > 10 and max(diffs) < 1e-6
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    assert s1["final"]["gold_reward"] == pytest.approx(s2["final"]["gold_reward"], abs=1e-6)
    rows = [json.loads(x) for x in open(os.path.join(two, "rollouts.jsonl"))]
    assert len(rows) == len([json.loads(x) for x in open(os.path.join(one, "rollouts.jsonl"))])
