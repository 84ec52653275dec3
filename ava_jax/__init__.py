"""ava_jax: Approximated Variational Alignment (AVA) for language models in JAX / Flax NNX."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public entry points, imported lazily so `import ava_jax` stays cheap.
_LAZY = {
    "load_pretrained": "ava_jax.checkpoints.load",
    "save_pretrained": "ava_jax.checkpoints.load",
    "load_tokenizer": "ava_jax.tokenizers",
    "TQR": "ava_jax.models.tqr",
    "ModelConfig": "ava_jax.models.config",
    "HeadConfig": "ava_jax.models.heads",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ava_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
