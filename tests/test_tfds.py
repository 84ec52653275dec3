"""The TFDS (array_record) builder for local preference JSONL files, read back with grain."""

import json

import grain
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from ava_jax import data  # noqa: E402
from ava_jax.data import tfds_builder  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = [{"prompt": f"Q{i}: café?", "chosen": f" yes {i}", "rejected": f" no {i}"}
        for i in range(12)]


def test_prepare_once_and_read_with_grain(tmp_path):
    src = _write(tmp_path / "prefs.jsonl", ROWS + [{"prompt": "Q", "chosen": " a"}])
    data_dir = tmp_path / "tfds"
    with pytest.raises(data.DataError, match=r"prefs.jsonl:13: field 'rejected'"):
        tfds_builder.prepare_preferences(src, data_dir)
    builder = tfds_builder.prepare_preferences(src, data_dir, on_bad_row="skip",
                                               max_bad_fraction=0.1)
    assert builder.info.metadata["bad_counts"] == {"missing_field": 1}
    assert builder.info.metadata["n_rows"] == 13
    expected, _ = data.read_preferences(src, "jsonl", on_bad_row="skip", max_bad_fraction=0.1)
    assert tfds_builder.read_tfds_preferences(builder) == expected

    ds = tfds_builder.preference_dataset(builder, "train")
    assert isinstance(ds, grain.MapDataset) and len(ds) == 12
    shuffled = [r.line for r in ds.shuffle(seed=0)]
    assert sorted(shuffled) == list(range(1, 13))

    # A second call reuses the prepared files.
    files = sorted(p.name for p in data_dir.rglob("*.array_record*"))
    assert files, "no array_record files written"
    again = tfds_builder.prepare_preferences(src, data_dir, on_bad_row="skip",
                                             max_bad_fraction=0.1)
    assert again.data_dir == builder.data_dir


def test_splits_match_split_rows(tmp_path):
    src = _write(tmp_path / "p.jsonl", ROWS)
    fractions = {"train": 0.5, "test": 0.5}
    builder = tfds_builder.prepare_preferences(src, tmp_path / "tfds", split_fractions=fractions)
    rows, _ = data.read_preferences(src, "jsonl")
    parts = data.split_rows(rows, list(fractions.values()), list(fractions))
    for name in fractions:
        assert tfds_builder.read_tfds_preferences(builder, name) == parts[name]
    assert sum(len(v) for v in parts.values()) == 12
