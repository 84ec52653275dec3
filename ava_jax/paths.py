"""Where the package keeps what it makes once and reuses: generated datasets, built kernels; and,
for one process's runs only, what they share (`process_scratch`)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_SCRATCH: dict = {}


def cache_root() -> str:
    """`$AVA_JAX_CACHE`, else `~/.cache/ava_jax` (each user of it takes a subdirectory or a keyed name)."""
    return os.environ.get("AVA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ava_jax")


def process_scratch(name: str) -> str:
    """`<a temporary directory of this process's own>/<name>`, created on first use and removed with
    its parent at exit: for what a driver's runs share with each other and with no other process (a
    table's compiled programs, Table 4's reference log-probs), so that nothing outlives the process
    for a later run, or another process, to read."""
    if "root" not in _SCRATCH:
        _SCRATCH["root"] = tempfile.mkdtemp(prefix="ava_jax_process_")
        atexit.register(shutil.rmtree, _SCRATCH["root"], True)
    path = os.path.join(_SCRATCH["root"], name)
    os.makedirs(path, exist_ok=True)
    return path
