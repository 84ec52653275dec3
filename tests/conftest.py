"""Shared fixtures: tiny model configs for each architecture, and the run's compilation cache."""
import atexit
import os
import shutil
import tempfile

import jax
import pytest

from ava_jax.models.config import ModelConfig, RopeConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arch: str = "llama", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if arch == "llama" else 4,
                d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


TINY_CONFIGS = {
    "gpt2": lambda: tiny_config("gpt2"),
    "llama": lambda: tiny_config("llama"),
    "llama_scaled": lambda: tiny_config("llama", rope=RopeConfig(rope_type="llama3", factor=8.0,
                                                                 original_max_position_embeddings=16)),
    "qwen2": lambda: tiny_config("llama", qkv_bias=True, tie_embeddings=False),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def any_tiny_config(request) -> ModelConfig:
    return TINY_CONFIGS[request.param]()


def _share_compilation_cache():
    """One persistent XLA compilation cache for the whole run, shared by pytest-xdist's workers.

    Many tests compile the same tiny-model steps; with the cache a worker loads what another test
    (or the other worker) already compiled. The directory lives for one run only (the first process
    to get here creates it, the workers inherit its path, and it is removed at exit), so stale
    entries never leak between runs. Subprocess tests do not load this file and compile as usual.
    """
    path = os.environ.get("AVA_JAX_TEST_COMPILATION_CACHE")
    if path is None:
        path = os.environ["AVA_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="ava_jax_test_xla_")
        atexit.register(shutil.rmtree, path, True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # A size bound turns on the cache's file lock, so one worker never reads an entry the other is
    # still writing (a full run writes tens of MB).
    jax.config.update("jax_compilation_cache_max_size", 2 ** 30)


_share_compilation_cache()
