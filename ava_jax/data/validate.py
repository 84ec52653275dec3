"""Row validation shared by the readers and the tokenizer step.

Every row that cannot be used is a *bad row* with one of the reasons in `BAD_ROW_REASONS`.
Policy (`on_bad_row`):
  - "error" (default): the first bad row raises `DataError` naming file, 1-based line and field.
  - "skip": the row is dropped, counted by reason and logged (first few at WARNING, one summary
    line at the end). If more than `max_bad_fraction` of the rows are bad the run still stops
    with `DataError`. Nothing is dropped without being counted; the counts go into the report.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from ava_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# reason -> what it means. Readers use the first seven, tokenisation the last two.
BAD_ROW_REASONS = {
    "not_json": "the line is not valid JSON, or not a JSON object",
    "missing_field": "a required field is absent",
    "wrong_type": "a required field is not a string",
    "empty_response": "a response is empty or whitespace only",
    "identical_responses": "chosen and rejected responses are identical",
    "no_assistant_turn": "an HH dialogue has no '\\n\\nAssistant:' marker",
    "prefix_mismatch": "the prompt is not a shared prefix of chosen and rejected",
    "response_truncated_to_nothing": "the response has no tokens left after tokenisation/truncation",
    "roundtrip_mismatch": "decode(encode(prompt) + encode(response)) != prompt + response",
}

ON_BAD_ROW = ("error", "skip")
DEFAULT_MAX_BAD_FRACTION = 0.01
_LOG_FIRST = 5


class InvalidRow(Exception):
    """Raised by the row checks; turned into a `DataError` or a count by `BadRowPolicy`."""

    def __init__(self, reason: str, field: str, detail: str = ""):
        assert reason in BAD_ROW_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.field, self.detail = reason, field, detail


def check_policy(on_bad_row: str, max_bad_fraction: float) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


class BadRowPolicy:
    """Applies `on_bad_row` to the rows of one pass (one file read, one tokenisation)."""

    def __init__(self, path: str, on_bad_row: str = "error",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, stage: str = "read"):
        check_policy(on_bad_row, max_bad_fraction)
        self.path, self.on_bad_row, self.max_bad_fraction, self.stage = (
            path, on_bad_row, max_bad_fraction, stage)
        self.counts: collections.Counter[str] = collections.Counter()

    def bad(self, line: int, err: InvalidRow, path: str | None = None) -> None:
        path = path or self.path
        where = f"{path}:{line}: field '{err.field}'"
        if self.on_bad_row == "error":
            raise DataError(
                f"{where}: bad row ({err.reason}): {err.detail} "
                f"[{self.stage}; pass on_bad_row='skip' to drop and count such rows]",
                path=path, line=line, field=err.field, reason=err.reason)
        self.counts[err.reason] += 1
        if sum(self.counts.values()) <= _LOG_FIRST:
            log.warning("%s: skipping bad row (%s): %s", where, err.reason, err.detail)

    def finish(self, n_rows: int) -> dict[str, int]:
        """Logs the summary, enforces `max_bad_fraction`, returns reason -> count."""
        n_bad = sum(self.counts.values())
        counts = dict(sorted(self.counts.items()))
        if n_bad:
            log.warning("%s: %s skipped %d of %d rows as bad: %s",
                        self.path, self.stage, n_bad, n_rows, counts)
        if n_rows and n_bad / n_rows > self.max_bad_fraction:
            raise DataError(
                f"{self.path}: {n_bad} of {n_rows} rows are bad ({n_bad / n_rows:.2%} > "
                f"max_bad_fraction={self.max_bad_fraction:.2%}) during {self.stage}: {counts}",
                path=self.path)
        return counts


def require_str(obj: dict[str, Any], field: str) -> str:
    if field not in obj:
        raise InvalidRow("missing_field", field, f"no field '{field}' (fields: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str):
        raise InvalidRow("wrong_type", field, f"expected a string, got {type(value).__name__}")
    return value


def check_response(text: str, field: str) -> None:
    if not text.strip():
        raise InvalidRow("empty_response", field, f"response is empty or whitespace: {text!r}")


def check_pair(chosen: str, rejected: str) -> None:
    check_response(chosen, "chosen")
    check_response(rejected, "rejected")
    if chosen == rejected:
        raise InvalidRow("identical_responses", "rejected",
                         f"identical to chosen: {_short(chosen)!r}")


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
