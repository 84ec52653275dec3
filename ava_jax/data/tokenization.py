"""Rows -> token ids, built from ids (never by concatenating strings).

Sequence layout: [BOS] + encode(prompt) + encode(response) + [EOS]. BOS is added when
`add_bos` and the tokenizer has one (`bos_id` not None); EOS when `add_eos` (then `eos_id` is
required). prompt_len = number of prompt tokens, BOS included.

Truncation to `max_len` (the response is kept, the prompt gives way):
  1. The response (EOS included) may use `max_len - min(max(min_prompt_tokens, n_bos),
     prompt tokens)` tokens (n_bos = 1 with BOS, else 0: BOS is never cut). If it is longer, its tail is cut (EOS goes first: a cut response did not end)
     and the row counts as response-truncated.
  2. The prompt is left-truncated to the remaining budget, keeping BOS at position 0 and the
     prompt's last tokens (the ones next to the response). min_prompt_tokens counts BOS and
     defaults to 1, the least that gives the first response token a state to be predicted from.
  3. A response with no tokens (before or after truncation) is a bad row of reason
     "response_truncated_to_nothing"; a decode round-trip failure is "roundtrip_mismatch".
Bad rows follow `on_bad_row` / `max_bad_fraction` as in `ava_jax.data.validate`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, Sequence

import numpy as np

from ava_jax.data import validate
from ava_jax.data.readers import DemonstrationRow, PreferenceRow
from ava_jax.data.validate import InvalidRow


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class SeqArrays:
    """Ragged tokenised sequences; padding happens per batch (see `ava_jax.data.batching`)."""

    tokens: tuple[np.ndarray, ...]  # each int32 [len_i], 1 <= len_i <= max_len
    prompt_len_N: np.ndarray  # int32 [N]: prompt tokens (BOS included) at the start of tokens[i]
    line_N: np.ndarray  # int32 [N]: 1-based source line of each row
    max_len: int

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def len_N(self) -> np.ndarray:  # cached: the batcher reads it for every global batch
        return np.asarray([len(t) for t in self.tokens], np.int32)


@dataclasses.dataclass(frozen=True)
class PairArrays:
    chosen: SeqArrays
    rejected: SeqArrays

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def max_len(self) -> int:
        return self.chosen.max_len


@dataclasses.dataclass(frozen=True)
class TokenizeReport:
    n_rows: int
    n_kept: int
    n_prompt_truncated: int  # kept rows whose prompt (either side, for pairs) was left-truncated
    n_response_truncated: int  # kept rows whose response (either side) lost its tail
    n_truncated: int  # kept rows with any truncation
    bad_counts: dict[str, int]  # reason -> rows dropped (on_bad_row="skip")
    max_len: int

    @property
    def n_bad(self) -> int:
        return sum(self.bad_counts.values())


@dataclasses.dataclass(frozen=True)
class BuiltSequence:
    ids: np.ndarray  # int32 [len]
    prompt_len: int
    prompt_truncated: bool
    response_truncated: bool


def build_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int], *, max_len: int,
                   bos_id: int | None, eos_id: int | None,
                   min_prompt_tokens: int = 1, field: str = "response") -> BuiltSequence:
    """[BOS] + prompt_ids + response_ids + [EOS], truncated by the module's rule.

    Raises InvalidRow("response_truncated_to_nothing") if no response token is left.
    """
    _check_budget(max_len, min_prompt_tokens)
    if not response_ids:
        raise InvalidRow("response_truncated_to_nothing", field, "the response encodes to no tokens")
    head = [] if bos_id is None else [int(bos_id)]
    prompt = head + [int(i) for i in prompt_ids]
    response = [int(i) for i in response_ids] + ([] if eos_id is None else [int(eos_id)])

    # BOS is never cut, so it counts towards the prompt tokens that are always kept.
    response_budget = max_len - min(max(min_prompt_tokens, len(head)), len(prompt))
    response_truncated = len(response) > response_budget
    if response_truncated:
        response = response[:response_budget]
    if not response:
        raise InvalidRow("response_truncated_to_nothing", field,
                         f"no room for the response (max_len={max_len})")
    prompt_budget = max_len - len(response)
    prompt_truncated = len(prompt) > prompt_budget
    if prompt_truncated:
        keep = prompt_budget - len(head)
        prompt = head + (prompt[len(prompt) - keep:] if keep > 0 else [])
    ids = np.asarray(prompt + response, np.int32)
    # By construction; checked so a future edit cannot silently break the prompt/response split.
    if len(ids) > max_len or list(ids[: len(prompt)]) != prompt or len(ids) - len(prompt) < 1:
        raise AssertionError(f"build_sequence broke its invariants for field {field!r}")
    return BuiltSequence(ids, len(prompt), prompt_truncated, response_truncated)


def _check_budget(max_len: int, min_prompt_tokens: int) -> None:
    if min_prompt_tokens < 0:
        raise ValueError(f"min_prompt_tokens must be >= 0, got {min_prompt_tokens}")
    if max_len < min_prompt_tokens + 1:
        raise ValueError(f"max_len={max_len} leaves no room for a response after "
                         f"min_prompt_tokens={min_prompt_tokens}")


def _special_ids(tokenizer: TokenizerLike, add_bos: bool, add_eos: bool):
    bos = tokenizer.bos_id if add_bos else None
    eos = None
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_id")
        eos = tokenizer.eos_id
    return bos, eos


def _encode_side(tokenizer, prompt, prompt_ids, response, field, check_roundtrip):
    # A response continues its prompt: tokenizers with a dummy-prefix space must not add a second one.
    encode = getattr(tokenizer, "encode_continuation", tokenizer.encode)
    response_ids = encode(response)
    if check_roundtrip:
        decoded = tokenizer.decode(list(prompt_ids) + list(response_ids))
        if decoded != prompt + response:
            n = next((i for i, (a, b) in enumerate(zip(decoded, prompt + response)) if a != b),
                     min(len(decoded), len(prompt + response)))
            raise InvalidRow("roundtrip_mismatch", field,
                             f"decode(encode(prompt) + encode({field})) differs from the text at "
                             f"character {n}: {decoded[n:n + 20]!r} vs "
                             f"{(prompt + response)[n:n + 20]!r}")
    return response_ids


class _Collector:
    def __init__(self, max_len):
        self.max_len = max_len
        self.tokens, self.prompt_len, self.lines = [], [], []

    def add(self, built: BuiltSequence, line: int):
        self.tokens.append(built.ids)
        self.prompt_len.append(built.prompt_len)
        self.lines.append(line)

    def arrays(self) -> SeqArrays:
        return SeqArrays(tuple(self.tokens), np.asarray(self.prompt_len, np.int32),
                         np.asarray(self.lines, np.int32), self.max_len)


def tokenize_pairs(
    rows: Sequence[PreferenceRow],
    tokenizer: TokenizerLike,
    max_len: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    min_prompt_tokens: int = 1,
    check_roundtrip: bool = True,
    on_bad_row: str = "error",
    max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
) -> tuple[PairArrays, TokenizeReport]:
    """Tokenises preference pairs (truncation rule in the module docstring).

    Args:
      rows: PreferenceRow from `read_preferences` (or `split_hh`).
      tokenizer: `encode(text) -> list[int]`, `decode(ids) -> str`, `bos_id`, `eos_id`.
      max_len: the longest sequence (prompt + response, BOS/EOS included).
      add_bos: prepend `tokenizer.bos_id` when it is not None.
      add_eos: append `tokenizer.eos_id` to each response.
      min_prompt_tokens: prompt tokens (BOS included) always kept when truncating.
      check_roundtrip: check decode(encode(prompt) + encode(response)) == prompt + response.
      on_bad_row, max_bad_fraction: as in `read_preferences`.

    Returns:
      (PairArrays, TokenizeReport). chosen and rejected of row i share index i.
    """
    _check_budget(max_len, min_prompt_tokens)
    bos, eos = _special_ids(tokenizer, add_bos, add_eos)
    policy = validate.BadRowPolicy(_source(rows), on_bad_row, max_bad_fraction, stage="tokenize")
    chosen, rejected = _Collector(max_len), _Collector(max_len)
    n_prompt_cut = n_resp_cut = n_cut = 0
    for row in rows:
        try:
            prompt_ids = tokenizer.encode(row.prompt)
            built = []
            for field, response in (("chosen", row.chosen), ("rejected", row.rejected)):
                response_ids = _encode_side(tokenizer, row.prompt, prompt_ids, response, field,
                                            check_roundtrip)
                built.append(build_sequence(prompt_ids, response_ids, max_len=max_len,
                                            bos_id=bos, eos_id=eos,
                                            min_prompt_tokens=min_prompt_tokens, field=field))
        except InvalidRow as err:
            policy.bad(row.line, err, path=row.source or None)
            continue
        chosen.add(built[0], row.line)
        rejected.add(built[1], row.line)
        p_cut = any(b.prompt_truncated for b in built)
        r_cut = any(b.response_truncated for b in built)
        n_prompt_cut += p_cut
        n_resp_cut += r_cut
        n_cut += p_cut or r_cut
    counts = policy.finish(len(rows))
    arrays = PairArrays(chosen.arrays(), rejected.arrays())
    report = TokenizeReport(len(rows), len(arrays), n_prompt_cut, n_resp_cut, n_cut, counts,
                            max_len)
    return arrays, report


def tokenize_demonstrations(
    rows: Sequence[DemonstrationRow],
    tokenizer: TokenizerLike,
    max_len: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    min_prompt_tokens: int = 1,
    check_roundtrip: bool = True,
    on_bad_row: str = "error",
    max_bad_fraction: float = validate.DEFAULT_MAX_BAD_FRACTION,
) -> tuple[SeqArrays, TokenizeReport]:
    """Tokenises demonstrations; same rules and arguments as `tokenize_pairs`."""
    _check_budget(max_len, min_prompt_tokens)
    bos, eos = _special_ids(tokenizer, add_bos, add_eos)
    policy = validate.BadRowPolicy(_source(rows), on_bad_row, max_bad_fraction, stage="tokenize")
    out = _Collector(max_len)
    n_prompt_cut = n_resp_cut = n_cut = 0
    for row in rows:
        try:
            prompt_ids = tokenizer.encode(row.prompt)
            response_ids = _encode_side(tokenizer, row.prompt, prompt_ids, row.response,
                                        "response", check_roundtrip)
            built = build_sequence(prompt_ids, response_ids, max_len=max_len, bos_id=bos,
                                   eos_id=eos, min_prompt_tokens=min_prompt_tokens)
        except InvalidRow as err:
            policy.bad(row.line, err, path=row.source or None)
            continue
        out.add(built, row.line)
        n_prompt_cut += built.prompt_truncated
        n_resp_cut += built.response_truncated
        n_cut += built.prompt_truncated or built.response_truncated
    counts = policy.finish(len(rows))
    arrays = out.arrays()
    return arrays, TokenizeReport(len(rows), len(arrays), n_prompt_cut, n_resp_cut, n_cut,
                                  counts, max_len)


def _source(rows) -> str:
    sources = {r.source for r in rows}
    return sources.pop() if len(sources) == 1 and "" not in sources else "<rows>"
