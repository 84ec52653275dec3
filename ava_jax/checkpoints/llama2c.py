"""llama2.c "legacy" checkpoints (Karpathy's TinyStories models, e.g. the bundled stories260K.bin).

Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
vocab_size means the classifier is not tied), then float32 tok_emb[V,D], rms_att[L,D], wq[L,N*H,D],
wk[L,K*H,D], wv[L,K*H,D], wo[L,D,N*H], rms_ffn[L,D], w1[L,F,D], w2[L,D,F], w3[L,F,D], rms_final[D],
freq_cis_real[T,H/2], freq_cis_imag[T,H/2], then wcls[V,D] when untied. Weights are torch Linear
[out, in]. llama2.c's RoPE rotates interleaved pairs (x0,x1), (x2,x3), ...; our model rotates halves
(x_i, x_{i+H/2}). Permuting the rows of wq and wk inside each head, exactly as transformers'
convert_llama_weights_to_hf.py does, makes the two equivalent, so the tensors are presented under
Hugging Face Llama names and loaded by `hf.iter_params`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ava_jax.models.config import ModelConfig, RopeConfig

_HEADER_INTS = 7
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's version 1/2 exports, which this reader does not handle
THETA, NORM_EPS = 10000.0, 1e-5  # fixed by llama2.c's run.c


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair rows -> rotate-half rows, per head (transformers' `permute` for Meta weights)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class Llama2cSource:
    """A legacy llama2.c file as Hugging Face Llama tensors, memory-mapped and sliced per layer."""

    def __init__(self, path: Path):
        self.where = str(path)
        header = np.fromfile(path, dtype="<i4", count=_HEADER_INTS)
        if header.size < _HEADER_INTS:
            raise ValueError(f"{path}: too short for a llama2.c header ({header.size * 4} bytes)")
        if int(header[0]) == _VERSIONED_MAGIC:
            raise ValueError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy format is read")
        D, F, L, N, K, V, T = (int(x) for x in header)
        self.tied = V > 0
        V = abs(V)
        if min(D, F, L, N, K, V, T) <= 0 or D % N or N % K:
            raise ValueError(f"{path}: implausible llama2.c header dim={D} hidden_dim={F} n_layers={L} "
                             f"n_heads={N} n_kv_heads={K} vocab_size={V} seq_len={T}")
        H = D // N
        self.cfg = ModelConfig(arch="llama", vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K,
                               d_ff=F, max_seq_len=T, norm_eps=NORM_EPS, tie_embeddings=self.tied,
                               rope=RopeConfig(theta=THETA))
        order = [("tok_emb", (V, D)), ("rms_att", (L, D)), ("wq", (L, N * H, D)), ("wk", (L, K * H, D)),
                 ("wv", (L, K * H, D)), ("wo", (L, D, N * H)), ("rms_ffn", (L, D)), ("w1", (L, F, D)),
                 ("w2", (L, D, F)), ("w3", (L, F, D)), ("rms_final", (D,)), ("freq_cis_real", (T, H // 2)),
                 ("freq_cis_imag", (T, H // 2))] + ([] if self.tied else [("wcls", (V, D))])
        n_floats = sum(int(np.prod(s)) for _, s in order)
        expected_bytes, actual_bytes = 4 * (_HEADER_INTS + n_floats), path.stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(f"{path}: {actual_bytes} bytes, but the header (dim={D}, hidden_dim={F}, "
                             f"n_layers={L}, n_heads={N}, n_kv_heads={K}, vocab_size={V}, seq_len={T}) "
                             f"implies {expected_bytes}")
        data = np.memmap(path, dtype="<f4", mode="r", offset=4 * _HEADER_INTS, shape=(n_floats,))
        self.arrays, offset = {}, 0
        for name, shape in order:
            size = int(np.prod(shape))
            self.arrays[name] = data[offset:offset + size].reshape(shape)
            offset += size
        self._check_frequencies(H, T)
        self._names = {"model.embed_tokens.weight": ("tok_emb", None), "model.norm.weight": ("rms_final", None)}
        if not self.tied:
            self._names["lm_head.weight"] = ("wcls", None)
        for i in range(L):
            p = f"model.layers.{i}."
            for hf, ours in (("input_layernorm", "rms_att"), ("self_attn.q_proj", "wq"), ("self_attn.k_proj", "wk"),
                             ("self_attn.v_proj", "wv"), ("self_attn.o_proj", "wo"),
                             ("post_attention_layernorm", "rms_ffn"), ("mlp.gate_proj", "w1"),
                             ("mlp.down_proj", "w2"), ("mlp.up_proj", "w3")):
                self._names[f"{p}{hf}.weight"] = (ours, i)
        self.shapes = {n: self._array(n).shape for n in self._names}

    def _check_frequencies(self, H: int, T: int) -> None:
        """The file stores its RoPE table; make sure it is the theta=10000 table our RoPE computes."""
        angles = np.arange(T)[:, None] * THETA ** (-np.arange(0, H, 2) / H)[None, :]
        err = max(np.abs(self.arrays["freq_cis_real"] - np.cos(angles)).max(),
                  np.abs(self.arrays["freq_cis_imag"] - np.sin(angles)).max())
        if err > 1e-3:
            raise ValueError(f"{self.where}: freq_cis tables differ from RoPE theta={THETA} by {err:.3g}")

    def _array(self, name: str) -> np.ndarray:
        key, layer = self._names[name]
        return self.arrays[key] if layer is None else self.arrays[key][layer]

    def label(self, name: str) -> str:
        key, layer = self._names.get(name, (name, None))
        return f"tensor {key}" + ("" if layer is None else f"[{layer}]") + f" ({name}) in {self.where}"

    def ignore(self, name: str) -> bool:
        return False

    def read(self, name: str) -> np.ndarray:
        key, _ = self._names[name]
        w = np.asarray(self._array(name), dtype=np.float32)
        if key == "wq":
            return permute_rotary(w, self.cfg.n_heads)
        if key == "wk":
            return permute_rotary(w, self.cfg.n_kv_heads)
        return w


MODEL_GLOBS = ("stories*.bin", "model.bin")
TOKENIZER_NAMES = ("tok512.bin", "tokenizer.bin")


def find_files(path: Path) -> tuple[Path, Path | None]:
    """(model .bin, tokenizer .bin or None) for a llama2.c file or a directory holding one."""
    if path.is_dir():
        models = sorted({m for g in MODEL_GLOBS for m in path.glob(g)} - {path / t for t in TOKENIZER_NAMES})
        if len(models) != 1:
            raise ValueError(f"{path}: expected exactly one llama2.c model ({' or '.join(MODEL_GLOBS)}), "
                             f"found {[m.name for m in models]}")
        path = models[0]
    elif path.name in TOKENIZER_NAMES:
        raise ValueError(f"{path}: this is a llama2.c tokenizer file, not a model checkpoint")
    tokenizer = next((path.parent / t for t in TOKENIZER_NAMES if (path.parent / t).exists()), None)
    return path, tokenizer


def is_llama2c_dir(path: Path) -> bool:
    return path.is_dir() and any(m.name not in TOKENIZER_NAMES for g in MODEL_GLOBS for m in path.glob(g))


def open_file(path: Path, **overrides) -> tuple[ModelConfig, Llama2cSource]:
    source = Llama2cSource(path)
    return source.cfg.replace(**overrides), source
