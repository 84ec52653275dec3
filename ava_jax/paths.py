"""Where the package keeps what it makes once and reuses: generated datasets, built kernels."""
from __future__ import annotations

import os


def cache_root() -> str:
    """`$AVA_JAX_CACHE`, else `~/.cache/ava_jax` (each user of it takes a subdirectory or a keyed name)."""
    return os.environ.get("AVA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ava_jax")
