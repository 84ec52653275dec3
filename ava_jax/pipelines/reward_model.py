"""The `reward_model` pipeline (paper Table 1): train a TQR reward model on preference pairs with
AVA-p, AVA-d (chosen halves), Bradley-Terry or the Preference Transformer, evaluate pairwise
accuracy on validation and test, and checkpoint (latest + best, resumable with the data position).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from ava_jax import config as cfglib
from ava_jax import sharding as shd
from ava_jax.data import (HH_HARMLESS_BASE_TEST, SPLIT_BY, make_dataset, make_iterator, read_preferences,
                          split_preferences, tokenize_pairs)
from ava_jax.data import synthetic as syn
from ava_jax.data.ground_truth import pair_arrays
from ava_jax.data.splits import DEFAULT_FRACTIONS
from ava_jax.data.validate import ON_BAD_ROW
from ava_jax.errors import ConfigError, DataError
from ava_jax.eval.calibration import calibration_metrics, plot_reliability, preference_probability, reliability_bins
from ava_jax.eval.ground_truth import ground_truth_diagnostics
from ava_jax.eval.reward import make_pair_scorer, pair_scores, pairwise_metrics
from ava_jax.models import TQR, param_count
from ava_jax.objectives import make_loss_fn, make_score_fn
from ava_jax.train.checkpoint import RunCheckpointer
from ava_jax.train.loop import LoopOptions, train_loop
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.step import StepOptions, init_train_state, make_train_step

log = logging.getLogger(__name__)


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


def prepare_data(c: ml_collections.ConfigDict, tokenizer):
    """Returns ({split: PairArrays}, pad_id, extra info); extra["split_method"] says how the splits were made.

    split_method: "prompt_hash" or "row_hash" (`split_preferences`, chosen by data.split_by), "files"
    (data.validation_path and data.test_path given: no hashing), "files+prompt_hash" /
    "files+row_hash" (one of the two given; the other split hashed out of data.path), or
    "separate_seeds" (synthetic: each split generated from its own seed), "prompt_hash" (stories:
    each split's prompts by hash). Ground-truth tasks also put each split's preferences in
    extra[f"{split}_prefs"] (for the diagnostics; dropped from the result).
    """
    d = c.data
    if d.format in ("synthetic", "stories"):
        splits, extra = {}, {"split_method": "separate_seeds" if d.format == "synthetic" else "prompt_hash"}
        for i, name in enumerate(("train", "validation", "test")):
            if d.format == "synthetic":
                scfg = cfglib.synthetic_config(d.synthetic, data_seed=d.synthetic.data_seed + i)
                if name != "train":
                    scfg = dataclasses.replace(scfg, num_examples=d.synthetic.num_eval_examples)
                prefs = syn.make_preference_dataset(scfg)
            else:
                from ava_jax.data import stories
                prefs = stories.load_or_make_preferences(cfglib.stories_config(d.stories, name),
                                                         d.stories.cache_dir or None)
            splits[name] = pair_arrays(prefs)
            log.info("%s %s: %d pairs, Bayes-optimal accuracy %.4f", d.format, name, len(splits[name]),
                     prefs.bayes_optimal_accuracy)
            extra[f"{name}_bayes_optimal_accuracy"] = prefs.bayes_optimal_accuracy
            extra[f"{name}_prefs"] = prefs
        pad = syn.EOS_ID if d.format == "synthetic" else stories.EOS_ID
        return splits, pad, extra
    if tokenizer is None:
        raise ConfigError(f"model.path={c.model.path!r} has no tokenizer; data.format={d.format!r} needs one")
    if d.split_by not in SPLIT_BY:
        raise ConfigError(f"data.split_by={d.split_by!r} is not one of {SPLIT_BY}")
    if d.on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"data.on_bad_row={d.on_bad_row!r} is not one of {ON_BAD_ROW}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if d.format in ("hh", "jsonl"):
        rows, method, where = _read_splits(d)
    elif d.format == "tfds":
        # Too big to parse at every start: prepared once as an array_record TFDS dataset under
        # data.tfds_dir (reused while the source file is unchanged), then read back through grain.
        if not d.path:
            raise ConfigError("data.format='tfds' needs --config.data.path=FILE (a {prompt, chosen, rejected} JSONL)")
        for key in ("validation_path", "test_path"):
            if d[key]:
                raise ConfigError(f"data.{key} is not supported with data.format='tfds' (it splits data.path by "
                                  "prompt hash); use data.format='jsonl' for your own splits")
        if d.split_by == "row":
            raise ConfigError("data.split_by='row' is not supported with data.format='tfds' (it splits by prompt "
                              "hash); use data.format='jsonl'")
        _require_file("path", d.path)
        from ava_jax.data import tfds_builder
        builder = tfds_builder.prepare_preferences(
            d.path, d.tfds_dir or os.path.join(os.path.dirname(os.path.abspath(d.path)), "tfds"),
            split_fractions={"train": 0.8, "validation": 0.1, "test": 0.1}, on_bad_row=d.on_bad_row,
            max_bad_fraction=d.max_bad_fraction)
        rows = {name: tfds_builder.read_tfds_preferences(builder, name) for name in ("train", "validation", "test")}
        method, where = "prompt_hash", dict.fromkeys(rows, f"data.path={d.path!r}")
    else:
        raise ConfigError(f"data.format={d.format!r} is not one of ('hh', 'jsonl', 'tfds', 'synthetic', 'stories')")
    log.info("splits (%s): %s", method, {k: len(v) for k, v in rows.items()})
    splits = {}
    for name in ("train", "validation", "test"):
        part = rows[name]
        if d.get(f"max_{name}_pairs"):
            part = part[: d[f"max_{name}_pairs"]]
        arrays, rep = tokenize_pairs(part, tokenizer, d.max_len, check_roundtrip=d.check_roundtrip,
                                     on_bad_row=d.on_bad_row, max_bad_fraction=d.max_bad_fraction)
        log.info("%s: %d pairs tokenised (%d truncated: %d prompts cut, %d responses cut; bad %s)", name,
                 rep.n_kept, rep.n_truncated, rep.n_prompt_truncated, rep.n_response_truncated, dict(rep.bad_counts))
        if len(arrays) == 0:
            raise DataError(f"{where[name]}: the {name} split has no pairs (split sizes by {method}: "
                            f"{ {k: len(v) for k, v in rows.items()} }); use a larger file")
        splits[name] = arrays
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    return splits, pad, {"split_method": method}


def _require_file(key: str, path: str) -> None:
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"data.{key}={path!r} {what}")


def _read_splits(d: ml_collections.ConfigDict):
    """Reads data.path (the train file when data.validation_path / data.test_path are given) and
    splits it; a given split file is used as it is. Returns ({split: rows}, split method, {split: source})."""
    if d.format == "jsonl" and not d.path:
        raise ConfigError("data.format='jsonl' needs --config.data.path=FILE")
    files = {"train": ("path", d.path or HH_HARMLESS_BASE_TEST)}
    files.update({name: (f"{name}_path", d[f"{name}_path"]) for name in ("validation", "test")
                  if d[f"{name}_path"]})
    rows = {}
    for name, (key, path) in files.items():
        _require_file(key, path)
        rows[name], report = read_preferences(path, d.format, on_bad_row=d.on_bad_row,
                                              max_bad_fraction=d.max_bad_fraction)
        log.info("%s%s: %d rows, %d kept, bad rows by reason %s", "HH-RLHF " if d.format == "hh" else "",
                 report.path, report.n_rows, report.n_kept, dict(report.bad_counts))
    where = {name: f"data.{key}={path!r}" for name, (key, path) in files.items()}
    missing = [name for name in ("validation", "test") if name not in files]
    if not missing:
        return rows, "files", where
    # The default 80/10/10; a split given as a file leaves its 10% to train.
    names = ("train", *missing)
    fractions = DEFAULT_FRACTIONS if len(missing) == 2 else (0.9, 0.1)
    parts, method = split_preferences(rows["train"], fractions, names, split_by=d.split_by,
                                      source=files["train"][1])
    for name in missing:
        where[name] = f"data.path={d.path or 'bundled HH-RLHF'!r} ({name} split by {method})"
    if len(missing) == 1:
        given = next(n for n in ("validation", "test") if n in files)
        log.warning("data.%s_path is given but data.%s_path is not: the %s split is made from data.path=%r by %s "
                    "(10%% of its rows; train keeps 90%%)", given, missing[0], missing[0], files["train"][1], method)
        method = f"files+{method}"
    return {**rows, **parts}, method, where


def build_model(c: ml_collections.ConfigDict, vocab_size: int | None = None):
    """A pretrained backbone (`model.path`) or a scratch one (`model.path="scratch"`, shape in model.scratch)."""
    heads = cfglib.head_config(c.model)
    if c.model.path == "scratch":
        s = c.model.scratch
        mcfg = cfglib.scratch_model_config(s, vocab_size=vocab_size, dtype=c.model.dtype,
                                           param_dtype=c.model.param_dtype, remat=c.model.remat,
                                           attention=c.model.attention)
        return TQR(mcfg, heads, rngs=nnx.Rngs(c.seed)), None
    from ava_jax.checkpoints.load import load_pretrained
    return load_pretrained(cfglib.resolve_path(c.model.path), heads=heads, dtype=c.model.dtype,
                           param_dtype=c.model.param_dtype, remat=c.model.remat, attention=c.model.attention,
                           rngs_seed=c.seed)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1),
                                                  max(t.steps, t.warmup_steps + 1),
                                                  end_value=t.learning_rate * t.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay))


def run(config: ml_collections.ConfigDict) -> RewardModelResult:
    t0 = time.perf_counter()
    lcfg = cfglib.loss_config(config)
    vocab = config.data.synthetic.vocab_size if config.data.format == "synthetic" else None
    model, tokenizer = build_model(config, vocab)
    splits, pad_id, extra = prepare_data(config, tokenizer)
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    t = config.train
    optimizer = make_optimizer(t)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, optimizer, mesh)
        log.info("mesh: %s; %s backbone, %d parameters; objective %s; %d train pairs", shd.describe(mesh),
                 model.cfg.arch, param_count(model), config.objective, len(splits["train"]))
        it = make_iterator(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                           pad_to_multiple=config.data.pad_to_multiple)
        # Shapes for the step's shardings, from the dataset itself (no second prefetching iterator).
        example = make_dataset(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                               pad_to_multiple=config.data.pad_to_multiple)[0]
        step = make_train_step(graphdef, make_loss_fn(lcfg), optimizer, mesh, state, example,
                               StepOptions(accum_steps=t.accum_steps))
        ckpt = RunCheckpointer(config.workdir, best_metric="accuracy") if config.workdir else None
        if ckpt is not None and ckpt.latest_step() is not None:
            state = ckpt.restore(state, it)
            log.info("resuming %s at step %d", config.workdir, int(state.step))
        scorer = make_pair_scorer(make_score_fn(lcfg, config.eval.score), graphdef)

        def evaluate(split, state):
            scores = pair_scores(scorer, state.params, splits[split], batch_size=config.eval.batch_size,
                                 pad_id=pad_id, pad_to_multiple=config.data.pad_to_multiple)
            return pairwise_metrics(scores), scores

        writer = MetricWriter(config.workdir or None)
        opts = LoopOptions(num_steps=t.steps, log_every=t.log_every, eval_every=t.eval_every,
                           checkpoint_every=t.checkpoint_every,
                           max_consecutive_bad_steps=t.max_consecutive_bad_steps, progress=t.progress)
        state, _ = train_loop(step, state, it, jax.random.key(config.seed), opts, writer=writer, checkpointer=ckpt,
                              eval_fn=lambda s: evaluate("validation", s)[0])
        results, all_scores = {}, {}
        for split in ("validation", "test"):
            results[split], scores = evaluate(split, state)
            all_scores[split] = scores
            prefs = extra.get(f"{split}_prefs")
            if lcfg.objective in ("ava_p", "ava_d"):  # is sigma calibrated? (baselines have none)
                results[split].update(calibration_metrics(
                    scores, None if prefs is None else prefs.prob_chosen_N))
                p_N = preference_probability(scores)
                if config.workdir and split == "test" and not np.isnan(p_N).all():
                    plot_reliability(reliability_bins(p_N[~np.isnan(p_N)]),
                                     os.path.join(config.workdir, "reliability_test.png"),
                                     f"{config.objective}: P(chosen) = Phi(dmu / sigma), test pairs")
            writer.write(int(state.step), results[split], prefix=f"final_{split}/")
            if prefs is not None:
                extra.update(ground_truth_diagnostics(split, prefs, graphdef, state.params, lcfg, splits[split],
                                                      pad_id=pad_id, batch_size=config.eval.batch_size))
        writer.close()
        ckpt_dir = os.path.join(config.workdir, "checkpoints", str(int(state.step))) if ckpt else None
        if ckpt:
            ckpt.close()
    extra = {k: v for k, v in extra.items() if not k.endswith("_prefs")}
    result = RewardModelResult(config.objective, results, ckpt_dir, time.perf_counter() - t0, extra, graphdef,
                               state.params, splits, all_scores,
                               tokenizer.eos_id if tokenizer is not None else syn.EOS_ID)
    if config.workdir:
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
