"""Shared fixtures: tiny model configs for each architecture."""
import os

import pytest

from ava_jax.models.config import ModelConfig, RopeConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arch: str = "llama", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if arch == "llama" else 4,
                d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


TINY_CONFIGS = {
    "gpt2": lambda: tiny_config("gpt2"),
    "llama": lambda: tiny_config("llama"),
    "llama_scaled": lambda: tiny_config("llama", rope=RopeConfig(rope_type="llama3", factor=8.0,
                                                                 original_max_position_embeddings=16)),
    "qwen2": lambda: tiny_config("llama", qkv_bias=True, tie_embeddings=False),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def any_tiny_config(request) -> ModelConfig:
    return TINY_CONFIGS[request.param]()
