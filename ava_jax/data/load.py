"""Preference pairs by data format, for every pipeline: train / validation / test `PairArrays`.

    splits, pad_id, extra = load_pair_splits(data_cfg, tokenizer)

`DataConfig` is the typed `config.data` (the conversion is `ava_jax.config.data_config`). Formats:
"synthetic" (the ground-truth token MDP; each split from its own seed), "stories" (the stories task:
TinyStories-260K continuations with gold per-token rewards; each split's prompts by hash), "hh"
(HH-RLHF JSONL, the bundled harmless-base file by default), "jsonl" ({prompt, chosen, rejected}
rows), "tfds" (a JSONL file prepared once as an array_record TFDS dataset, read through grain).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import numpy as np

from ava_jax.data.ground_truth import demonstration_arrays, pair_arrays
from ava_jax.data.readers import read_demonstrations, read_preferences
from ava_jax.data.splits import DEFAULT_FRACTIONS, HH_HARMLESS_BASE_TEST, SPLIT_BY, split_preferences, split_rows
from ava_jax.data.tokenization import tokenize_demonstrations, tokenize_pairs
from ava_jax.data.validate import ON_BAD_ROW
from ava_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("hh", "jsonl", "tfds", "synthetic", "stories")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how they are cut (the `config.data` keys of the same names).

    Attributes:
      format: one of FORMATS.
      path: the data file (hh: default the bundled harmless-base file; jsonl, tfds: required).
      tfds_dir: where a "tfds" dataset is prepared (default: beside the file).
      max_len: token budget of prompt + response (text formats).
      pad_to_multiple: batches pad their length to a multiple of this (None: to the longest row).
      on_bad_row: "skip" or "error" for a malformed row; max_bad_fraction caps the skipped share.
      check_roundtrip: check that tokenising then decoding gives the text back.
      max_pairs: {split: cap} (0 or absent: all pairs).
      split_by: "auto" | "prompt" | "row" (`split_preferences`).
      validation_path, test_path: the user's own split files (same format as path), used as given.
      synthetic: {split: SyntheticConfig} for format "synthetic".
      stories: {split: StoriesConfig} for format "stories"; stories_cache_dir: where they are cached.
    """

    format: str
    path: str = ""
    tfds_dir: str = ""
    max_len: int = 256
    pad_to_multiple: int | None = 64
    on_bad_row: str = "skip"
    max_bad_fraction: float = 0.01
    check_roundtrip: bool = True
    max_pairs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    split_by: str = "auto"
    validation_path: str = ""
    test_path: str = ""
    synthetic: Mapping | None = None
    stories: Mapping | None = None
    stories_cache_dir: str = ""

    def __post_init__(self):
        for name, allowed in (("format", FORMATS), ("split_by", SPLIT_BY), ("on_bad_row", ON_BAD_ROW)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r} is not one of {allowed}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.max_len < 2:
            raise ValueError(f"data.max_len={self.max_len} must be >= 2")
        for fmt in ("synthetic", "stories"):
            if self.format == fmt and set(getattr(self, fmt) or ()) != set(SPLITS):
                raise ValueError(f"DataConfig(format={fmt!r}) needs a {fmt} config for each of {SPLITS}")

    @property
    def needs_tokenizer(self) -> bool:
        return self.format in ("hh", "jsonl", "tfds")


def load_pair_splits(d: DataConfig, tokenizer=None):
    """Returns ({split: PairArrays}, pad_id, extra info); extra["split_method"] says how the splits were made.

    split_method: "prompt_hash" or "row_hash" (`split_preferences`, chosen by data.split_by), "files"
    (data.validation_path and data.test_path given: no hashing), "files+prompt_hash" /
    "files+row_hash" (one of the two given; the other split hashed out of data.path), or
    "separate_seeds" (synthetic: each split generated from its own seed), "prompt_hash" (stories:
    each split's prompts by hash). Ground-truth tasks also put each split's preferences in
    extra[f"{split}_prefs"] and their Bayes-optimal accuracy in extra[f"{split}_bayes_optimal_accuracy"].
    """
    if d.format in ("synthetic", "stories"):
        return _ground_truth_splits(d)
    if tokenizer is None:
        raise ConfigError(f"data.format={d.format!r} needs a tokenizer, and the model (model.path) has none")
    if d.format in ("hh", "jsonl"):
        rows, method, where = _read_splits(d)
    else:  # tfds
        rows, method, where = _tfds_splits(d)
    log.info("splits (%s): %s", method, {k: len(v) for k, v in rows.items()})
    splits = {}
    for name in SPLITS:
        part = rows[name]
        if d.max_pairs.get(name):
            part = part[: d.max_pairs[name]]
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


def load_demonstration_splits(d: DataConfig, tokenizer=None):
    """Returns ({split: SeqArrays}, pad_id, extra): demonstrations by format.

    "synthetic": the Boltzmann-optimal expert's responses (extra[f"{split}_expert_loglik"]: the
    expert's own mean log-likelihood per response token); "stories": the gold-best of K samples per
    prompt; "hh" (the chosen dialogue's last assistant turn) and "jsonl" ({prompt, response} rows):
    read, split by prompt hash (or data.validation_path / data.test_path) and tokenised.
    """
    extra = {}
    if d.format in ("synthetic", "stories"):
        from ava_jax.data import synthetic as syn
        splits = {}
        for name in SPLITS:
            if d.format == "synthetic":
                demos = syn.make_demonstrations(d.synthetic[name])
                resp = demos.mask_NxT & (np.arange(demos.tokens_NxT.shape[1])[None] >= demos.prompt_len_N[:, None])
                extra[f"{name}_expert_loglik"] = float(demos.expert_logprob_NxT[resp].sum() / resp.sum())
            else:
                from ava_jax.data import stories
                demos = stories.load_or_make_demonstrations(d.stories[name], d.stories_cache_dir or None)
            extra[f"{name}_demo_return"] = float(np.mean(demos.return_N))
            splits[name] = demonstration_arrays(demos)
            log.info("%s %s: %d demonstrations, mean gold return %.3f", d.format, name, len(splits[name]),
                     extra[f"{name}_demo_return"])
        if d.format == "synthetic":
            return splits, syn.EOS_ID, extra
        from ava_jax.data import stories
        return splits, stories.EOS_ID, extra
    if tokenizer is None:
        raise ConfigError(f"data.format={d.format!r} needs a tokenizer, and the model (model.path) has none")
    if d.format not in ("hh", "jsonl"):
        raise ConfigError(f"data.format={d.format!r} has no demonstrations reader; use 'jsonl' ({{prompt, "
                          "response}} rows), 'hh', 'synthetic' or 'stories'")
    if d.format == "jsonl" and not d.path:
        raise ConfigError("data.format='jsonl' needs --config.data.path=FILE")
    files = {"train": ("path", d.path or HH_HARMLESS_BASE_TEST)}
    files.update({n: (f"{n}_path", getattr(d, f"{n}_path")) for n in ("validation", "test") if getattr(d, f"{n}_path")})
    rows = {}
    for name, (key, path) in files.items():
        require_file(key, path)
        rows[name], report = read_demonstrations(path, d.format, on_bad_row=d.on_bad_row,
                                                 max_bad_fraction=d.max_bad_fraction)
        log.info("%s: %d rows, %d kept, bad rows by reason %s", report.path, report.n_rows, report.n_kept,
                 dict(report.bad_counts))
    missing = [n for n in ("validation", "test") if n not in files]
    if missing:
        fractions = DEFAULT_FRACTIONS if len(missing) == 2 else (0.9, 0.1)
        rows.update(split_rows(rows["train"], fractions, ("train", *missing)))
    splits = {}
    for name in SPLITS:
        part = rows[name][: d.max_pairs[name]] if d.max_pairs.get(name) else rows[name]
        arrays, rep = tokenize_demonstrations(part, tokenizer, d.max_len, check_roundtrip=d.check_roundtrip,
                                              on_bad_row=d.on_bad_row, max_bad_fraction=d.max_bad_fraction)
        if len(arrays) == 0:
            raise DataError(f"data.path={d.path or 'bundled HH-RLHF'!r}: the {name} split has no demonstrations "
                            f"(split sizes by prompt hash: { {k: len(v) for k, v in rows.items()} })")
        splits[name] = arrays
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    return splits, pad, extra


def _ground_truth_splits(d: DataConfig):
    from ava_jax.data import synthetic as syn
    splits, extra = {}, {"split_method": "separate_seeds" if d.format == "synthetic" else "prompt_hash"}
    for name in SPLITS:
        if d.format == "synthetic":
            prefs = syn.make_preference_dataset(d.synthetic[name])
        else:
            from ava_jax.data import stories
            prefs = stories.load_or_make_preferences(d.stories[name], d.stories_cache_dir or None)
        splits[name] = pair_arrays(prefs)
        log.info("%s %s: %d pairs, Bayes-optimal accuracy %.4f", d.format, name, len(splits[name]),
                 prefs.bayes_optimal_accuracy)
        extra[f"{name}_bayes_optimal_accuracy"] = prefs.bayes_optimal_accuracy
        extra[f"{name}_prefs"] = prefs
    if d.format == "synthetic":
        return splits, syn.EOS_ID, extra
    from ava_jax.data import stories
    return splits, stories.EOS_ID, extra


def require_file(key: str, path: str) -> None:
    """ConfigError naming `data.<key>` unless `path` is a file."""
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"data.{key}={path!r} {what}")


def _tfds_splits(d: DataConfig):
    # Too big to parse at every start: prepared once as an array_record TFDS dataset under
    # data.tfds_dir (reused while the source file is unchanged), then read back through grain.
    if not d.path:
        raise ConfigError("data.format='tfds' needs --config.data.path=FILE (a {prompt, chosen, rejected} JSONL)")
    for key in ("validation_path", "test_path"):
        if getattr(d, key):
            raise ConfigError(f"data.{key} is not supported with data.format='tfds' (it splits data.path by "
                              "prompt hash); use data.format='jsonl' for your own splits")
    if d.split_by == "row":
        raise ConfigError("data.split_by='row' is not supported with data.format='tfds' (it splits by prompt "
                          "hash); use data.format='jsonl'")
    require_file("path", d.path)
    from ava_jax.data import tfds_builder
    builder = tfds_builder.prepare_preferences(
        d.path, d.tfds_dir or os.path.join(os.path.dirname(os.path.abspath(d.path)), "tfds"),
        split_fractions={"train": 0.8, "validation": 0.1, "test": 0.1}, on_bad_row=d.on_bad_row,
        max_bad_fraction=d.max_bad_fraction)
    rows = {name: tfds_builder.read_tfds_preferences(builder, name) for name in SPLITS}
    return rows, "prompt_hash", dict.fromkeys(rows, f"data.path={d.path!r}")


def _read_splits(d: DataConfig):
    """Reads data.path (the train file when data.validation_path / data.test_path are given) and
    splits it; a given split file is used as it is. Returns ({split: rows}, split method, {split: source})."""
    if d.format == "jsonl" and not d.path:
        raise ConfigError("data.format='jsonl' needs --config.data.path=FILE")
    files = {"train": ("path", d.path or HH_HARMLESS_BASE_TEST)}
    files.update({name: (f"{name}_path", getattr(d, f"{name}_path")) for name in ("validation", "test")
                  if getattr(d, f"{name}_path")})
    rows = {}
    for name, (key, path) in files.items():
        require_file(key, path)
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
