"""GGUF checkpoints (llama.cpp) of the "llama" architecture, e.g. SmolLM2-135M-Instruct.

Read with `gguf.GGUFReader` (memory-mapped) and dequantised one tensor at a time with
`gguf.quants.dequantize` in NumPy. Hyperparameters come from the `llama.*` metadata. llama.cpp's
convert_hf_to_gguf.py permutes the rows of q/k weights from the Hugging Face rotate-half order to
llama.cpp's interleaved-pair order; we undo it exactly as transformers' GGUF loader does
(`LlamaTensorProcessor._reverse_permute_weights`), then present the tensors under Hugging Face Llama
names so `hf.iter_params` converts them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ava_jax.models.config import ModelConfig, RopeConfig

SUPPORTED_ARCHS = ("llama",)
_REQUIRED = object()
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows -> rotate-half rows, per head (transformers' reverse permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(name: str) -> str:
    """Inverse of `hf_name` (names without a GGUF counterpart are returned unchanged)."""
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    block = {v: k for k, v in _BLOCK_NAMES.items()}
    if m and m.group(2) in block:
        return f"blk.{m.group(1)}.{block[m.group(2)]}.weight"
    return name


class GGUFSource:
    """A llama-architecture GGUF file: its config and its tensors under Hugging Face Llama names."""

    def __init__(self, path: Path):
        from gguf import GGUFReader  # imported here: the gguf package is only needed for GGUF files

        self.where = str(path)
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: not a readable GGUF file ({err})") from None
        arch = self._field("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHS)}")
        self.tensors = {}  # Hugging Face name (or the GGUF name when unmapped) -> ReaderTensor
        for t in self.reader.tensors:
            self.tensors[hf_name(t.name) or t.name] = t
        if "rope_freqs.weight" in self.tensors:
            raise ValueError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, Llama 3.1 style) "
                             "is not supported")
        self.shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in self.tensors.items()}
        self.has_tokenizer = "tokenizer.ggml.model" in self.reader.fields
        self.cfg = self._config()

    def _field(self, key: str, default=_REQUIRED):
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.where}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _config(self) -> ModelConfig:
        D = int(self._field("llama.embedding_length"))
        N = int(self._field("llama.attention.head_count"))
        K = int(self._field("llama.attention.head_count_kv", N))
        H = int(self._field("llama.attention.key_length", D // N))
        rot = int(self._field("llama.rope.dimension_count", H))
        if rot != H:
            raise ValueError(f"{self.where}: llama.rope.dimension_count={rot} != head_dim={H} "
                             "(partial rotary embeddings are not supported)")
        vocab = self._field("llama.vocab_size", None)
        if vocab is None:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else self.shapes["model.embed_tokens.weight"][0]
        ctx = int(self._field("llama.context_length"))
        theta = float(self._field("llama.rope.freq_base", 10000.0))
        scaling = self._field("llama.rope.scaling.type", "none")
        if scaling == "none":
            rope = RopeConfig(theta=theta)
        elif scaling in ("linear", "yarn"):
            factor = float(self._field("llama.rope.scaling.factor"))
            orig = self._field("llama.rope.scaling.original_context_length", None)
            rope = RopeConfig(theta=theta, rope_type=scaling, factor=factor,
                              original_max_position_embeddings=None if orig is None else int(orig))
        else:
            raise ValueError(f"{self.where}: llama.rope.scaling.type={scaling!r} is not supported "
                             "(supported: none, linear, yarn)")
        return ModelConfig(arch="llama", vocab_size=int(vocab), d_model=D, n_layers=int(self._field("llama.block_count")),
                           n_heads=N, n_kv_heads=K, head_dim=H, d_ff=int(self._field("llama.feed_forward_length")),
                           max_seq_len=ctx, norm_eps=float(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                           tie_embeddings="lm_head.weight" not in self.tensors, rope=rope)

    def label(self, name: str) -> str:
        return f"tensor {gguf_name(name)!r} in {self.where}"

    def ignore(self, name: str) -> bool:
        return False

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        w = dequantize(t.data, t.tensor_type).reshape(self.shapes[name])
        if name.endswith("self_attn.q_proj.weight"):
            return reverse_permute(w, self.cfg.n_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return reverse_permute(w, self.cfg.n_kv_heads)
        return w


def open_file(path: Path, **overrides) -> tuple[ModelConfig, GGUFSource]:
    source = GGUFSource(path)
    return source.cfg.replace(**overrides), source
