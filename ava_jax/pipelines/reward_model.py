"""The `reward_model` pipeline (paper Table 1): train a TQR reward model on preference pairs with
AVA-p, AVA-d (chosen halves), Bradley-Terry or the Preference Transformer, evaluate pairwise
accuracy on validation and test, and checkpoint (latest + best, resumable with the data position).

`default_config(objective, variant)` is its config (`configs/{ava_p,ava_d,bt,pt}.py` call it);
`run(config)` runs it. The pieces it assembles live in their rooms: the objective in
`ava_jax.objectives`, data by format in `ava_jax.data.load`, the model in `ava_jax.models.build`,
run set-up in `ava_jax.train.setup`, evaluation in `ava_jax.eval.reward_model`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections

from ava_jax import config as cfglib
from ava_jax import objectives
from ava_jax import sharding as shd
from ava_jax.data import make_dataset, make_iterator
from ava_jax.data import synthetic as syn
from ava_jax.data.load import load_pair_splits
from ava_jax.eval.reward_model import RewardModelEvaluator
from ava_jax.models import param_count
from ava_jax.models.build import build_tqr
from ava_jax.train.loop import IteratorBatches
from ava_jax.train.setup import start_run

log = logging.getLogger(__name__)

KIND = "reward_model"
VARIANTS = ("", "tiny", "hh", "hh_tiny", "synthetic", "synthetic_tiny", "paper")


def default_config(objective: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The reward-modelling pipeline's config; `configs/{ava_p,ava_d,bt,pt}.py` call this.

    Variants: "" (the stories task, a real-text ground truth, on the pretrained TinyStories-260K:
    CPU minutes), "tiny" (a few steps on a few stories pairs, for the tests), "hh" (bundled HH-RLHF
    harmless), "hh_tiny", "synthetic" (the ground-truth token MDP, a scratch model), "synthetic_tiny",
    "paper" (GPT-2 117M or SmolLM2-135M from --config.model.path, accelerator, HH-RLHF).
    """
    variant = variant or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for objective {objective!r}; known: {VARIANTS}")
    objectives.get(objective, KIND)
    c = cfglib.base_config()
    c.pipeline = "reward_model"
    c.objective = objective
    c.model.scratch = cfglib.scratch_section()
    c.data = cfglib.data_section()
    c.train = ml_collections.ConfigDict(dict(
        steps=300, batch_size=16, accum_steps=1, learning_rate=1e-4, warmup_steps=30, final_lr_fraction=0.1,
        weight_decay=0.01, grad_clip=1.0, log_every=10, eval_every=100, checkpoint_every=100,
        max_consecutive_bad_steps=5, progress=True))
    c.eval = ml_collections.ConfigDict(dict(score="last", batch_size=64))
    # The objective's own config.loss section and its declared defaults (its head, its score), e.g.
    # no weighting over positions for BT and AVA-p's readings chosen on the stories validation split.
    cfglib.apply_objective_defaults(c, KIND)
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


@dataclasses.dataclass
class RewardModelResult:
    objective: str
    metrics: dict  # split -> pairwise metrics
    checkpoint_dir: str | None
    wall_s: float
    extra: dict  # e.g. the synthetic task's Bayes-optimal accuracy and reward rank correlation
    graphdef: object = dataclasses.field(default=None, repr=False)  # nnx.merge(graphdef, params) -> TQR
    params: object = dataclasses.field(default=None, repr=False)
    splits: dict = dataclasses.field(default=None, repr=False)  # the tokenised data, for notebooks
    scores: dict = dataclasses.field(default=None, repr=False)  # split -> per-pair scores (eval.reward.pair_scores)
    eos_id: int | None = None  # the tokenizer's EOS id (the synthetic task's EOS without a tokenizer)


def run(config: ml_collections.ConfigDict) -> RewardModelResult:
    t0 = time.perf_counter()
    objective, lcfg = cfglib.objective_config(config, KIND)
    data_cfg = cfglib.data_config(config.data)
    model, tokenizer = build_tqr(cfglib.backbone_spec(config), cfglib.head_config(config.model), config.seed)
    splits, pad_id, extra = load_pair_splits(data_cfg, tokenizer)
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    t = config.train
    pad_multiple = data_cfg.pad_to_multiple
    with jax.set_mesh(mesh):
        log.info("mesh: %s; %s backbone, %d parameters; objective %s; %d train pairs", shd.describe(mesh),
                 model.cfg.arch, param_count(model), objective.name, len(splits["train"]))
        batches = IteratorBatches(make_iterator(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                                                pad_to_multiple=pad_multiple, shard=shd.process_shard()))
        # Shapes for the step's shardings, from the dataset itself (no second prefetching iterator).
        example = make_dataset(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                               pad_to_multiple=pad_multiple, shard=shd.process_shard())[0]
        run_ = start_run(model, objective.loss_fn(lcfg), batches, example, mesh=mesh,
                         optimizer=cfglib.optimizer_config(t), loop=cfglib.loop_options(t),
                         step_options=cfglib.step_options(t), workdir=config.workdir, best_metric="accuracy")
        evaluator = RewardModelEvaluator(objective, lcfg, run_.graphdef, splits, score=config.eval.score,
                                         pad_id=pad_id, batch_size=config.eval.batch_size,
                                         pad_to_multiple=pad_multiple,
                                         token_means=any(f"{s}_prefs" in extra for s in ("validation", "test")))
        state = run_.train(jax.random.key(config.seed), lambda s: evaluator.metrics("validation", s.params))
        results, all_scores = {}, {}
        for split in ("validation", "test"):
            results[split], all_scores[split], diagnostics = evaluator.final(
                split, state.params, extra.get(f"{split}_prefs"), config.workdir if shd.is_primary() else "")
            extra.update(diagnostics)
            run_.writer.write(int(state.step), results[split], prefix=f"final_{split}/")
        ckpt_dir = run_.checkpoint_dir
        run_.close()
    extra = {k: v for k, v in extra.items() if not k.endswith("_prefs")}
    result = RewardModelResult(objective.name, results, ckpt_dir, time.perf_counter() - t0, extra, run_.graphdef,
                               state.params, splits, all_scores,
                               tokenizer.eos_id if tokenizer is not None else syn.EOS_ID)
    if config.workdir and shd.is_primary():
        write_summary(result, config)
    print(format_result(result, config.workdir))
    return result


def write_summary(r: RewardModelResult, config: ml_collections.ConfigDict) -> str:
    """`<workdir>/summary.json`: the final metrics, machine-readable, with the config that made them."""
    path = os.path.join(config.workdir, "summary.json")
    payload = {"pipeline": "reward_model", "objective": r.objective, "step": int(config.train.steps),
               "wall_s": r.wall_s, "metrics": r.metrics, "extra": r.extra, "checkpoint": r.checkpoint_dir,
               "config": config.to_dict()}
    os.makedirs(config.workdir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float, allow_nan=True)
    return path


def format_result(r: RewardModelResult, workdir: str = "") -> str:
    lines = [f"\n{r.objective}: finished in {r.wall_s:.0f} s", "| split | pairs | accuracy | Bayes ceiling | margin "
             "| ECE | LM log-lik chosen / rejected |", "|---|---|---|---|---|---|---|"]
    for split, m in r.metrics.items():
        ceiling = r.extra.get(f"{split}_bayes_optimal_accuracy", float("nan"))
        lm = "-" if "lm_loglik_chosen" not in m else \
            f"{m['lm_loglik_chosen']:.3f} / {m.get('lm_loglik_rejected', float('nan')):.3f}"
        lines.append(f"| {split} | {m['pairs']:.0f} | {m['accuracy']:.4f} | {ceiling:.4f} | {m['margin']:.4f} | "
                     f"{m.get('ece', float('nan')):.4f} | {lm} |")
    for k, v in r.extra.items():
        if not k.endswith("_bayes_optimal_accuracy"):
            lines.append(f"{k}: {v}" if isinstance(v, str) else f"{k}: {v:.4f}")
    lines.append(f"checkpoint: {r.checkpoint_dir or '(none: set --config.workdir=DIR)'}")
    if workdir:
        lines.append(f"summary: {os.path.join(workdir, 'summary.json')}")
    return "\n".join(lines)


@dataclasses.dataclass
class TrainedRewardModel:
    """A finished reward-model run, ready to score sequences (`load_trained`)."""

    run_dir: str
    objective: object  # objectives.Objective
    loss_config: object
    graphdef: object
    params: object
    tokenizer: object  # None for the synthetic task
    config: ml_collections.ConfigDict

    def score_fn(self):
        """`score_fn(model, side) -> (score_B, sigma_B, lm_B)` as the run evaluated (its eval.score)."""
        return self.objective.score_fn(self.loss_config, self.config.eval.score)


def load_trained(run_dir: str, mesh=None) -> TrainedRewardModel:
    """The reward model of a finished run directory: its config from `summary.json`, its parameters
    from the best checkpoint (the latest when the run kept no best one).

    Raises:
      ConfigError: the directory holds no finished reward-model run (the message names it).
    """
    from ava_jax.errors import ConfigError
    from ava_jax.train.checkpoint import RunCheckpointer
    from ava_jax.train.setup import make_optimizer
    from ava_jax.train.step import init_train_state
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir!r} is not a finished reward-model run: it has no summary.json")
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if summary.get("pipeline") != "reward_model":
        raise ConfigError(f"{path}: pipeline {summary.get('pipeline')!r}, not a reward_model run")
    c = ml_collections.ConfigDict(summary["config"])
    objective, lcfg = cfglib.objective_config(c, KIND)
    model, tokenizer = build_tqr(cfglib.backbone_spec(c), cfglib.head_config(c.model), c.seed)
    mesh = mesh or shd.make_mesh(**vars(cfglib.mesh_config(c.mesh)))
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, make_optimizer(cfglib.optimizer_config(c.train)), mesh)
        ckpt = RunCheckpointer(run_dir, best_metric="accuracy")
        try:
            if ckpt.best_dir is not None:
                state = ckpt.restore_best(state)
            elif ckpt.latest_step() is not None:
                state = ckpt.restore(state)
            else:
                raise ConfigError(f"{run_dir!r} has no checkpoint (the run wrote none: was its workdir set?)")
        finally:
            ckpt.close()
    return TrainedRewardModel(run_dir, objective, lcfg, graphdef, state.params, tokenizer, c)
