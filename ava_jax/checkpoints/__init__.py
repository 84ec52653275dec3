"""Checkpoint formats <-> the backbone's parameter tree: Hugging Face (safetensors), llama2.c, GGUF.

`load_pretrained` / `save_pretrained` (in `load.py`) are the entry points; `hf`, `llama2c` and `gguf`
are pure format code.
"""
from ava_jax.checkpoints.load import build_model, load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained", "build_model"]
