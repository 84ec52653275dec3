"""Hugging Face checkpoints: config.json <-> ModelConfig and safetensors <-> the backbone's parameters.

Covers GPT2LMHeadModel, LlamaForCausalLM and Qwen2ForCausalLM, from a single `model.safetensors` or a
sharded `model.safetensors.index.json`. The tensor layout is described once, as a list of `Entry`s
(checkpoint tensor name and shape, the backbone parameters it fills, and the conversion both ways), so
import and export cannot drift apart. The llama2.c and GGUF readers present their tensors under the
Llama names here and reuse the same entries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ava_jax.models.config import ModelConfig, RopeConfig

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters (GPT-2 causal masks, cached RoPE frequencies).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# safetensors dtypes NumPy cannot hold; they are read through JAX instead.
_NON_NUMPY_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")

ParamPath = tuple  # a backbone parameter path, e.g. ("blocks", 0, "attn", "wq")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its name and shape, the backbone parameters it fills, and the conversions."""

    name: str
    shape: tuple[int, ...]
    paths: tuple[ParamPath, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    from_ours: Callable[..., np.ndarray]


def _reshaped(name, shape, path, ours) -> Entry:
    """Same memory order in both layouts (norms, embeddings, GPT-2's Conv1D [in, out] weights)."""
    return Entry(name, shape, (path,), lambda a: (a.reshape(ours),), lambda w: w.reshape(shape))


def _transposed(name, shape, path, ours) -> Entry:
    """A torch Linear weight [out, in]; ours is [in, out] with the axes split (e.g. [D, N, H])."""
    return Entry(name, shape, (path,), lambda a: (a.T.reshape(ours),), lambda w: w.reshape(shape[::-1]).T)


def _split(name, shape, paths, ours) -> Entry:
    """GPT-2's fused c_attn: q, k and v side by side along the last axis."""
    return Entry(name, shape, tuple(paths),
                 lambda a: tuple(p.reshape(ours) for p in np.split(a, len(paths), axis=-1)),
                 lambda *ws: np.concatenate([w.reshape(shape[:-1] + (-1,)) for w in ws], axis=-1))


def model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model_type a backbone exports as (Llama with q/k/v biases is Qwen2)."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen2" if cfg.qkv_bias else "llama"


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every checkpoint tensor of `cfg`'s backbone in Hugging Face names and layouts."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    out: list[Entry] = []
    if cfg.arch == "gpt2":
        if K != N or N * H != D:
            raise ValueError(f"GPT-2 needs n_kv_heads == n_heads and n_heads * head_dim == d_model; got {cfg}")
        out += [_reshaped("transformer.wte.weight", (V, D), ("embed",), (V, D)),
                _reshaped("transformer.wpe.weight", (cfg.max_seq_len, D), ("pos_embed",), (cfg.max_seq_len, D))]
        for i in range(cfg.n_layers):
            h, b = f"transformer.h.{i}.", ("blocks", i)
            out += [
                _reshaped(h + "ln_1.weight", (D,), b + ("ln_attn", "scale"), (D,)),
                _reshaped(h + "ln_1.bias", (D,), b + ("ln_attn", "bias"), (D,)),
                _split(h + "attn.c_attn.weight", (D, 3 * D), [b + ("attn", w) for w in ("wq", "wk", "wv")], (D, N, H)),
                _split(h + "attn.c_attn.bias", (3 * D,), [b + ("attn", w) for w in ("bq", "bk", "bv")], (N, H)),
                _reshaped(h + "attn.c_proj.weight", (D, D), b + ("attn", "wo"), (N, H, D)),
                _reshaped(h + "attn.c_proj.bias", (D,), b + ("attn", "bo"), (D,)),
                _reshaped(h + "ln_2.weight", (D,), b + ("ln_mlp", "scale"), (D,)),
                _reshaped(h + "ln_2.bias", (D,), b + ("ln_mlp", "bias"), (D,)),
                _reshaped(h + "mlp.c_fc.weight", (D, F), b + ("mlp", "w_fc"), (D, F)),
                _reshaped(h + "mlp.c_fc.bias", (F,), b + ("mlp", "b_fc"), (F,)),
                _reshaped(h + "mlp.c_proj.weight", (F, D), b + ("mlp", "w_proj"), (F, D)),
                _reshaped(h + "mlp.c_proj.bias", (D,), b + ("mlp", "b_proj"), (D,)),
            ]
        out += [_reshaped("transformer.ln_f.weight", (D,), ("ln_final", "scale"), (D,)),
                _reshaped("transformer.ln_f.bias", (D,), ("ln_final", "bias"), (D,))]
    else:
        out.append(_reshaped("model.embed_tokens.weight", (V, D), ("embed",), (V, D)))
        for i in range(cfg.n_layers):
            h, b = f"model.layers.{i}.", ("blocks", i)
            out += [
                _reshaped(h + "input_layernorm.weight", (D,), b + ("ln_attn", "scale"), (D,)),
                _transposed(h + "self_attn.q_proj.weight", (N * H, D), b + ("attn", "wq"), (D, N, H)),
                _transposed(h + "self_attn.k_proj.weight", (K * H, D), b + ("attn", "wk"), (D, K, H)),
                _transposed(h + "self_attn.v_proj.weight", (K * H, D), b + ("attn", "wv"), (D, K, H)),
                _transposed(h + "self_attn.o_proj.weight", (D, N * H), b + ("attn", "wo"), (N, H, D)),
                _reshaped(h + "post_attention_layernorm.weight", (D,), b + ("ln_mlp", "scale"), (D,)),
                _transposed(h + "mlp.gate_proj.weight", (F, D), b + ("mlp", "w_gate"), (D, F)),
                _transposed(h + "mlp.up_proj.weight", (F, D), b + ("mlp", "w_up"), (D, F)),
                _transposed(h + "mlp.down_proj.weight", (D, F), b + ("mlp", "w_down"), (F, D)),
            ]
            if cfg.qkv_bias:
                out += [_reshaped(h + "self_attn.q_proj.bias", (N * H,), b + ("attn", "bq"), (N, H)),
                        _reshaped(h + "self_attn.k_proj.bias", (K * H,), b + ("attn", "bk"), (K, H)),
                        _reshaped(h + "self_attn.v_proj.bias", (K * H,), b + ("attn", "bv"), (K, H))]
        out.append(_reshaped("model.norm.weight", (D,), ("ln_final", "scale"), (D,)))
    if not cfg.tie_embeddings:
        out.append(_transposed("lm_head.weight", (V, D), ("lm_head",), (D, V)))
    return out


def _summary(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def iter_params(cfg: ModelConfig, source) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Checks a checkpoint's tensor names and shapes against `cfg`, then yields backbone parameters.

    `source` has `shapes` (name -> shape, Hugging Face names), `read(name) -> np.ndarray`,
    `label(name) -> str` (the tensor's own name and file, for errors), `where` (the checkpoint path)
    and `ignore(name) -> bool` (tensors that are not parameters). Tensors are read one at a time, so
    at most one checkpoint tensor is held in host memory besides the model.
    """
    entries = layout(cfg)
    expected = {e.name for e in entries}
    missing = [source.label(e.name) for e in entries if e.name not in source.shapes]
    unexpected = [source.label(n) for n in source.shapes if n not in expected and not source.ignore(n)]
    if missing or unexpected:
        raise ValueError(f"{source.where}: checkpoint tensors do not fit the config "
                         f"(arch={cfg.arch}, n_layers={cfg.n_layers}, tie_embeddings={cfg.tie_embeddings}); "
                         f"missing: [{_summary(missing)}]; unexpected: [{_summary(unexpected)}]")
    for e in entries:
        got = tuple(int(s) for s in source.shapes[e.name])
        if got != e.shape:
            raise ValueError(f"{source.label(e.name)}: expected shape {e.shape}, checkpoint has shape {got}")
    for e in entries:
        yield from zip(e.paths, e.to_ours(source.read(e.name)))


def export_tensors(cfg: ModelConfig, get: Callable[[ParamPath], np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face tensors (float32, contiguous) from backbone parameters `get(path)`."""
    return {e.name: np.ascontiguousarray(e.from_ours(*[get(p) for p in e.paths]), dtype=np.float32)
            for e in layout(cfg)}


# ---------------------------------------------------------------- safetensors files
class SafetensorsSource:
    """The tensors of a Hugging Face directory, opened lazily (memory-mapped) and read as NumPy."""

    def __init__(self, directory: Path, *, tied: bool, base_prefix: str):
        self.where = str(directory)
        index = directory / INDEX_FILE
        if (directory / SINGLE_FILE).exists():
            files = {None: directory / SINGLE_FILE}
            weight_map = None
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
            files = {f: directory / f for f in sorted(set(weight_map.values()))}
        else:
            raise ValueError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
        self._handles, self._file_of, self.shapes = {}, {}, {}
        for key, file in files.items():
            if not file.exists():
                raise ValueError(f"{index}: shard {file.name} is missing")
            handle = self._handles[file] = safe_open(str(file), framework="numpy")
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != key:
                    continue  # the index is the authority on which shard holds a tensor
                self._file_of[name] = file
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        # Base-model checkpoints (e.g. the original `gpt2`) omit the "transformer." / "model." prefix.
        self._rename = {}
        if self.shapes and not any(n.startswith(base_prefix) for n in self.shapes):
            self._rename = {base_prefix + n: n for n in self.shapes if not n.startswith("lm_head.")}
            self.shapes = {base_prefix + n if base_prefix + n in self._rename else n: s for n, s in self.shapes.items()}
        self._tied = tied

    def _native(self, name):
        return self._rename.get(name, name)

    def label(self, name: str) -> str:
        file = self._file_of.get(self._native(name))
        return f"tensor {self._native(name)!r}" + (f" in {file}" if file else "")

    def ignore(self, name: str) -> bool:
        return name.endswith(_BUFFER_SUFFIXES) or (self._tied and name == "lm_head.weight")

    def read(self, name: str) -> np.ndarray:
        native = self._native(name)
        file = self._file_of[native]
        handle = self._handles[file]
        if handle.get_slice(native).get_dtype() in _NON_NUMPY_DTYPES:
            jax_handle = safe_open(str(file), framework="flax")
            return np.asarray(jax_handle.get_tensor(native).astype("float32"))
        return handle.get_tensor(native)


# ---------------------------------------------------------------- config.json
def _get(hf: Mapping, key: str, where: str):
    if hf.get(key) is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return hf[key]


_ROPE_FIELDS = tuple(f.name for f in dataclasses.fields(RopeConfig) if f.name not in ("theta", "rope_type"))


def rope_from_hf(hf: Mapping, where: str) -> RopeConfig:
    """RoPE from transformers-v5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{where}: rope_parameters must be one flat dict (per-layer-type RoPE is not supported)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (only full rotary)")
    kw = {k: params[k] for k in _ROPE_FIELDS if params.get(k) is not None}
    if rope_type in ("llama3", "yarn"):
        # Same precedence as transformers' standardize_rope_params.
        orig = (hf.get("original_max_position_embeddings") or kw.get("original_max_position_embeddings")
                or _get(hf, "max_position_embeddings", where))
        kw["original_max_position_embeddings"] = int(orig)
    if rope_type == "yarn" and "factor" not in kw:
        kw["factor"] = _get(hf, "max_position_embeddings", where) / kw["original_max_position_embeddings"]
    if rope_type == "linear" and "factor" not in kw:
        raise ValueError(f"{where}: rope_type 'linear' needs a 'factor'")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        return RopeConfig(theta=float(theta), rope_type=rope_type, **kw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


def config_from_hf(hf: Mapping, where: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (`overrides` set dtype, param_dtype, remat, attention)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ValueError(f"{where}: activation_function {act!r} is not supported for gpt2 (only 'gelu_new')")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError(f"{where}: only the standard 1/sqrt(head_dim) GPT-2 attention scale is supported")
        d, n = _get(hf, "n_embd", where), _get(hf, "n_head", where)
        return ModelConfig(arch="gpt2", vocab_size=_get(hf, "vocab_size", where), d_model=d,
                           n_layers=_get(hf, "n_layer", where), n_heads=n, n_kv_heads=n,
                           d_ff=hf.get("n_inner") or 4 * d, max_seq_len=_get(hf, "n_positions", where),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), **overrides)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported for {mt} (only 'silu')")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{where}: attention_bias/mlp_bias=true is not supported for llama (it adds o_proj/MLP "
                         "biases); only Qwen2-style q/k/v biases are")
    if mt == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported for qwen2")
    d, n = _get(hf, "hidden_size", where), _get(hf, "num_attention_heads", where)
    return ModelConfig(arch="llama", vocab_size=_get(hf, "vocab_size", where), d_model=d,
                       n_layers=_get(hf, "num_hidden_layers", where), n_heads=n,
                       n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
                       d_ff=_get(hf, "intermediate_size", where),
                       max_seq_len=hf.get("max_position_embeddings", 2048 if mt == "llama" else 32768),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=mt == "qwen2",
                       tie_embeddings=hf.get("tie_word_embeddings", False), rope=rope_from_hf(hf, where),
                       **overrides)


def rope_to_hf(rope: RopeConfig) -> dict:
    out = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    keys = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                     "mscale", "mscale_all_dim")}[rope.rope_type]
    out.update({k: getattr(rope, k) for k in keys if getattr(rope, k) is not None})
    if rope.rope_type == "yarn" and not rope.truncate:
        out["truncate"] = False
    return out


def config_to_hf(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """A Hugging Face config.json dict for `cfg` (float32 weights)."""
    mt = model_type(cfg)
    common = {"architectures": [ARCHITECTURES[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": "float32"}
    if mt == "gpt2":
        layout(cfg)  # validates that GPT-2 can express the head layout
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new"}
    rope = rope_to_hf(cfg.rope)
    out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_parameters": rope, "rope_theta": cfg.rope.theta}
    if cfg.rope.rope_type != "default":
        out["rope_scaling"] = rope  # the pre-v5 key, for older readers
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def open_dir(directory: Path, **overrides) -> tuple[ModelConfig, SafetensorsSource]:
    """Config and tensor source of a Hugging Face model directory."""
    hf = read_config(directory)
    cfg = config_from_hf(hf, where=str(directory / "config.json"), **overrides)
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    return cfg, SafetensorsSource(directory, tied=cfg.tie_embeddings, base_prefix=prefix)


def write_dir(out_dir: Path, cfg: ModelConfig, get: Callable[[ParamPath], np.ndarray], *,
              bos_id: int | None = None, eos_id: int | None = None) -> None:
    """Writes config.json and model.safetensors (float32, Hugging Face names and layouts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(cfg, bos_id=bos_id, eos_id=eos_id)
    save_file(export_tensors(cfg, get), str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("Wrote %s (%s) to %s", config["architectures"][0], model_type(cfg), out_dir)
