"""Typed, frozen description of a backbone's shape. Layers read this, never a ConfigDict."""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from ava_jax.errors import ConfigError

ARCHS = ("gpt2", "llama")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cpu_kernel", "cudnn")
CPU_KERNEL_HEAD_DIMS = (8, 16, 32, 64)  # the instances of ava_jax/kernels/cpu_attention.cc
# What cuDNN's fused attention takes: half-precision compute and a head dim that is a multiple of 8
# up to 128 (256 on Hopper and later; 128 keeps one rule for every card).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies, including the scaling variants of Llama 3 and Qwen2 (YaRN) configs.

    Field names follow the Hugging Face `rope_parameters` dict so configs round-trip unchanged.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    attention_factor: float | None = None  # yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only backbone (GPT-2 or the Llama family)."""

    arch: Literal["gpt2", "llama"]
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    head_dim: int | None = None  # defaults to d_model // n_heads
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 (and GPT-2, which has biases everywhere)
    tie_embeddings: bool = True
    rope: RopeConfig | None = None  # None for learned absolute positions (GPT-2)
    # Compute dtype and parameter dtype: bf16 compute on accelerators, float32 parameters.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Rematerialise each block in the backward pass: the blocks run as a checkpointed scan over their
    # stacked parameters (not with a KV cache), so only each layer's input is kept for the backward.
    # None (auto): on for the CPU backend, where it is the faster step as well as the smaller one
    # (docs/performance.md), off on accelerators, where the recomputation costs a third more FLOPs.
    remat: bool | None = None
    # "auto": the compiled causal kernel on CPU ("cpu_kernel", built on first use; where it cannot be
    # built or the head dim is not 8, the same query-blocked attention in XLA's ops,
    # "blocked"); cuDNN's fused (flash) attention on an NVIDIA GPU where it fits (`cudnn_fits`);
    # XLA's dot_product_attention elsewhere and with a KV cache. "xla" / "blocked" / "cpu_kernel" /
    # "cudnn" force one (ava_jax.models.attention).
    attention: str = "auto"
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"Unsupported architecture {self.arch!r}; supported: {ARCHS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.arch == "llama" and self.rope is None:
            object.__setattr__(self, "rope", RopeConfig())
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.attention == "cpu_kernel" and self.head_dim not in CPU_KERNEL_HEAD_DIMS:
            raise ConfigError(f"model.attention='cpu_kernel' is compiled for head dims {CPU_KERNEL_HEAD_DIMS}; got "
                              f"head_dim={self.head_dim}. Use model.attention='auto' or 'blocked'.")
        if self.attention == "cudnn" and not self.cudnn_fits():
            raise ConfigError(f"model.attention='cudnn' needs model.dtype in {CUDNN_DTYPES} and a head dim that is a "
                              f"multiple of 8 up to {CUDNN_MAX_HEAD_DIM}; got dtype={self.dtype!r}, "
                              f"head_dim={self.head_dim}. Use model.attention='auto' or 'xla'.")

    def cudnn_fits(self) -> bool:
        """Whether cuDNN's fused attention takes this shape and compute dtype."""
        return (self.dtype in CUDNN_DTYPES and self.head_dim % 8 == 0
                and self.head_dim <= CUDNN_MAX_HEAD_DIM)

    def remat_enabled(self) -> bool:
        """`remat` with None resolved for the backend this process computes on."""
        return jax.default_backend() == "cpu" if self.remat is None else self.remat

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
