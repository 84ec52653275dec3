"""LoRA adapters on the backbone's projections (Hu et al. 2021), through qwix.

    lora_backbone, base_graphdef = lora.apply(backbone, LoraConfig(rank=8), seed=0)

`apply` hands the Transformer to qwix (google/qwix, the library Tunix trains LoRA with), which
intercepts every `jnp.einsum` whose right operand is a weight of a module matching `targets` and
adds `alpha / rank * x A B`, with A ~ He-uniform and B = 0, so the adapted model starts exactly at
the base. qwix fits this model as it is: every projection is one einsum with the weight on the
right (`models.transformer`; `models.linear.weight_einsum` hands that einsum to qwix unchanged
while it intercepts, and adds its faster weight gradient only when no adapters listen), the
adapters are `nnx.LoRAParam`s beside their weights (`wq_lora_a`, `wq_lora_b`, ...), and the
adapted module is an NNX module like any other, so the functional pattern (split, jit, merge) and
the KV-cache sampler run it unchanged.

What a LoRA run trains (`trainable`): the adapters and every parameter outside the backbone (reward,
Q and value heads, a separate critic). The base weights are the fixed part of the train state:
passed to the step as non-donated arguments, never in the optimizer, never checkpointed (a resume
reloads them from `model.path`), and the reference policy and the "initial" baseline are the same
arrays read through `base_graphdef`, the backbone without adapters. No second copy of the weights.

Export: `merged` (the base with W + alpha / rank * A B folded in: a plain Hugging Face directory)
or the adapters alone (`save_adapters`: `adapters.safetensors` + `adapter_config.json`, re-applied
onto the same base with `load_adapters`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.errors import ConfigError

ADAPTER_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`config.lora`: rank 0 is full fine-tuning; targets is a regex on the backbone's module paths
    (`blocks/0/attn`, `blocks/0/mlp`; the default adapts every attention and MLP projection, not the
    embedding or the LM head); export: "merged", "adapters" or "both"."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = r"blocks/\d+/(attn|mlp)"
    export: str = "merged"

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank} must be >= 0 (0: full fine-tuning)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0")
        if self.export not in ("merged", "adapters", "both"):
            raise ConfigError(f"lora.export={self.export!r} is not one of ('merged', 'adapters', 'both')")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"lora.targets={self.targets!r} is not a regular expression: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply(backbone, cfg: LoraConfig, seed: int = 0):
    """(the backbone with adapters, the graphdef of the backbone without them).

    The adapted module shares the base arrays with `backbone`. A ConfigError names `lora.targets`
    when it matches no projection.
    """
    import qwix
    base_graphdef = nnx.graphdef(backbone)
    provider = qwix.LoraProvider(module_path=cfg.targets, rank=cfg.rank, alpha=float(cfg.alpha))
    example = jnp.zeros((1, 2), jnp.int32)
    # qwix creates the adapters on the modules it sees called, so it must call the blocks themselves,
    # not the per-layer copies a rematerialised backbone merges inside its scan; the adapted model
    # then runs the scan like any other (each copy carries its layer's adapters).
    cfg_model = backbone.cfg
    backbone.cfg = dataclasses.replace(cfg_model, remat=False)
    try:
        adapted = qwix.apply_lora_to_model(backbone, provider, example, rngs=nnx.Rngs(lora=seed, params=seed))
    finally:
        backbone.cfg = cfg_model
    adapted.cfg = cfg_model
    if not adapter_names(adapted):
        raise ConfigError(f"lora.targets={cfg.targets!r} matched no projection of the backbone (its module paths "
                          "look like 'blocks/0/attn' and 'blocks/0/mlp')")
    return adapted, base_graphdef


def trainable(path, variable) -> bool:
    """The NNX filter of what a LoRA run trains: the adapters, and every parameter outside the backbone."""
    return isinstance(variable, nnx.LoRAParam) or (isinstance(variable, nnx.Param) and path[0] != "backbone")


def is_base(path, variable) -> bool:
    """The base weights: the backbone's parameters that are not adapters."""
    return isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam)


def adapter_names(module) -> list[str]:
    """'blocks.0.attn.wq' for every adapted weight, in path order."""
    return sorted(".".join(map(str, (*path, name))) for path, _, name in _adapted_modules(module))


def _adapted_modules(module):
    """(path, submodule, weight name) for every weight with adapters."""
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if name.endswith("_lora_a") and isinstance(value, nnx.LoRAParam):
                    yield path, node, name[: -len("_lora_a")]


def delta(lora_a, lora_b, weight_shape, scale: float) -> jax.Array:
    """alpha / rank * A B in the weight's shape. qwix gives A the weight's contracted axes then the
    rank, and B the rank then the remaining axes; every weight here stores its contracted axes first
    (`models.transformer`), so A B contracted over the rank is laid out as the weight."""
    d = jnp.tensordot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), axes=1)
    if d.size != int(np.prod(weight_shape)):
        raise ValueError(f"LoRA factors {lora_a.shape} x {lora_b.shape} do not give a weight of shape {weight_shape}")
    return scale * d.reshape(weight_shape)


def merged(adapted, base_graphdef, cfg: LoraConfig):
    """The backbone without adapters whose weights are W + alpha / rank * A B (new arrays)."""
    # copy=True: merge would otherwise put the adapted module's own Variables into `base`, and
    # folding the adapters in below would change the adapted module's base weights too.
    base = nnx.merge(base_graphdef, nnx.state(adapted, is_base), copy=True)
    for path, node, name in _adapted_modules(adapted):
        w = getattr(node, name)
        sub = base
        for key in path:
            sub = sub[key] if isinstance(key, int) else getattr(sub, key)
        d = delta(getattr(node, name + "_lora_a")[...], getattr(node, name + "_lora_b")[...], w.shape, cfg.scale)
        getattr(sub, name)[...] = (w[...].astype(jnp.float32) + d).astype(w[...].dtype)
    return base


def save_adapters(adapted, cfg: LoraConfig, out_dir: str, base: str = "") -> str:
    """`adapters.safetensors` (A and B of every adapted weight, by dotted path) and
    `adapter_config.json` (rank, alpha, targets, the base checkpoint) under out_dir."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, node, name in _adapted_modules(adapted):
        prefix = ".".join(map(str, (*path, name)))
        for side in ("a", "b"):
            tensors[f"{prefix}.lora_{side}"] = np.asarray(jax.device_get(getattr(node, f"{name}_lora_{side}")[...]))
    save_file(tensors, os.path.join(out_dir, ADAPTER_FILE))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({"format": "ava_jax-lora-1", "rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets,
                   "base_model": base, "adapted": sorted({k.rsplit(".", 1)[0] for k in tensors})}, f, indent=2)
    return out_dir


def load_adapters(backbone, adapter_dir: str):
    """(adapted backbone, base graphdef, LoraConfig): the adapters saved by `save_adapters` applied
    onto `backbone` (the same base architecture). A CheckpointError names a missing, extra or
    misshapen tensor."""
    from safetensors.numpy import load_file
    from ava_jax.errors import CheckpointError
    cfg_path = os.path.join(adapter_dir, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        cfg = LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=str(meta["targets"]))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: not a LoRA adapter config ({e})") from None
    adapted, base_graphdef = apply(backbone, cfg)
    tensors = load_file(os.path.join(adapter_dir, ADAPTER_FILE))
    seen = set()
    for path, node, name in _adapted_modules(adapted):
        prefix = ".".join(map(str, (*path, name)))
        for side in ("a", "b"):
            key, var = f"{prefix}.lora_{side}", getattr(node, f"{name}_lora_{side}")
            if key not in tensors:
                raise CheckpointError(f"{adapter_dir}/{ADAPTER_FILE}: no tensor {key!r}")
            if tuple(tensors[key].shape) != tuple(var.shape):
                raise CheckpointError(f"{adapter_dir}/{ADAPTER_FILE}: {key!r} has shape {tensors[key].shape}, the "
                                      f"model expects {tuple(var.shape)}")
            var[...] = jnp.asarray(tensors[key], var[...].dtype)
            seen.add(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise CheckpointError(f"{adapter_dir}/{ADAPTER_FILE}: tensors the model has no adapter for: {extra[:5]}")
    return adapted, base_graphdef, cfg


def count(module) -> tuple[int, int]:
    """(adapter parameters, base parameters) of an adapted module."""
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.LoRAParam)))
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(module, is_base)))
    return n_lora, n_base
