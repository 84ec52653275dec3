"""ConfigDict -> typed, frozen dataclasses, in one place. Layers never read a ConfigDict.

`base_config()` holds the keys every pipeline shares; each pipeline's `default_config` (beside its
`run`) starts from it, and `configs/<experiment>.py` files call those. Every conversion names the
offending config key when a value is invalid; a ValueError or TypeError raised while converting is
the user's to fix (`errors.is_user_error`).
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from ava_jax import objectives
from ava_jax.data.load import SPLITS, DataConfig
from ava_jax.errors import ConfigError
from ava_jax.models.build import BackboneSpec
from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.sampling import SamplingConfig
from ava_jax.train.loop import LoopOptions
from ava_jax.train.setup import OptimizerConfig
from ava_jax.train.step import StepOptions

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
        dtype="float32", param_dtype="float32",
        remat=ml_collections.config_dict.placeholder(bool),  # None: on for CPU, off on accelerators
        attention="auto",  # auto | xla | blocked | cpu_kernel | cudnn (ava_jax.models.attention)
        q_param="lm_logprobs", alpha=1.0, sigma_transform="softplus", reward_weighting="attention",
        weight_norm="mean", weight_heads="both", sigma_init=ml_collections.config_dict.placeholder(float),
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sampling = ml_collections.ConfigDict(dict(
        max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, prompt_bucket=32, new_bucket=16))
    return c


def data_section() -> ml_collections.ConfigDict:
    """The default `config.data` every pipeline that reads pairs or demonstrations starts from."""
    d = ml_collections.ConfigDict(dict(
        format="hh", path="", tfds_dir="", max_len=256, pad_to_multiple=64, on_bad_row="skip",
        max_bad_fraction=0.01, check_roundtrip=True, max_train_pairs=0, max_validation_pairs=0,
        max_test_pairs=0,
        # "auto": by prompt hash, or by row hash (with a warning) when prompts are too few to split;
        # "prompt" | "row" force one (ava_jax.data.splits.split_preferences).
        split_by="auto",
        # Your own splits, same format as data.path (then the train file): used as given, not hashed.
        validation_path="", test_path=""))
    d.synthetic = ml_collections.ConfigDict(dict(vocab_size=16, prompt_len=4, response_len=8, bt_temperature=2.0,
                                                 num_examples=2048, num_eval_examples=1024, seed=0, data_seed=100))
    # The stories task (docs/stories.md): TinyStories-260K continuations, gold per-token rewards from
    # a shipped word rule; generated once and cached under data.stories.cache_dir (default
    # $AVA_JAX_CACHE or ~/.cache/ava_jax).
    # Demonstrations (pipeline direct, data.source="demonstrations"): the gold-best of num_demo_candidates
    # samples per prompt, num_demos for train and num_eval_demos for each evaluation split.
    d.stories = ml_collections.ConfigDict(dict(num_pairs=4096, num_eval_pairs=1024, response_len=48, temperature=1.0,
                                               bt_temperature=0.375, seed=0, data_seed=0, cache_dir="",
                                               num_demos=1024, num_eval_demos=256, num_demo_candidates=4))
    return d


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


def lora_section() -> ml_collections.ConfigDict:
    """The default `config.lora` of the policy pipelines: rank 0 is full fine-tuning (`models.lora`)."""
    from ava_jax.models.lora import LoraConfig
    d = LoraConfig()
    return ml_collections.ConfigDict(dict(rank=d.rank, alpha=float(d.alpha), targets=d.targets, export=d.export))


def lora_config(c: ml_collections.ConfigDict):
    """`config.lora` -> models.lora.LoraConfig (errors name the key)."""
    from ava_jax.models.lora import LoraConfig
    return LoraConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha), targets=str(c.lora.targets),
                      export=str(c.lora.export))


def scratch_model_config(s: ml_collections.ConfigDict, *, vocab_size: int | None, dtype: str, param_dtype: str,
                         remat: bool | None, attention: str = "auto") -> ModelConfig:
    """The backbone for `model.path="scratch"` (e.g. the synthetic task), shaped by `model.scratch`."""
    return ModelConfig(arch=s.arch, vocab_size=vocab_size or s.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                       n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_ff=s.d_ff, max_seq_len=s.max_seq_len,
                       dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)


def scratch_section() -> ml_collections.ConfigDict:
    """The default `config.model.scratch`: the backbone shape of `model.path="scratch"` (the synthetic task)."""
    return ml_collections.ConfigDict(dict(arch="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                                          n_kv_heads=2, d_ff=172, max_seq_len=512))


def backbone_spec(c: ml_collections.ConfigDict) -> BackboneSpec:
    """`config.model` -> what `models.build.build_tqr` builds: a local checkpoint or a scratch shape
    (whose vocabulary the synthetic task fixes, `data.synthetic.vocab_size`)."""
    m = c.model
    common = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    if m.path == "scratch":
        vocab = c.data.synthetic.vocab_size if c.data.format == "synthetic" else None
        return BackboneSpec(path="scratch", scratch=scratch_model_config(m.scratch, vocab_size=vocab, **common),
                            **common)
    return BackboneSpec(path=resolve_path(m.path), **common)


def loss_section(objective: str) -> ml_collections.ConfigDict:
    """The default `config.loss` of an objective: exactly its config class's fields and defaults
    (an optional float is a float placeholder, so `--config.loss.KEY=1.5` can set it)."""
    cls = objectives.get(objective).config_cls
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if default is None:
            kind = float if "float" in str(f.type) else int if "int" in str(f.type) else str
            default = ml_collections.config_dict.placeholder(kind)
        values[f.name] = default
    return ml_collections.ConfigDict(values)


def apply_objective_defaults(c: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """Sets `config.loss` to the objective's section and applies its declared defaults for this kind
    of pipeline (its head, its evaluation score, its loss readings) over the pipeline's."""
    obj = objectives.get(c.objective, kind)
    c.loss = loss_section(obj.name)
    for section, values in obj.defaults.get(kind, {}).items():
        for key, value in values.items():
            if key not in c[section]:
                raise ValueError(f"objective {obj.name!r} sets {section}.{key}, which the config does not have")
            c[section][key] = value
    return c


def objective_config(c: ml_collections.ConfigDict, kind: str | None = None):
    """`config.objective` + `config.loss` -> (Objective, its typed config); errors name the key.

    kind: the pipeline's objective kind ("reward_model", "policy"); another kind is an error that
    lists the ones this pipeline accepts.
    """
    obj = objectives.get(c.objective, kind)
    try:
        return obj, obj.config(**dict(c.loss))
    except ConfigError as e:  # an unknown config.loss key: often config.objective changed on the command line
        raise ConfigError(f"{e} (config.loss is the objective's own section: start from its config file, e.g. "
                          f"configs/{obj.name}.py, rather than overriding config.objective)") from e
    except (TypeError, ValueError) as e:  # the config class names its field: say which key that is
        cls = obj.config_cls.__name__
        raise ConfigError(f"config.loss: {e}".replace(f"{cls}.", "loss.")) from e


def optimizer_config(t: ml_collections.ConfigDict) -> OptimizerConfig:
    try:
        return OptimizerConfig(learning_rate=float(t.learning_rate), steps=t.steps, warmup_steps=t.warmup_steps,
                               final_lr_fraction=float(t.final_lr_fraction), weight_decay=float(t.weight_decay),
                               grad_clip=float(t.grad_clip))
    except ValueError as e:
        raise ConfigError(f"config.train: {e}".replace("OptimizerConfig.", "train.")) from e


def loop_options(t: ml_collections.ConfigDict) -> LoopOptions:
    for key in ("steps", "log_every"):
        if t[key] < 1:
            raise ConfigError(f"train.{key}={t[key]} must be >= 1")
    return LoopOptions(num_steps=t.steps, log_every=t.log_every, eval_every=t.eval_every,
                       checkpoint_every=t.checkpoint_every, max_consecutive_bad_steps=t.max_consecutive_bad_steps,
                       progress=t.progress)


def step_options(t: ml_collections.ConfigDict) -> StepOptions:
    if t.accum_steps < 1:
        raise ConfigError(f"train.accum_steps={t.accum_steps} must be >= 1")
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of train.accum_steps={t.accum_steps}")
    return StepOptions(accum_steps=t.accum_steps)


def data_config(d: ml_collections.ConfigDict) -> DataConfig:
    """`config.data` -> DataConfig (the ground-truth tasks get one task config per split)."""
    synthetic = stories = None
    if d.format == "synthetic":
        synthetic = {}
        for i, name in enumerate(SPLITS):  # each split from its own data seed; eval splits their own size
            scfg = synthetic_config(d.synthetic, data_seed=d.synthetic.data_seed + i)
            synthetic[name] = scfg if name == "train" else dataclasses.replace(
                scfg, num_examples=d.synthetic.num_eval_examples)
    elif d.format == "stories":
        stories = {name: stories_config(d.stories, name) for name in SPLITS}
    try:
        return DataConfig(format=d.format, path=d.path, tfds_dir=d.tfds_dir, max_len=d.max_len,
                          pad_to_multiple=d.pad_to_multiple or None, on_bad_row=d.on_bad_row,
                          max_bad_fraction=float(d.max_bad_fraction), check_roundtrip=d.check_roundtrip,
                          max_pairs={name: d[f"max_{name}_pairs"] for name in SPLITS}, split_by=d.split_by,
                          validation_path=d.validation_path, test_path=d.test_path, synthetic=synthetic,
                          stories=stories, stories_cache_dir=d.stories.cache_dir)
    except ValueError as e:  # DataConfig names the data.* key
        raise ConfigError(str(e)) from e


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
                             num_demos=d.num_demos if split == "train" else d.num_eval_demos,
                             num_demo_candidates=d.num_demo_candidates, response_len=d.response_len,
                             temperature=float(d.temperature), bt_temperature=float(d.bt_temperature), split=split,
                             seed=d.seed, data_seed=d.data_seed)
    except ValueError as e:
        raise ConfigError(f"data.stories: {e}".replace("StoriesConfig.", "data.stories.")) from e


