"""ConfigDict -> typed, frozen dataclasses, in one place. Layers never read a ConfigDict.

`base_config()` holds the keys every pipeline shares; `configs/<experiment>.py` files start from it.
Every conversion names the offending config key when a value is invalid.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from ava_jax.errors import ConfigError
from ava_jax.losses.config import OBJECTIVES, LossConfig
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
        attention="auto",  # auto | xla | blocked (ava_jax.models.attention)
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
                         remat: bool, attention: str = "auto") -> ModelConfig:
    """The backbone for `model.path="scratch"` (e.g. the synthetic task), shaped by `model.scratch`."""
    return ModelConfig(arch=s.arch, vocab_size=vocab_size or s.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                       n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_ff=s.d_ff, max_seq_len=s.max_seq_len,
                       dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
    """`config.objective` + `config.loss` (+ `model.reward_align`) -> LossConfig; errors name the key."""
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"config.objective={c.objective!r} is not one of {OBJECTIVES}")
    try:
        return LossConfig(objective=c.objective, reward_align=c.model.reward_align, **dict(c.loss))
    except (TypeError, ValueError) as e:  # LossConfig names its field: say which config key that is
        raise ConfigError(f"config.loss: {e}".replace("LossConfig.", "loss.")) from e


def synthetic_config(d: ml_collections.ConfigDict, data_seed: int):
    """`data.synthetic` -> the synthetic task's SyntheticConfig for one split's samples."""
    from ava_jax.data.synthetic import SyntheticConfig
    try:
        return SyntheticConfig(vocab_size=d.vocab_size, prompt_len=d.prompt_len, response_len=d.response_len,
                               bt_temperature=d.bt_temperature, num_examples=d.num_examples, seed=d.seed,
                               data_seed=data_seed)
    except ValueError as e:
        raise ConfigError(f"data.synthetic: {e}".replace("SyntheticConfig.", "data.synthetic.")) from e


def stories_config(d: ml_collections.ConfigDict, split: str):
    """`data.stories` -> the stories task's StoriesConfig for one split (train pairs or eval pairs)."""
    from ava_jax.data.stories import StoriesConfig
    try:
        return StoriesConfig(num_pairs=d.num_pairs if split == "train" else d.num_eval_pairs,
                             response_len=d.response_len, temperature=float(d.temperature),
                             bt_temperature=float(d.bt_temperature), split=split, seed=d.seed, data_seed=d.data_seed)
    except ValueError as e:
        raise ConfigError(f"data.stories: {e}".replace("StoriesConfig.", "data.stories.")) from e


REWARD_VARIANTS = ("", "tiny", "hh", "hh_tiny", "synthetic", "synthetic_tiny", "paper")


def reward_model_config(objective: str, variant: str | None) -> ml_collections.ConfigDict:
    """The reward-modelling pipeline's config; `configs/{ava_p,ava_d,bt,pt}.py` call this.

    Variants: "" (the stories task, a real-text ground truth, on the pretrained TinyStories-260K:
    CPU minutes), "tiny" (a few steps on a few stories pairs, for the tests), "hh" (bundled HH-RLHF
    harmless), "hh_tiny", "synthetic" (the ground-truth token MDP, a scratch model), "synthetic_tiny",
    "paper" (GPT-2 117M or SmolLM2-135M from --config.model.path, accelerator, HH-RLHF).
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
        cer_weight=1.0, normalize="token", td_terminal="none", cer_score="last"))
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
    # The stories task (docs/stories.md): TinyStories-260K continuations, gold per-token rewards from
    # a shipped word rule; generated once and cached under data.stories.cache_dir (default
    # $AVA_JAX_CACHE or ~/.cache/ava_jax).
    c.data.stories = ml_collections.ConfigDict(dict(num_pairs=4096, num_eval_pairs=1024, response_len=48,
                                                    temperature=1.0, bt_temperature=0.375, seed=0, data_seed=0,
                                                    cache_dir=""))
    c.train = ml_collections.ConfigDict(dict(
        steps=300, batch_size=16, accum_steps=1, learning_rate=1e-4, warmup_steps=30, final_lr_fraction=0.1,
        weight_decay=0.01, grad_clip=1.0, log_every=10, eval_every=100, checkpoint_every=100,
        max_consecutive_bad_steps=5, progress=True))
    c.eval = ml_collections.ConfigDict(dict(score="last", batch_size=64))
    if objective == "ava_p":
        # AVA-p's defaults, chosen on the stories validation split (docs/lab.md): CER on the summed
        # reward means, counted once per pair in the Bradley-Terry form, a terminal TD target, the
        # weighting on the reward head only, and the summed reward means as the score. As printed
        # (token / sigmoid / last / none / both / last) it scored 57.5% there against 71.6%.
        c.loss.update(normalize="sequence", cer="logsigmoid", cer_score="sum", td_terminal="zero")
        c.model.weight_heads = "reward"
        c.eval.score = "sum"
    # The main job keeps its checkpoints (and resumes from them); the quick variants write nothing.
    c.workdir = f"runs/{objective}" if variant in ("", "hh", "paper") else ""
    if variant in ("", "tiny"):
        c.data.format = "stories"
        c.data.pad_to_multiple = 16
        c.train.update(steps=300, batch_size=16, learning_rate=1e-3, warmup_steps=30, eval_every=100)
        if variant == "tiny":
            c.data.stories.update(num_pairs=64, num_eval_pairs=32)
            c.train.update(steps=6, batch_size=8, warmup_steps=2, log_every=2, eval_every=0, checkpoint_every=0)
            c.eval.batch_size = 16
    elif variant in ("synthetic", "synthetic_tiny"):
        c.model.path = "scratch"
        c.data.format = "synthetic"
        c.data.pad_to_multiple = 16
        # Learnable at CPU scale (docs/table1.md, "the synthetic lab"): 6 content tokens, 8,192 pairs
        # and 1,000 steps of 128 bring PT within 3 points of the Bayes ceiling (0.80) in ~2 minutes;
        # with 16 tokens and 2,048 pairs every method sat near 56%.
        c.data.synthetic.update(vocab_size=8, num_examples=8192, num_eval_examples=4096)
        c.train.update(steps=1000, batch_size=128, learning_rate=3e-3, warmup_steps=50, eval_every=250,
                       checkpoint_every=250)
        if variant == "synthetic_tiny":
            c.data.synthetic.update(num_examples=512, num_eval_examples=256)
            c.train.update(steps=60, batch_size=32, eval_every=0, checkpoint_every=0, log_every=10)
    elif variant == "hh_tiny":
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
