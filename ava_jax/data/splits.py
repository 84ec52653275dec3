"""Deterministic train/validation/test splits by content hash.

Rule: u = first 8 bytes of sha256(salt + prompt), big-endian, / 2**64, in [0, 1). A row goes to
the first split whose cumulative fraction exceeds u. Hashing the prompt (not the row's
position) keeps the split independent of row order and of which other rows were dropped, and
keeps pairs that share a prompt in the same split (no prompt leaks across splits). Sizes are
therefore close to, not exactly, the fractions.

The bundled Anthropic HH-RLHF harmless-base test file (`HH_HARMLESS_BASE_TEST`, 2,312 rows) read
with on_bad_row="skip" keeps 2,303 rows: 5 are "prefix_mismatch" and 4 "empty_response" (the
chosen final turn is a single space, lines 87, 517, 926, 1104). With the default fractions
(0.8, 0.1, 0.1) and salt "" the split sizes are:
    train 1,813   validation 237   test 253      (HH_HARMLESS_SPLIT_SIZES; total 2,303)
Two prompts occur twice among the kept rows; each pair of duplicates lands in one split.

Splitting by prompt needs many distinct prompts. A file built on a few templated prompts (600 rows,
3 prompts) would put every row in one split. `split_preferences(..., split_by="auto")` therefore
splits by row hash instead (sha256 of prompt NUL chosen NUL rejected, still order-independent;
identical rows stay together) when the rows have fewer than `MIN_PROMPTS` distinct prompts, or when
the prompt split leaves a split with a positive fraction empty, and warns that validation and test
then share prompts with train (they measure new responses to seen prompts).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Sequence, TypeVar

from ava_jax.data import readers, validate

R = TypeVar("R")
log = logging.getLogger(__name__)

HH_HARMLESS_BASE_TEST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "assets", "hh-rlhf", "harmless-base", "test.jsonl.gz")
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
HH_HARMLESS_SPLIT_SIZES = {"train": 1813, "validation": 237, "test": 253}
HH_HARMLESS_BAD_COUNTS = {"empty_response": 4, "prefix_mismatch": 5}
SPLIT_BY = ("auto", "prompt", "row")
MIN_PROMPTS = 20  # "auto" splits by prompt only with at least this many distinct prompts


def hash_unit(text: str, salt: str = "") -> float:
    """A stable number in [0, 1) from sha256(salt + text)."""
    digest = hashlib.sha256((salt + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_rows(rows: Sequence[R], fractions: Sequence[float] = DEFAULT_FRACTIONS,
               names: Sequence[str] = SPLIT_NAMES, *, salt: str = "",
               key: Callable[[R], str] = lambda row: row.prompt) -> dict[str, tuple[R, ...]]:
    """Splits rows by the hash of `key(row)` (the prompt by default); row order is kept."""
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for {len(names)} split names")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    edges, total = [], 0.0
    for f in fractions:
        total += f
        edges.append(total)
    edges[-1] = 1.0 + 1e-12  # float sums may fall short of 1
    out: dict[str, list[R]] = {name: [] for name in names}
    for row in rows:
        u = hash_unit(key(row), salt)
        name = next(n for n, edge in zip(names, edges) if u < edge)
        out[name].append(row)
    return {name: tuple(v) for name, v in out.items()}


def row_key(row) -> str:
    """The row-hash key: prompt, chosen and rejected joined by NUL."""
    return "\0".join((row.prompt, row.chosen, row.rejected))


def split_preferences(rows: Sequence[readers.PreferenceRow],
                      fractions: Sequence[float] = DEFAULT_FRACTIONS, names: Sequence[str] = SPLIT_NAMES, *,
                      split_by: str = "auto", salt: str = "", source: str = "",
                      ) -> tuple[dict[str, tuple[readers.PreferenceRow, ...]], str]:
    """Splits preference rows by prompt hash or, where prompts are too few, by row hash.

    Args:
      rows: the rows to split; order is kept within each split.
      fractions, names: as in `split_rows`.
      split_by: "prompt" (pairs that share a prompt stay in one split), "row" (hash of the whole
        row: pairs that share a prompt may land in different splits), or "auto": "prompt" unless
        the rows have fewer than MIN_PROMPTS distinct prompts or the prompt split leaves a split
        with a positive fraction empty, then "row" with a warning.
      salt: as in `split_rows`.
      source: the file the rows came from, for the log line.

    Returns:
      ({name: rows}, method) with method "prompt_hash" or "row_hash".
    """
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if split_by == "row":
        return split_rows(rows, fractions, names, salt=salt, key=row_key), "row_hash"
    parts = split_rows(rows, fractions, names, salt=salt)
    if split_by == "prompt" or not rows:
        return parts, "prompt_hash"
    n_prompts = len({row.prompt for row in rows})
    empty = [n for n, f in zip(names, fractions) if f > 0 and not parts[n]]
    if n_prompts >= MIN_PROMPTS and not empty:
        return parts, "prompt_hash"
    why = (f"only {n_prompts} distinct prompts (< {MIN_PROMPTS})" if n_prompts < MIN_PROMPTS
           else f"splitting its {n_prompts} prompts by hash leaves {empty} empty")
    log.warning("%s: %d rows, %s: splitting by row hash instead of prompt hash, so the splits share prompts "
                "(evaluation measures new responses to seen prompts); split_by='prompt' forbids this",
                source or "preference rows", len(rows), why)
    return split_rows(rows, fractions, names, salt=salt, key=row_key), "row_hash"


def split_hh(
    path: str | os.PathLike = HH_HARMLESS_BASE_TEST,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    salt: str = "",
    on_bad_row: str = "skip",
    max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
) -> tuple[dict[str, tuple[readers.PreferenceRow, ...]], readers.ReadReport]:
    """Reads an HH-RLHF file and splits it into train/validation/test by prompt hash.

    on_bad_row defaults to "skip" here because the bundled file has 9 known bad rows (see the
    module docstring); they are counted in the returned report.

    Returns:
      ({"train": rows, "validation": rows, "test": rows}, ReadReport).
    """
    rows, report = readers.read_preferences(path, "hh", on_bad_row=on_bad_row,
                                            max_bad_fraction=max_bad_fraction)
    return split_rows(rows, fractions, salt=salt), report
