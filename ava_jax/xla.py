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
"""
from __future__ import annotations

import functools
import os

import jax

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
