"""A tensorflow-datasets builder that prepares a local preference JSONL once, for grain to read.

Needs `tensorflow-datasets` (tested with 4.9.10, without TensorFlow installed) and
`array_record` (a grain dependency); not imported by `ava_jax.data`.

    builder = prepare_preferences("prefs.jsonl", data_dir="/tmp/tfds", format="jsonl")
    ds = preference_dataset(builder, "train")          # grain.MapDataset of PreferenceRow
    rows = read_tfds_preferences(builder, "train")     # tuple, file order, for tokenize_pairs

The rows are read and validated by `read_preferences` (same formats and on_bad_row policy), so
the stored dataset holds only valid rows; the read report's counts are kept in the dataset's
metadata ("bad_counts", "n_rows"). Each source file gets its own builder config, named by the
file's stem and the first 12 hex digits of its sha256, so a changed file is prepared anew and
an unchanged one is reused. Splits: "train" only, or `split_fractions` {name: fraction} split
by prompt hash exactly as `ava_jax.data.splits.split_rows`.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ava_jax.data import readers, splits, validate


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PreferenceJsonl(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Preference pairs {prompt, chosen, rejected, line} from one local JSONL file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt, chosen, rejected (responses only) and the source line."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves a packaged builder's code path through `importlib_resources`,
        # which it does not declare as a dependency; this file is the code path.
        return epath.Path(os.path.abspath(__file__))

    def __init__(self, *, source_path: str, format: str = "jsonl",  # noqa: A002
                 split_fractions: Mapping[str, float] | None = None,
                 on_bad_row: str = "error",
                 max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION, **kwargs):
        self._source_path = os.path.abspath(source_path)
        self._format = format
        self._split_fractions = dict(split_fractions or {"train": 1.0})
        self._on_bad_row, self._max_bad_fraction = on_bad_row, max_bad_fraction
        stem = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(source_path).split(".")[0])
        splits_tag = "_".join(f"{k}{v:g}" for k, v in self._split_fractions.items())
        tag = hashlib.sha256(f"{format}|{splits_tag}".encode()).hexdigest()[:6]
        config = tfds.core.BuilderConfig(
            name=f"{stem}_{_file_sha256(self._source_path)[:12]}_{tag}",
            description=f"{self._source_path} ({format}), splits {self._split_fractions}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Preference pairs prepared by ava_jax.data.tfds_builder.",
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(),
                "chosen": tfds.features.Text(),
                "rejected": tfds.features.Text(),
                "line": np.int64,
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local file only
        rows, report = readers.read_preferences(
            self._source_path, self._format, on_bad_row=self._on_bad_row,
            max_bad_fraction=self._max_bad_fraction)
        self.info.metadata["n_rows"] = report.n_rows
        self.info.metadata["bad_counts"] = dict(report.bad_counts)
        parts = splits.split_rows(rows, list(self._split_fractions.values()),
                                  list(self._split_fractions))
        return {name: self._generate_examples(part) for name, part in parts.items()}

    def _generate_examples(self, rows):
        for row in rows:
            yield row.line, {"prompt": row.prompt, "chosen": row.chosen,
                             "rejected": row.rejected, "line": row.line}


def prepare_preferences(path: str | os.PathLike, data_dir: str | os.PathLike, *,
                        format: str = "jsonl",  # noqa: A002
                        split_fractions: Mapping[str, float] | None = None,
                        on_bad_row: str = "error",
                        max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
                        ) -> PreferenceJsonl:
    """Prepares `path` as an array_record dataset under `data_dir` (once) and returns the builder."""
    builder = PreferenceJsonl(source_path=os.fspath(path), format=format,
                              split_fractions=split_fractions, on_bad_row=on_bad_row,
                              max_bad_fraction=max_bad_fraction, data_dir=os.fspath(data_dir),
                              file_format="array_record")
    builder.download_and_prepare()
    return builder


def _to_row(source: str, record: Mapping) -> readers.PreferenceRow:
    def text(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    return readers.PreferenceRow(text(record["prompt"]), text(record["chosen"]),
                                 text(record["rejected"]), source=source,
                                 line=int(record["line"]))


def preference_dataset(builder: PreferenceJsonl, split: str = "train") -> grain.MapDataset:
    """A grain MapDataset of PreferenceRow over the prepared split (TFDS storage order)."""
    source = builder.as_data_source(split=split)
    return grain.MapDataset.source(source).map(
        lambda record: _to_row(builder._source_path, record))  # pylint: disable=protected-access


def read_tfds_preferences(builder: PreferenceJsonl,
                          split: str = "train") -> tuple[readers.PreferenceRow, ...]:
    """All rows of a prepared split, sorted back into source-file order."""
    ds = preference_dataset(builder, split)
    return tuple(sorted((ds[i] for i in range(len(ds))), key=lambda r: r.line))
