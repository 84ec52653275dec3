"""The entry point: locked configs, dispatch, and the generate pipeline on the bundled model."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_main(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ava_jax.main", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_unknown_config_key_is_an_error():
    proc = run_main("--config=configs/generate.py", "--config.sampling.temprature=0.5")
    assert proc.returncode != 0
    assert "temprature" in proc.stderr


def test_unknown_variant_and_pipeline_are_errors():
    proc = run_main("--config=configs/generate.py:huge")
    assert proc.returncode != 0 and "unknown variant 'huge'" in proc.stderr
    proc = run_main("--config=configs/generate.py:tiny", "--config.pipeline=dance")
    assert proc.returncode != 0 and "config.pipeline='dance'" in proc.stderr


def test_generate_tiny_prints_the_story():
    proc = run_main("--config=configs/generate.py:tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Greedy from "Once upon a time" continues the documented TinyStories-260K story.
    assert "Once upon a time, there was a little girl named Lily" in proc.stdout, proc.stdout


def test_paper_variant_without_a_checkpoint_path_says_so():
    proc = run_main("--config=configs/ava_p.py:paper")
    assert proc.returncode != 0 and "model.path is empty" in proc.stderr


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)


def test_bad_data_row_and_missing_file_end_with_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n{"prompt": "Q", "chosen": \n')
    jsonl = ("--config=configs/bt.py:tiny", "--config.data.format=jsonl")
    proc = run_main(*jsonl, f"--config.data.path={path}", "--config.data.on_bad_row=error")
    _assert_one_line_error(proc, f"{path}:2:", "not_json")
    missing = tmp_path / "missing.jsonl"
    proc = run_main(*jsonl, f"--config.data.path={missing}")
    _assert_one_line_error(proc, f"data.path='{missing}'", "does not exist")


@pytest.mark.parametrize("args,needles", [
    (("--config=configs/bt.py:tiny", "--config.data.formt=jsonl"), ("--config.data.formt", "'formt'")),
    (("--config=configs/bt.py:tiny", "--config.model.q_param=nonsense"), ("model.q_param='nonsense'",)),
    (("--config=configs/bt.py:tiny", "--config.train.steps=many"), ("--config.train.steps=many",)),
    (("--config=configs/generate.py:huge",), ("unknown variant 'huge'",)),
    (("--config=configs/generate.py:tiny", "--config.pipeline=dance"), ("config.pipeline='dance'",)),
    (("--config=configs/ava_p.py:paper",), ("model.path is empty",)),
    (("--config=configs/bt.py:tiny", "--config.model.attention=cudnn"), ("model.attention='cudnn'", "float32")),
    (("--config=configs/bt.py:tiny", "--config.model.attention=cudnn", "--config.model.dtype=bfloat16"),
     ("model.attention='cudnn' needs an NVIDIA GPU",)),
])
def test_config_mistakes_end_with_one_line(args, needles):
    _assert_one_line_error(run_main(*args), *needles)


TWO_STEPS = ("--config=configs/bt.py:hh_tiny", "--config.train.steps=2", "--config.train.log_every=1")


@pytest.mark.slow  # 30 s: a real run in a subprocess; the one-line error tests stay in the default suite
def test_tiny_run_keeps_library_info_logs_quiet(tmp_path):
    proc = run_main(*TWO_STEPS, f"--config.workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints").is_dir()  # Orbax did run, it just kept quiet
    assert "mesh: data=" in proc.stderr and "pairs tokenised" in proc.stderr  # ava_jax's own INFO lines
    assert "train: 100%" in proc.stderr  # the progress bar
    # Logged through absl's handler while the bar is drawn: on a line of its own, above the bar.
    before = re.search(r"(.)I\d{4} [\d:.]+ +\d+ loop\.py:\d+\] step 2 eval", proc.stderr, re.S)
    assert before and before.group(1) in "\r\n", proc.stderr[-3000:]
    for chatter in ("checkpoint_manager.py", "orbax", "CheckpointManager"):
        assert chatter not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_verbose_brings_library_info_logs_back(tmp_path):
    for flag in ("--verbose", "--verbosity=0"):
        proc = run_main(*TWO_STEPS, f"--config.workdir={tmp_path / flag.strip('-')}", flag)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "checkpoint_manager.py" in proc.stderr and "mesh: data=" in proc.stderr
