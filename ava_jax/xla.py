"""How the package's programs are compiled: `jit` is `jax.jit` with the XLA options of the backend.

On CPU, XLA's LLVM back end runs at -O2 instead of its default -O3. Measured on this project's
programs (docs/performance.md, eighth pass): the same run times (the products run in libraries and
XLA's own emitters vectorise the fusions), and a quarter of the compile time of a padding-masked
forward (2.6 -> 0.7 s for the TinyStories model's rollout-sized log-probs: -O3 unrolls the attention
blocks' hoisted boolean masks into large vector code) and 0.5-1.5 s less for a train step. Every
program of a run compiles once, so for the short runs the lab repeats over seeds compile time is a
large part of the wall time: the PPO default went 152 -> 117 s. Results agree with -O3 to float32
rounding (vectorised reductions may sum in another order). Accelerators keep XLA's defaults, and so
does the decode loop (`sampling`), whose run time counts more than its compile.

The options are looked up when the function is jitted, after the backend is initialised (jitting
inside the functions that use it, or inside a `functools.cache` factory, does that).

`cache_compilations_for_this_process` is for the drivers that run many runs in one process (the
table and learning-curve drivers): every cell builds its own jitted steps, and without a cache each
compiled the same programs again for every seed.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from ava_jax import paths

log = logging.getLogger(__name__)

CPU_OPTIONS = {"xla_backend_optimization_level": 2}


def compiler_options() -> dict | None:
    """The XLA options this package compiles with on the default backend (None: XLA's defaults).

    An option the user sets in `XLA_FLAGS` (e.g. `--xla_backend_optimization_level=3`) is theirs: the
    package does not override it.
    """
    if jax.default_backend() != "cpu":
        return None
    user = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}=" not in user} or None


def jit(fun=None, /, **kwargs):
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()`; usable as `@jit` or `@jit(...)`."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


def cache_compilations_for_this_process() -> str | None:
    """Turns on JAX's persistent compilation cache in a directory of this process's own, removed at
    exit; returns that directory, or None where the cache was left as it was.

    For a process that runs many runs (a table's cells, a learning curve's points): their jitted
    functions are new objects in every run, so JAX's in-memory caches miss and each run compiled the
    same programs again (the stories main job's AVA-p step and scorer, about 3 of its 29 s, for every
    seed). A directory per process keeps the cache out of other processes' way (JAX writes entries
    without a lock) and leaves nothing behind that a later run, or a process killed mid-write, could
    trip on.

    Left as it was where the user chose (JAX_COMPILATION_CACHE_DIR in the environment, an empty
    value meaning off, or jax_compilation_cache_dir already set), and turned back off where XLA
    cannot load the entries it writes on this host (a probe program is written and read back first:
    some CPUs reject every XLA:CPU entry, jax-ml/jax#38445), so that no run prints an error per
    program. Call it before the runs; JAX decides at its first compilation whether a process uses
    the cache, and this resets that decision.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or jax.config.jax_compilation_cache_dir:
        return None
    path = paths.process_scratch("xla")
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()
    if _reads_back():
        return path
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    shutil.rmtree(path, ignore_errors=True)
    log.info("the compilation cache stays off: XLA did not load back a program it had written to %s", path)
    return None


def _reads_back() -> bool:
    """Whether a small program compiled into the cache is then loaded from it (a cache hit)."""
    hits = []

    def listener(event, **kwargs):
        del kwargs
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    x = np.zeros((8,), np.float32)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.monitoring.register_event_listener(listener)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        with warnings.catch_warnings():  # a failed read or write is a warning; its answer is the probe's
            warnings.simplefilter("ignore")
            for _ in range(2):  # a new function each time, so that JAX's in-memory caches miss
                def probe(v):
                    return jax.numpy.cumsum(v * 3.0 + 1.0)
                jax.jit(probe).lower(x).compile()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jax.monitoring.unregister_event_listener(listener)
    return bool(hits)
