"""Building the compiled kernels: the cache, and the errors when there is no working compiler."""
import os
import re
import subprocess

import pytest

from jax.sharding import AbstractMesh, PartitionSpec as P

from ava_jax import sharding as shd
from ava_jax.kernels import build, cpu_attention


def test_build_is_cached_per_source_and_toolchain(tmp_path, monkeypatch, cpu_kernel):
    monkeypatch.setenv("AVA_JAX_CACHE", str(tmp_path))
    compiles = []
    run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-shared" in cmd:
            compiles.append(cmd)
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(build.subprocess, "run", counting_run)
    lib = build.load.__wrapped__("cpu_attention")
    assert hasattr(lib, "AvaCausalAttentionForward") and hasattr(lib, "AvaCausalAttentionBackward")
    built = os.listdir(tmp_path / "kernels")
    assert len(compiles) == 1 and len(built) == 1 and built[0].startswith("cpu_attention-"), built
    build.load.__wrapped__("cpu_attention")  # a second process finds the library
    assert len(compiles) == 1 and os.listdir(tmp_path / "kernels") == built


@pytest.mark.parametrize("cxx,message", [
    ("no-such-compiler-ava", "no C++ compiler: 'no-such-compiler-ava' is not on PATH"),
    ("false", "compiling cpu_attention.cc failed"),  # a compiler that fails (with and without -march=native)
])
def test_build_errors_say_why(tmp_path, monkeypatch, cxx, message):
    monkeypatch.setenv("AVA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(build.BuildError, match=re.escape(message)):
        build.load.__wrapped__("cpu_attention")
    built = os.listdir(tmp_path / "kernels") if os.path.exists(tmp_path / "kernels") else []
    assert not [f for f in built if f.endswith(".so")], built


def test_a_compiler_that_rejects_march_native_builds_the_portable_library(tmp_path, monkeypatch, cpu_kernel):
    wrapper = tmp_path / "cxx"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && { echo "error: no native" >&2; '
                       'exit 1; }; done\nexec c++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("AVA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(wrapper))
    lib = build.load.__wrapped__("cpu_attention")
    assert hasattr(lib, "AvaCausalAttentionForward")


@pytest.mark.parametrize("B,K,expect", [
    (8, 4, (P(("data", "fsdp"), "tensor"), P(("data", "fsdp")))),
    (8, 3, (P(("data", "fsdp")), P(("data", "fsdp")))),  # heads do not divide: replicated over tensor
    (6, 4, (P(None, "tensor"), P())),  # the batch does not divide the data axes
    (6, 3, (P(), P())),  # neither: the whole call on every device
])
def test_per_shard_specs_split_what_divides(B, K, expect):
    mesh = AbstractMesh((2, 2, 2), shd.AXES)
    assert cpu_attention.shard_specs((B, K, 2, 16, 8), mesh) == expect
