"""Shared fixtures: tiny model configs for each architecture, the compiled CPU kernel, and the run's
compilation cache."""
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


@pytest.fixture
def cpu_kernel():
    """Skips a test of the compiled CPU kernel on a machine without a C++ compiler (the package then
    runs XLA's ops instead); any other reason the kernel cannot be built is a failure."""
    from ava_jax.kernels import cpu_attention
    reason = cpu_attention.unavailable_reason()
    if reason is not None and reason.startswith("no C++ compiler"):
        pytest.skip(reason)
    assert reason is None, reason


@pytest.fixture(params=sorted(TINY_CONFIGS))
def any_tiny_config(request) -> ModelConfig:
    return TINY_CONFIGS[request.param]()


def _use_a_compilation_cache():
    """A persistent XLA compilation cache for the run, one directory per pytest-xdist worker.

    Many tests compile the same tiny-model steps; with the cache a worker loads what one of its
    earlier tests already compiled. Each worker has its own directory: JAX writes entries without a
    lock unless the cache has a size bound, and a bound (which turns the file lock on) made a run
    1.6x slower here. The directories live for one run only (the first process to get here creates
    their parent, the workers inherit its path, and it is removed at exit), so stale entries never
    leak between runs. Subprocess tests do not load this file and compile as usual.
    """
    root = os.environ.get("AVA_JAX_TEST_COMPILATION_CACHE")
    if root is None:
        root = os.environ["AVA_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="ava_jax_test_xla_")
        atexit.register(shutil.rmtree, root, True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, os.environ.get("PYTEST_XDIST_WORKER", "main")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_use_a_compilation_cache()
