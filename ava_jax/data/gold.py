"""The stories task's gold rule: a shipped word lexicon with negation, scored on any decoded text.

It gives the stories preference data its known per-token rewards (`ava_jax.data.stories`) and is the
gold judge the policy pipelines score samples with, whatever their tokenizer.

Rule (`scored_words`):
  * a word is a maximal run of letters with inner apostrophes (`don't`; `'happy'` is `happy`),
    matched case-insensitively (’ counts as ') against `assets/stories/lexicon.tsv` (word, weight);
  * a negation word (`assets/stories/negations.txt`: not, never, didn't, ...) flips the sign of the
    NEXT lexicon word in the same sentence and is then used up; several negations before one word
    still flip it once; a sentence ends at `.`, `!`, `?` or a newline, which cancels a pending negation;
  * the reward of a scored word goes to the token whose decoded piece holds the word's last character
    (`gold_token_rewards`), so per-token rewards sum to `gold_return(text)`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import NamedTuple, Sequence

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
LEXICON_PATH = os.path.join(ASSETS, "stories", "lexicon.tsv")
NEGATIONS_PATH = os.path.join(ASSETS, "stories", "negations.txt")



@dataclasses.dataclass(frozen=True)
class Lexicon:
    weights: dict[str, float]
    negations: frozenset[str]


def _data_lines(path: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line that is neither blank nor a # comment."""
    with open(path, encoding="utf-8") as f:
        return [(i, line.rstrip("\n")) for i, line in enumerate(f, start=1)
                if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=None)
def load_lexicon(lexicon_path: str = LEXICON_PATH, negations_path: str = NEGATIONS_PATH) -> Lexicon:
    """The gold lexicon (a `word<TAB>weight` header, then one word<TAB>weight a line) and its negations.

    Args:
      lexicon_path: the TSV file. negations_path: one negation word per line.

    Returns:
      Lexicon; raises ValueError naming the file and line of a malformed entry.
    """
    lines = _data_lines(lexicon_path)
    if not lines or lines[0][1] != "word\tweight":
        raise ValueError(f"{lexicon_path}: the first data line must be the header 'word<TAB>weight'")
    weights = {}
    for i, line in lines[1:]:
        word, _, weight = line.partition("\t")
        if not (WORD.fullmatch(word) and word == word.lower() and word not in weights
                and re.fullmatch(r"[+-]?\d+(\.\d+)?", weight)):
            raise ValueError(f"{lexicon_path}: line {i} {line!r} is not a new lower-case word<TAB>weight")
        weights[word] = float(weight)
    negations = frozenset(line.strip() for _, line in _data_lines(negations_path))
    if negations & weights.keys():
        raise ValueError(f"{negations_path}: {sorted(negations & weights.keys())} are also lexicon words")
    return Lexicon(weights=weights, negations=negations)


WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")  # letters with inner apostrophes
WORD_OR_STOP = re.compile(WORD.pattern + r"|[.!?\n]")


class ScoredWord(NamedTuple):
    start: int  # character span [start, end) in the text
    end: int
    word: str  # lower case
    reward: float  # the lexicon weight, sign-flipped when negated
    negated: bool


def scored_words(text: str, lexicon: Lexicon | None = None) -> list[ScoredWord]:
    """Every lexicon word of `text` with its gold reward, in order (the rule in the module docstring)."""
    lexicon = lexicon or load_lexicon()
    out, pending = [], False
    for m in WORD_OR_STOP.finditer(text):
        word = m.group().lower().replace("’", "'")
        if word in ".!?\n":
            pending = False
        elif word in lexicon.negations:
            pending = True
        elif word in lexicon.weights:
            weight = lexicon.weights[word]
            out.append(ScoredWord(m.start(), m.end(), word, -weight if pending else weight, pending))
            pending = False
    return out


def gold_char_rewards(text: str, lexicon: Lexicon | None = None) -> list[tuple[int, float]]:
    """(index of the scored word's last character, reward) for every scored word of `text`."""
    return [(w.end - 1, w.reward) for w in scored_words(text, lexicon)]


def gold_return(text: str, lexicon: Lexicon | None = None) -> float:
    """The gold return of `text`: the sum of its scored words' rewards."""
    return float(sum(w.reward for w in scored_words(text, lexicon)))


def gold_token_rewards(pieces: Sequence[str], lexicon: Lexicon | None = None) -> np.ndarray:
    """Per-token gold rewards of a tokenized text.

    Args:
      pieces: the decoded string of each token, in order (`token_pieces`), for any tokenizer.
      lexicon: default the shipped one.

    Returns:
      float64 [len(pieces)]: each scored word's reward at the token whose piece holds the word's last
      character; sums to gold_return("".join(pieces)).
    """
    ends_L = np.cumsum([len(p) for p in pieces])
    rewards_L = np.zeros(len(pieces))
    for char_index, reward in gold_char_rewards("".join(pieces), lexicon):
        # The first token whose end passes the character; empty pieces never hold one.
        rewards_L[np.searchsorted(ends_L, char_index, side="right")] += reward
    return rewards_L


# ------------------------------------------------------------------------------------------- token pieces

_NO_PIECE = object()


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The decoded string of each token, with "".join(pieces) == tokenizer.decode(ids) exactly.

    A token's piece is what it adds to the decoded prefix, so llama2.c's dropped leading space after BOS
    and skipped special tokens ("") come out as `decode` has them. A character that only appears once a
    later token completes it (a UTF-8 sequence over byte tokens) belongs to the completing token.

    Args:
      tokenizer: any `ava_jax.tokenizers.Tokenizer` (only `decode` is used).
      ids: token ids.

    Returns:
      One string per id.
    """
    return token_pieces_cached(tokenizer, list(ids), {})


def token_pieces_cached(tokenizer, ids: list[int], cache: dict) -> list[str]:
    """`token_pieces` with a memo of (previous id, id) -> piece shared across calls (one dict per corpus)."""
    # Fast path: a piece from a two-token window (exact for decoders that look back one token, as
    # llama2.c's does), memoised per (previous, token); the join check falls back to the exact path.
    pieces, prev = [], None
    for i in ids:
        piece = cache.get((prev, i))
        if piece is None:
            head = "" if prev is None else tokenizer.decode([prev])
            both = tokenizer.decode([i] if prev is None else [prev, i])
            ok = both.startswith(head) and "\ufffd" not in both
            piece = cache[(prev, i)] = both[len(head):] if ok else _NO_PIECE
        if piece is _NO_PIECE:
            return _exact_pieces(tokenizer, ids)
        pieces.append(piece)
        prev = i
    return pieces if "".join(pieces) == tokenizer.decode(ids) else _exact_pieces(tokenizer, ids)


def _exact_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Decodes every prefix (O(n^2)); characters a later prefix rewrites are taken back from earlier pieces."""
    pieces, text = [], ""
    for n in range(1, len(ids) + 1):
        new = tokenizer.decode(ids[:n])
        keep = len(os.path.commonprefix([text, new]))
        excess, j = len(text) - keep, len(pieces) - 1
        while excess > 0:
            cut = min(excess, len(pieces[j]))
            pieces[j], excess, j = pieces[j][:len(pieces[j]) - cut], excess - cut, j - 1
        pieces.append(new[keep:])
        text = new
    return pieces
