"""The entry point: locked configs, dispatch, and the generate pipeline on the bundled model."""
import os
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
