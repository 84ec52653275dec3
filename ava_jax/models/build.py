"""Building the TQR model a run trains: a pretrained backbone from a local checkpoint, or a scratch one.

`BackboneSpec` is the typed `config.model` (the conversion is `ava_jax.config.backbone_spec`); the
checkpoint formats themselves live in `ava_jax.checkpoints`.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.models.tqr import TQR


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """path: a local checkpoint (`checkpoints.load.load_pretrained` reads it) or "scratch" (then
    `scratch` is the shape); dtype / param_dtype / remat / attention as in ModelConfig."""

    path: str
    scratch: ModelConfig | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | None = None
    attention: str = "auto"

    def __post_init__(self):
        if (self.path == "scratch") != (self.scratch is not None):
            raise ValueError("BackboneSpec: a scratch model needs its ModelConfig, a checkpoint path none")


def build_tqr(spec: BackboneSpec, heads: HeadConfig, seed: int = 0):
    """(TQR, tokenizer or None): fresh heads (seeded by `seed`) on the spec's backbone."""
    if spec.scratch is not None:
        return TQR(spec.scratch, heads, rngs=nnx.Rngs(seed)), None
    from ava_jax.checkpoints.load import load_pretrained
    return load_pretrained(spec.path, heads=heads, dtype=spec.dtype, param_dtype=spec.param_dtype,
                           remat=spec.remat, attention=spec.attention, rngs_seed=seed)
