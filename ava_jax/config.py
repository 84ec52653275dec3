"""ConfigDict -> typed, frozen dataclasses, in one place. Layers never read a ConfigDict.

`base_config()` holds the keys every pipeline shares; `configs/<experiment>.py` files start from it.
Every conversion names the offending config key when a value is invalid.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from ava_jax.errors import ConfigError
from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.sampling import SamplingConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED = {
    "tinystories-260k": os.path.join(ASSETS, "tinystories-260k"),
    "gpt2-bpe": os.path.join(ASSETS, "gpt2-bpe"),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = ""
    c.seed = 0
    c.workdir = ""  # run directory: checkpoints, metrics (empty: no files written)
    c.model = ml_collections.ConfigDict(dict(
        path="bundled:tinystories-260k",  # HF dir, llama2.c .bin (or its dir), .gguf file, or bundled:NAME
        dtype="float32", param_dtype="float32", remat=False,
        q_param="lm_logprobs", alpha=1.0, sigma_transform="softplus", reward_weighting="attention",
        weight_norm="mean", weight_heads="both", sigma_init=ml_collections.config_dict.placeholder(float),
        reward_align="next",
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sampling = ml_collections.ConfigDict(dict(
        max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, prompt_bucket=32, new_bucket=16))
    return c


def resolve_path(path: str) -> str:
    """`bundled:NAME` -> the copy shipped inside the package; anything else is a local path."""
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise ConfigError(f"model.path={path!r}: unknown bundled model; bundled: {sorted(BUNDLED)}")
        return BUNDLED[name]
    if not path:
        raise ConfigError("model.path is empty: give a local checkpoint, e.g. --config.model.path=/path/to/gpt2 "
                         "(a Hugging Face directory, a llama2.c .bin or a .gguf file)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.path={path!r} does not exist")
    return path


def head_config(model: ml_collections.ConfigDict) -> HeadConfig:
    return HeadConfig(q_param=model.q_param, alpha=float(model.alpha), sigma_transform=model.sigma_transform,
                      reward_weighting=model.reward_weighting, weight_norm=model.weight_norm,
                      weight_heads=model.weight_heads, sigma_init=model.sigma_init)


def sampling_config(s: ml_collections.ConfigDict, *, eos_id, pad_id) -> SamplingConfig:
    try:
        return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=float(s.temperature), top_k=s.top_k,
                              top_p=float(s.top_p), eos_id=eos_id, pad_id=pad_id if pad_id is not None else 0,
                              prompt_bucket=s.prompt_bucket, new_bucket=s.new_bucket)
    except ValueError as e:
        raise ConfigError(f"config.sampling: {e}") from e


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def mesh_config(m: ml_collections.ConfigDict) -> MeshConfig:
    for key in ("data", "fsdp", "tensor"):
        if m[key] == 0 or m[key] < -1:
            raise ConfigError(f"config.mesh.{key}={m[key]} must be a positive size (or -1 for data)")
    return MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor)


def scratch_model_config(s: ml_collections.ConfigDict, *, vocab_size: int | None, dtype: str, param_dtype: str,
                         remat: bool) -> ModelConfig:
    """The backbone for `model.path="scratch"` (e.g. the synthetic task), shaped by `model.scratch`."""
    return ModelConfig(arch=s.arch, vocab_size=vocab_size or s.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                       n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_ff=s.d_ff, max_seq_len=s.max_seq_len,
                       dtype=dtype, param_dtype=param_dtype, remat=remat)


REWARD_VARIANTS = ("", "tiny", "synthetic", "synthetic_tiny", "paper")


def reward_model_config(objective: str, variant: str | None) -> ml_collections.ConfigDict:
    """The reward-modelling pipeline's config; `configs/{ava_p,ava_d,bt,pt}.py` call this.

    Variants: "" (bundled HH-RLHF harmless + pretrained TinyStories-260K, CPU minutes), "tiny" (a few
    steps on a slice, for the tests), "synthetic" (the ground-truth token MDP, a scratch model),
    "synthetic_tiny", "paper" (GPT-2 117M or SmolLM2-135M from --config.model.path, accelerator).
    """
    variant = variant or ""
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for objective {objective!r}; known: {REWARD_VARIANTS}")
    c = base_config()
    c.pipeline = "reward_model"
    c.objective = objective
    # The baselines use their own weighting: none for BT (scalar reward at the last token), the
    # preference attention for PT; AVA keeps the TQR weighting (method.md section 1).
    c.model.reward_weighting = "none" if objective == "bt" else "attention"
    c.model.scratch = ml_collections.ConfigDict(dict(arch="llama", vocab_size=512, d_model=64, n_layers=2,
                                                     n_heads=4, n_kv_heads=2, d_ff=172, max_seq_len=512))
    c.loss = ml_collections.ConfigDict(dict(
        gamma=1.0, lam=1.0, beta=1.0, likelihood="boltzmann", cer="sigmoid", include_prompt=False,
        use_neg=True, use_irl=True, use_cer=True, neg_floor=ml_collections.config_dict.placeholder(float),
        cer_weight=1.0, normalize="token", td_terminal="none"))
    c.data = ml_collections.ConfigDict(dict(
        format="hh", path="", tfds_dir="", max_len=256, pad_to_multiple=64, on_bad_row="skip",
        max_bad_fraction=0.01, check_roundtrip=True, max_train_pairs=0, max_validation_pairs=0,
        max_test_pairs=0,
        # "auto": by prompt hash, or by row hash (with a warning) when prompts are too few to split;
        # "prompt" | "row" force one (ava_jax.data.splits.split_preferences).
        split_by="auto",
        # Your own splits, same format as data.path (then the train file): used as given, not hashed.
        validation_path="", test_path=""))
    c.data.synthetic = ml_collections.ConfigDict(dict(vocab_size=16, prompt_len=4, response_len=8,
                                                      bt_temperature=2.0, num_examples=2048,
                                                      num_eval_examples=1024, seed=0, data_seed=100))
    c.train = ml_collections.ConfigDict(dict(
        steps=300, batch_size=16, accum_steps=1, learning_rate=1e-4, warmup_steps=30, final_lr_fraction=0.1,
        weight_decay=0.01, grad_clip=1.0, log_every=10, eval_every=100, checkpoint_every=100,
        max_consecutive_bad_steps=5, progress=True))
    c.eval = ml_collections.ConfigDict(dict(score="last", batch_size=64))
    # The main job keeps its checkpoints (and resumes from them); the quick variants write nothing.
    c.workdir = f"runs/{objective}" if variant in ("", "paper") else ""
    if variant in ("synthetic", "synthetic_tiny"):
        c.model.path = "scratch"
        c.data.format = "synthetic"
        c.data.pad_to_multiple = 16
        c.train.update(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50, eval_every=200)
        if variant == "synthetic_tiny":
            c.data.synthetic.update(num_examples=512, num_eval_examples=256)
            c.train.update(steps=60, eval_every=0, checkpoint_every=0, log_every=10)
    elif variant == "tiny":
        c.data.update(max_len=128, max_train_pairs=64, max_validation_pairs=32, max_test_pairs=32)
        c.train.update(steps=6, batch_size=8, warmup_steps=2, log_every=2, eval_every=0, checkpoint_every=0)
        c.eval.batch_size = 16
    elif variant == "paper":
        c.model.path = ""  # required: a local GPT-2 117M HF dir or the SmolLM2-135M GGUF
        c.model.dtype = "bfloat16"
        c.data.update(max_len=512)
        c.train.update(steps=2000, batch_size=32, learning_rate=1e-5, warmup_steps=100, eval_every=250,
                       checkpoint_every=250)
    return c
