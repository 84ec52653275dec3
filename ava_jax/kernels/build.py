"""Build a kernel's C++ source into a shared library on first use, and cache it.

The library is compiled for this machine (`-march=native`, or without it where the compiler rejects
it) with JAX's XLA FFI headers (`jax.ffi.include_dir()`) by `$CXX` (default `c++`), and cached as
`$AVA_JAX_CACHE/kernels/<name>-<key>.so` (`paths.cache_root()`, default `~/.cache/ava_jax`). The
key hashes the source, the flags, the compiler's version, jaxlib's version and the CPU's model and
flags, so a changed source, toolchain or host builds afresh, and several processes (pytest's
workers) can build at once: each writes a temporary file and renames it into place.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import jaxlib

from ava_jax import paths

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         # Reductions may reassociate (vectorised sums); NaN and infinity keep their meaning.
         "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
         "-freciprocal-math")
PORTABLE = tuple(f for f in FLAGS if f != "-march=native")  # for a compiler that rejects -march=native


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why."""


def cache_dir() -> str:
    return os.path.join(paths.cache_root(), "kernels")


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX", "c++")
    exe = shutil.which(cxx.split()[0]) if cxx else None
    if exe is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX to one)")
    return [exe, *cxx.split()[1:]]


@functools.cache
def load(name: str) -> ctypes.CDLL:
    """The shared library of `<name>.cc` in this package, compiled if the cache does not have it.

    Raises BuildError with the compiler's first error line (of the -march=native attempt).
    """
    import jax  # the headers' location

    source = resources.files("ava_jax.kernels").joinpath(f"{name}.cc").read_text()
    cxx = _compiler()
    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{' '.join(cxx)} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([source, " ".join(FLAGS), version, jaxlib.__version__,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src, out = os.path.join(tmp, f"{name}.cc"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            first = None
            for flags in (FLAGS, PORTABLE):
                cmd = [*cxx, *flags, "-isystem", jax.ffi.include_dir(), "-o", out, src]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                except (OSError, subprocess.SubprocessError) as e:
                    raise BuildError(f"compiling {name}.cc failed: {e}") from None
                if done.returncode == 0:
                    break
                first = first or next((l for l in done.stderr.splitlines() if "error" in l),
                                      done.stderr.strip()[:300])
            else:
                raise BuildError(f"compiling {name}.cc failed ({' '.join(cxx)}): {first}")
            os.replace(out, path)
    try:
        return ctypes.cdll.LoadLibrary(path)
    except OSError as e:
        raise BuildError(f"loading {path} failed: {e}") from None
