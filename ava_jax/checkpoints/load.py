"""`load_pretrained` / `save_pretrained`: pretrained backbones in and out of a TQR model.

Formats: a Hugging Face directory (config.json + safetensors; GPT-2, Llama, Qwen2), a llama2.c legacy
`.bin` (or a directory holding one), and a llama-architecture `.gguf` file. The backbone comes from
the checkpoint; the TQR heads are freshly initialised, with exactly the values
`TQR(cfg, heads, rngs=nnx.Rngs(rngs_seed))` gives them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.checkpoints import gguf, hf, llama2c
from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.models.tqr import TQR

log = logging.getLogger(__name__)


def _resolve(path: Path):
    """(format, model file or directory, tokenizer path or None) for any accepted checkpoint path."""
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf", path, path
        if llama2c.is_llama2c_dir(path):
            model, tok = llama2c.find_files(path)
            return "llama2c", model, tok
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0], ggufs[0]
    elif path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path, path
        if path.suffix == ".bin":
            model, tok = llama2c.find_files(path)
            return "llama2c", model, tok
        if path.name == "config.json":
            return "hf", path.parent, path.parent
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    raise ValueError(f"{path}: not a checkpoint this loader reads; expected a directory with config.json "
                     "(Hugging Face safetensors), a llama2.c .bin file or a directory holding stories*.bin / "
                     "model.bin, or a .gguf file (or a directory holding exactly one)")


def _not_backbone(path, _):
    return path[0] != "backbone"


def _variable(module: nnx.Module, path: tuple) -> nnx.Variable:
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def build_model(cfg: ModelConfig, heads: HeadConfig | None, params, seed: int = 0) -> TQR:
    """A TQR whose backbone parameters come from `params` ((path, array) pairs) and heads from `seed`.

    The backbone is never randomly initialised: a jitted construction of the whole TQR returns only
    the heads' state (XLA drops the unused backbone initialisers) and, from its trace, the abstract
    model; each backbone parameter is then set from the checkpoint, one tensor at a time.
    """
    heads = heads or HeadConfig()

    abstract = {}

    def init_heads():
        graphdef, state = nnx.split(TQR(cfg, heads, rngs=nnx.Rngs(seed)))
        abstract["graphdef"], abstract["state"] = graphdef, state
        return nnx.state(nnx.merge(graphdef, state), _not_backbone)

    # One trace gives both the abstract model and the heads' values (tracing the model is the slow part).
    head_state = xla.jit(init_heads)()
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.pop("state"))
    model = nnx.merge(abstract["graphdef"], shapes)
    nnx.update(model, head_state)
    unset = {path for path, _ in nnx.to_flat_state(nnx.state(model.backbone, nnx.Param))}
    for path, array in params:
        var = _variable(model.backbone, path)
        if tuple(array.shape) != tuple(var.shape):
            raise ValueError(f"backbone parameter {'.'.join(map(str, path))}: expected shape {tuple(var.shape)}, "
                             f"converted checkpoint tensor has {tuple(array.shape)}")
        var.set_value(jnp.asarray(array, dtype=cfg.jnp_param_dtype))
        unset.discard(path)
    if unset:
        raise ValueError(f"checkpoint left backbone parameters unset: {sorted('.'.join(map(str, p)) for p in unset)}")
    return model


def _load_tokenizer(path: Path | None):
    if path is None:
        return None
    try:
        from ava_jax.tokenizers import load_tokenizer
    except ModuleNotFoundError as err:
        if err.name != "ava_jax.tokenizers":
            raise
        log.warning("ava_jax.tokenizers is not available; loading %s without a tokenizer", path)
        return None
    try:
        return load_tokenizer(str(path))
    except ValueError as err:  # an unsupported tokenizer should not stop the weights from loading
        log.warning("No tokenizer loaded for %s: %s", path, err)
        return None


def load_pretrained(path: str | os.PathLike, *, heads: HeadConfig | None = None, dtype: str = "float32",
                    param_dtype: str = "float32", remat: bool | None = None, attention: str = "auto",
                    rngs_seed: int = 0):
    """Loads a pretrained backbone into a TQR model.

    Args:
      path: a Hugging Face directory (config.json + model.safetensors or model.safetensors.index.json;
        model_type gpt2, llama or qwen2), a llama2.c legacy `.bin` file or a directory holding
        `stories*.bin` / `model.bin` (tokenizer: sibling `tok512.bin` or `tokenizer.bin`), or a
        llama-architecture `.gguf` file.
      heads: TQR head options (default HeadConfig()); heads are freshly initialised.
      dtype: compute dtype. param_dtype: parameter dtype. remat: rematerialise blocks in backward
        (`ModelConfig.remat`; None: on for CPU, off on accelerators).
        attention: the attention kernel (`ModelConfig.attention`).
      rngs_seed: seed of `nnx.Rngs` for the heads.

    Returns:
      (model, tokenizer): a TQR, and an `ava_jax.tokenizers.Tokenizer` or None when the checkpoint
      has no tokenizer files.

    Raises:
      ValueError: unsupported architecture or config, or checkpoint tensors whose names or shapes do
        not fit the config (the message names the tensor, both shapes and the file).
    """
    kind, where, tok_path = _resolve(Path(path))
    overrides = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    opener = {"hf": hf.open_dir, "llama2c": llama2c.open_file, "gguf": gguf.open_file}[kind]
    cfg, source = opener(where, **overrides)
    if kind == "gguf" and not source.has_tokenizer:
        tok_path = None
    model = build_model(cfg, heads, hf.iter_params(cfg, source), rngs_seed)
    log.info("Loaded %s checkpoint %s: %s", kind, where, cfg)
    return model, _load_tokenizer(tok_path)


def save_pretrained(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """Writes the backbone as a Hugging Face checkpoint (config.json + float32 model.safetensors).

    GPT-2 backbones export as GPT2LMHeadModel (Conv1D [in, out] weights, fused c_attn), Llama-family
    ones as LlamaForCausalLM, or Qwen2ForCausalLM when they have q/k/v biases. The TQR heads have no
    Hugging Face counterpart and are not written. The tokenizer, when given, is written by its
    `save(dir)` method.

    Args:
      model: a TQR (or a bare Transformer backbone).
      tokenizer: an `ava_jax.tokenizers.Tokenizer` or None; supplies bos/eos ids for config.json.
      out_dir: output directory (created if needed).
    """
    out = Path(out_dir)
    backbone = getattr(model, "backbone", model)
    cfg = backbone.cfg

    def get(path):
        return np.asarray(_variable(backbone, path)[...], dtype=np.float32)

    bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    hf.write_dir(out, cfg, get, bos_id=bos, eos_id=eos)
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            tokenizer.save(str(out))
        else:
            log.warning("Tokenizer %s has no save(dir) method; %s has no tokenizer files",
                            type(tokenizer).__name__, out)
