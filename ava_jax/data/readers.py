"""Readers for preference pairs and demonstrations (JSON lines, optionally gzip-compressed).

Formats:
  - "hh": Anthropic HH-RLHF, one `{"chosen": dialogue, "rejected": dialogue}` per line, each a whole
    dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...". prompt = the chosen dialogue up to and
    including its last "\\n\\nAssistant:"; chosen / rejected = the text after that marker (the
    final assistant turn, leading space kept). Rule for rows whose two dialogues differ before
    their last "\\n\\nAssistant:" (5 of the 2,312 rows in harmless-base/test.jsonl.gz): they are
    bad rows of reason "prefix_mismatch" (a pair needs one shared prompt), so the default
    on_bad_row="error" stops on them and "skip" drops and counts them.
  - "jsonl": `{"prompt", "chosen", "rejected"}`, responses without the prompt. With
    `responses_include_prompt=True` the two responses hold the prompt too: each must start
    with it (else "prefix_mismatch") and it is removed.
Demonstrations: "jsonl" `{"prompt", "response"}` or "hh" (prompt + final turn of "chosen").

Nothing is stripped or normalised: the strings reach the tokenizer exactly as in the file, so
prompt + response == the original text.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Iterator

from ava_jax.data import validate
from ava_jax.data.validate import InvalidRow

ASSISTANT = "\n\nAssistant:"
PREFERENCE_FORMATS = ("hh", "jsonl")
DEMONSTRATION_FORMATS = ("jsonl", "hh")


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str  # the chosen response only (no prompt)
    rejected: str
    source: str = ""  # file it came from (for error messages downstream)
    line: int = 0  # 1-based line in `source`


@dataclasses.dataclass(frozen=True)
class DemonstrationRow:
    prompt: str
    response: str
    source: str = ""
    line: int = 0


@dataclasses.dataclass(frozen=True)
class ReadReport:
    path: str
    format: str
    n_rows: int  # non-blank lines
    n_kept: int
    bad_counts: dict[str, int]  # reason -> rows skipped (empty unless on_bad_row="skip")
    n_blank_lines: int = 0  # blank lines are not rows; counted here, not dropped silently

    @property
    def n_bad(self) -> int:
        return sum(self.bad_counts.values())


def open_text(path: str | os.PathLike) -> Iterator[str]:
    """Yields the lines of a UTF-8 text file, gunzipping when it starts with the gzip magic."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:  # type: ignore[operator]
        yield from f


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yields (1-based line number, parsed object or an InvalidRow) for each non-blank line;
    blank lines give (line, None)."""
    for line_no, text in enumerate(open_text(path), start=1):
        if not text.strip():
            yield line_no, None
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, InvalidRow("not_json", "<line>", f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield line_no, InvalidRow("not_json", "<line>",
                                      f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield line_no, obj


def split_hh_dialogue(dialogue: str, field: str) -> tuple[str, str]:
    """Splits an HH dialogue into (prompt up to and including the last ASSISTANT, final turn)."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        raise InvalidRow("no_assistant_turn", field, f"no {ASSISTANT!r} in the dialogue")
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def parse_hh_pair(obj: dict) -> tuple[str, str, str]:
    """HH row -> (prompt, chosen response, rejected response); raises InvalidRow."""
    chosen_text = validate.require_str(obj, "chosen")
    rejected_text = validate.require_str(obj, "rejected")
    prompt, chosen = split_hh_dialogue(chosen_text, "chosen")
    prompt_r, rejected = split_hh_dialogue(rejected_text, "rejected")
    if prompt != prompt_r:
        n = _common_prefix_len(prompt, prompt_r)
        raise InvalidRow(
            "prefix_mismatch", "rejected",
            f"chosen and rejected dialogues differ before their last {ASSISTANT!r} "
            f"(first difference at character {n}: {prompt[n:n + 30]!r} vs {prompt_r[n:n + 30]!r})")
    validate.check_pair(chosen, rejected)
    return prompt, chosen, rejected


def parse_jsonl_pair(obj: dict, *, responses_include_prompt: bool = False) -> tuple[str, str, str]:
    prompt = validate.require_str(obj, "prompt")
    chosen = validate.require_str(obj, "chosen")
    rejected = validate.require_str(obj, "rejected")
    if responses_include_prompt:
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.startswith(prompt):
                n = _common_prefix_len(prompt, text)
                raise InvalidRow("prefix_mismatch", field,
                                 f"does not start with the prompt (first difference at "
                                 f"character {n}: {prompt[n:n + 30]!r} vs {text[n:n + 30]!r})")
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    validate.check_pair(chosen, rejected)
    return prompt, chosen, rejected


def read_preferences(
    path: str | os.PathLike,
    format: str = "hh",  # noqa: A002 - matches the public API
    *,
    on_bad_row: str = "error",
    max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
    responses_include_prompt: bool = False,
) -> tuple[tuple[PreferenceRow, ...], ReadReport]:
    """Reads preference pairs and validates every row.

    Args:
      path: a .jsonl file, gzip-compressed or not (detected from the content).
      format: "hh" (Anthropic HH-RLHF dialogues) or "jsonl" ({prompt, chosen, rejected}).
      on_bad_row: "error" (raise DataError naming file, line, field) or "skip" (count by reason).
      max_bad_fraction: with "skip", raise DataError if more than this share of rows is bad.
      responses_include_prompt: "jsonl" only; the responses start with the prompt (removed).

    Returns:
      (rows, report): the valid rows in file order and a ReadReport with counts by reason.
    """
    if format not in PREFERENCE_FORMATS:
        raise ValueError(f"format must be one of {PREFERENCE_FORMATS}, got {format!r}")
    path = os.fspath(path)

    def parse(obj, line_no):
        if format == "hh":
            prompt, chosen, rejected = parse_hh_pair(obj)
        else:
            prompt, chosen, rejected = parse_jsonl_pair(obj, responses_include_prompt=responses_include_prompt)
        return PreferenceRow(prompt, chosen, rejected, source=path, line=line_no)

    return _read_rows(path, format, parse, on_bad_row, max_bad_fraction)


def read_demonstrations(
    path: str | os.PathLike,
    format: str = "jsonl",  # noqa: A002
    *,
    on_bad_row: str = "error",
    max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
) -> tuple[tuple[DemonstrationRow, ...], ReadReport]:
    """Reads demonstrations: "jsonl" {prompt, response}, or "hh" (the chosen dialogue's prompt
    and final assistant turn; "rejected" is ignored). Same validation and policy as
    `read_preferences`."""
    if format not in DEMONSTRATION_FORMATS:
        raise ValueError(f"format must be one of {DEMONSTRATION_FORMATS}, got {format!r}")
    path = os.fspath(path)

    def parse(obj, line_no):
        if format == "hh":
            field = "chosen"
            prompt, response = split_hh_dialogue(validate.require_str(obj, field), field)
        else:
            field = "response"
            prompt = validate.require_str(obj, "prompt")
            response = validate.require_str(obj, field)
        validate.check_response(response, field)
        return DemonstrationRow(prompt, response, source=path, line=line_no)

    return _read_rows(path, format, parse, on_bad_row, max_bad_fraction)


def _read_rows(path: str, format: str, parse, on_bad_row: str, max_bad_fraction: float):  # noqa: A002
    """Reads JSON lines through `parse(obj, line_no) -> row`; bad rows go to the BadRowPolicy."""
    policy = validate.BadRowPolicy(path, on_bad_row, max_bad_fraction)
    rows, n_rows, n_blank = [], 0, 0
    for line_no, obj in iter_json_lines(path):
        if obj is None:
            n_blank += 1
            continue
        n_rows += 1
        try:
            if isinstance(obj, InvalidRow):
                raise obj
            rows.append(parse(obj, line_no))
        except InvalidRow as err:
            policy.bad(line_no, err)
    counts = policy.finish(n_rows)
    return tuple(rows), ReadReport(path, format, n_rows, len(rows), counts, n_blank)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
