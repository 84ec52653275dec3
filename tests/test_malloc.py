"""`malloc.keep_temporaries_on_heap`: an XLA program's temporaries between glibc's default mmap
threshold (32 MiB at most) and 64 MiB stop being mapped and faulted in at every call; the user's own
GLIBC_TUNABLES thresholds are left alone."""
import json
import os
import subprocess
import sys
from statistics import median

import pytest

from ava_jax import malloc

glibc = pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                           reason="the thresholds are glibc's")

# A program whose only temporary is x @ x.T, 46.8 MiB: above glibc's largest dynamic threshold,
# under the package's. Minor page faults of each of 20 calls after the compiling one.
PROGRAM = """
import json, resource, sys
import jax, jax.numpy as jnp
from ava_jax import malloc
tuned = malloc.keep_temporaries_on_heap() if sys.argv[1] == "on" else None
f = jax.jit(lambda x: (x @ x.T) @ x[:, :8])
x = jnp.ones((3500, 64))
compiled = f.lower(x).compile()
compiled(x).block_until_ready()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(tuned=tuned, temp=compiled.memory_analysis().temp_size_in_bytes, faults=faults)))
"""


def run_program(mode: str, env=None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_temporary_under_the_threshold_is_reused_between_calls():
    page = os.sysconf("SC_PAGE_SIZE")
    off, on = run_program("off"), run_program("on")
    assert 32 << 20 < on["temp"] < malloc.MMAP_THRESHOLD
    whole = on["temp"] // page
    # Without the call every call faults the whole buffer in (so the measurement can see it) ...
    assert median(off["faults"]) > 0.9 * whole, off
    # ... with it, once per worker thread's arena, then no more (the last ten calls).
    assert on["tuned"] is True
    assert median(on["faults"][10:]) < 0.02 * whole, on


@glibc
def test_the_users_tunables_win():
    assert run_program("on", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})["tuned"] is False
    user = run_program("on", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert user["tuned"] is False
    assert median(user["faults"]) > 0.9 * user["temp"] // os.sysconf("SC_PAGE_SIZE")  # still theirs: mapped


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(malloc.os, "confstr", lambda name: "musl")
    assert malloc.keep_temporaries_on_heap() is False


def test_a_refused_mmap_threshold_changes_nothing(monkeypatch):
    """A glibc that caps the mmap threshold at 32 MiB refuses ours: then the trim threshold is left alone."""
    calls = []

    class Libc:
        @staticmethod
        def mallopt(param, value):
            calls.append(param)
            return int(param != malloc._M_MMAP_THRESHOLD)

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(malloc.os, "confstr", lambda name: "glibc 2.17")
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: Libc)
    assert malloc.keep_temporaries_on_heap() is False
    assert calls == [malloc._M_MMAP_THRESHOLD]
