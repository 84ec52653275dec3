"""One tokenizer interface over Hugging Face files, llama2.c `tok512.bin` and GGUF-embedded vocabularies.

`load_tokenizer(path)` picks the source from what is on disk. No tokenizer adds a special token unless
asked (`add_bos`/`add_eos`), so the caller decides where BOS/EOS go; `pad_id` may be None because padding is
always described by an explicit mask (docs/design.md), never inferred from token ids.
"""
from __future__ import annotations

import abc
import heapq
import json
import mmap
import re
import struct
from pathlib import Path

import gguf
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the special ids and chat template a model was trained with."""

    def __init__(self, *, source: str, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 vocab_size: int, chat_template: str | None, special_tokens: dict[str, str]):
        self.source = source  # where the vocabulary came from; named in every error
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
        self._vocab_size = vocab_size
        self._chat_template = chat_template
        # {"bos_token": "<s>", ...}: what a chat template may refer to, passed as transformers passes it.
        self._special_tokens = special_tokens

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`.

        Args:
          text: the string. Special-token strings in it (e.g. "<|im_end|>") encode to their ids.
          add_bos: prepend `bos_id`.
          add_eos: append `eos_id`.

        Returns:
          The token ids.
        """

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` when it follows other text (a response after its prompt).

        The same as `encode` for byte-level BPE; tokenizers that prepend a dummy space to a whole
        text (SentencePiece, llama2.c) leave it out, so that encode(prompt) + encode_continuation(
        response) decodes to prompt + response.
        """
        return self.encode(text)

    @abc.abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`.

        Args:
          ids: token ids.
          skip_special_tokens: leave out BOS, EOS, pad and the other special tokens.

        Returns:
          The decoded string.
        """

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def _with_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise ValueError(f"{self.source}: asked to add BOS/EOS but the tokenizer defines no such token")
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders a conversation with the tokenizer's Jinja chat template.

        Args:
          messages: [{"role": ..., "content": ...}, ...].
          add_generation_prompt: end with the header that opens an assistant turn.

        Returns:
          The prompt text (not tokenized; its special-token strings encode to their ids).
        """
        if self.chat_template is None:
            raise ValueError(f"{self.source} has no chat template; write the prompt text yourself or load a "
                             "tokenizer directory or GGUF file that ships one")
        # Delegating keeps transformers' exact Jinja environment (sandbox, trim_blocks, lstrip_blocks,
        # raise_exception, tojson, loopcontrols), so prompts match the model card. Imported here because
        # transformers takes seconds to import and most callers never render a template.
        from transformers.utils.chat_template_utils import render_jinja_template
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self._special_tokens)
        return rendered[0]


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus special ids and chat template (from an HF directory or a GGUF file).

    `split_special_tokens=True` (transformers' `tokenizer_config.json` key of that name) encodes special-token
    strings in text as plain text, as llama2.c does, instead of as their ids.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str, special_tokens: dict[str, str],
                 chat_template: str | None, split_special_tokens: bool = False):
        # A tokenizer.json may carry padding/truncation settings; ids must never be cut or padded silently.
        backend.no_padding()
        backend.no_truncation()
        ids = {}
        for name in _SPECIAL_NAMES:
            token = special_tokens.get(f"{name}_token")
            ids[name] = None if token is None else backend.token_to_id(token)
            if token is not None and ids[name] is None:
                raise ValueError(f"{source}: {name}_token {token!r} is not in the vocabulary")
        # Registered as special, they encode whole and decode can skip them; they are in the vocabulary
        # already, so no id changes.
        backend.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in set(special_tokens.values())])
        backend.encode_special_tokens = split_special_tokens  # not part of tokenizer.json: set on every load
        super().__init__(source=source, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                         vocab_size=backend.get_vocab_size(with_added_tokens=True), chat_template=chat_template,
                         special_tokens=special_tokens)
        self.backend = backend
        self._continuation_backend = _without_prepend(backend)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # add_special_tokens=False bypasses a post-processor (Llama's adds BOS): BOS is the caller's call.
        return self._with_specials(self.backend.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_continuation(self, text: str) -> list[int]:
        # A `Prepend` normalizer is SentencePiece's dummy prefix (Llama's tokenizer.json, our llama2.c export).
        if self._continuation_backend is None:
            return self.encode(text)
        return self._continuation_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template,
        split_special_tokens) to `directory`.

        Args:
          directory: an existing directory; `HFTokenizer.from_dir` and transformers' `AutoTokenizer` read it.
        """
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._special_tokens}
        if self.backend.encode_special_tokens:
            config["split_special_tokens"] = True
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """Loads a Hugging Face tokenizer directory.

        Uses `tokenizer.json` when present, else GPT-2 style `vocab.json` + `merges.txt` (byte-level BPE).
        Special tokens come from `tokenizer_config.json`/`special_tokens_map.json`, else from the ids in
        `generation_config.json`/`config.json`; a bare GPT-2 vocabulary gets `<|endoftext|>` as BOS and EOS,
        as GPT-2 does. The chat template comes from `chat_template.jinja`, else `chat_template.json`, else
        `tokenizer_config.json`; `split_special_tokens` from `tokenizer_config.json`.

        Args:
          directory: the directory.

        Returns:
          The tokenizer.
        """
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = tokenizers.Tokenizer(
                models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
            # GPT-2's own settings: its regex split with no prefix space, bytes back from the byte alphabet.
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            backend.decoder = decoders.ByteLevel()
        else:
            raise ValueError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")

        configs = {name: _read_json(directory / name) for name in (
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")}
        special_tokens = {}
        for key in (f"{name}_token" for name in _SPECIAL_NAMES):
            token = configs["tokenizer_config.json"].get(key) or configs["special_tokens_map.json"].get(key)
            if isinstance(token, dict):  # a serialized AddedToken
                token = token["content"]
            for config_name in ("generation_config.json", "config.json"):
                token_id = configs[config_name].get(f"{key}_id")
                if token is None and token_id not in (None, []):
                    # Several stop ids (Llama 3: <|end_of_text|>, <|eot_id|>): the first is the EOS proper.
                    token_id = token_id[0] if isinstance(token_id, list) else token_id
                    token = backend.id_to_token(token_id)
                    if token is None:
                        raise ValueError(f"{directory / config_name}: {key}_id={token_id} is not in the vocabulary")
            if token is not None:
                special_tokens[key] = token
        if not special_tokens and backend.token_to_id("<|endoftext|>") is not None:
            special_tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}

        if (directory / "chat_template.jinja").is_file():
            chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            chat_template = (_read_json(directory / "chat_template.json").get("chat_template")
                             or configs["tokenizer_config.json"].get("chat_template"))
        if isinstance(chat_template, list):  # named templates [{"name": ..., "template": ...}]
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        return cls(backend, source=str(directory), special_tokens=special_tokens, chat_template=chat_template,
                   split_special_tokens=configs["tokenizer_config.json"].get("split_special_tokens", False))

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        """Builds the tokenizer held in a GGUF file's `tokenizer.ggml.*` metadata.

        Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`, e.g. SmolLM2) are supported.

        Args:
          path: the `.gguf` file.

        Returns:
          The tokenizer, with `tokenizer.chat_template` as its chat template.
        """
        path = Path(path)
        meta = _read_gguf_metadata(path)
        model_type = meta.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model={model_type!r}; only 'gpt2' (byte-level BPE) is "
                             "supported")
        pre = meta.get("tokenizer.ggml.pre", "gpt-2")  # absent in old files; transformers assumes GPT-2 too
        if pre not in _GGUF_DIGIT_SPLIT | _GGUF_GPT2_SPLIT:
            raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} has no known split rule; supported: "
                             f"{sorted(_GGUF_DIGIT_SPLIT | _GGUF_GPT2_SPLIT)}")
        tokens = meta["tokenizer.ggml.tokens"]
        # The file spells tokens in the byte alphabet already ("Ġthe"), as tokenizer.json does.
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
        backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _GGUF_DIGIT_SPLIT:
            split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
        backend.pre_tokenizer = split
        backend.decoder = decoders.ByteLevel()
        # Control tokens (type 3, e.g. <|im_start|>) match whole in text and decode can skip them;
        # user-defined ones (type 4) match whole but stay in decoded text, as llama.cpp treats them.
        token_types = meta.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, token_types) if kind == 3])
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == 4])
        special_tokens = {}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                          ("unk", "unknown_token_id")):
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                if not 0 <= token_id < len(tokens):
                    raise ValueError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary")
                special_tokens[f"{name}_token"] = tokens[token_id]
        return cls(backend, source=str(path), special_tokens=special_tokens,
                   chat_template=meta.get("tokenizer.chat_template"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _without_prepend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer | None:
    """A copy of `backend` without its `Prepend` normalizers, or None when it has none."""
    normalizer = backend.normalizer
    if isinstance(normalizer, normalizers.Prepend):
        kept = None
    elif isinstance(normalizer, normalizers.Sequence) and any(isinstance(n, normalizers.Prepend)
                                                              for n in normalizer):
        kept = normalizers.Sequence([n for n in normalizer if not isinstance(n, normalizers.Prepend)])
    else:
        return None
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.normalizer = kept
    copy.encode_special_tokens = backend.encode_special_tokens
    return copy


# `tokenizer.ggml.pre` values by the split llama.cpp (llama-vocab.cpp) applies. The StarCoder family, SmolLM
# included, isolates every digit before the GPT-2 regex; SmolLM2's own tokenizer.json has the same Digits step.
_GGUF_GPT2_SPLIT = frozenset({"gpt-2", "phi-2"})
_GGUF_DIGIT_SPLIT = frozenset({"smollm", "starcoder", "refact", "codeshell"})
# struct formats of the fixed-size GGUF value types (gguf.GGUFValueType); 8 is STRING and 9 ARRAY.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a little-endian GGUF v2/v3 file, without reading its tensors.

    `gguf.GGUFReader` parses every string and tensor record through numpy memmap views: 3-10 s for
    SmolLM2-135M's 98k vocabulary and merge strings, against ~0.2 s for this sequential parse.
    """
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: too short to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file (magic {magic:#x}, version {version})")

        def read(value_type: int, offset: int):
            if value_type == gguf.GGUFValueType.STRING:
                (length,) = struct.unpack_from("<Q", buf, offset)
                return buf[offset + 8:offset + 8 + length].decode("utf-8"), offset + 8 + length
            if value_type == gguf.GGUFValueType.ARRAY:
                item_type, count = struct.unpack_from("<IQ", buf, offset)
                offset += 12
                if item_type in _GGUF_SCALARS:
                    fmt = f"<{count}{_GGUF_SCALARS[item_type]}"
                    return list(struct.unpack_from(fmt, buf, offset)), offset + struct.calcsize(fmt)
                items = []
                for _ in range(count):
                    item, offset = read(item_type, offset)
                    items.append(item)
                return items, offset
            if value_type not in _GGUF_SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {value_type} at byte {offset}")
            fmt = "<" + _GGUF_SCALARS[value_type]
            return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)

        metadata, offset = {}, 24
        try:
            for _ in range(n_kv):
                key, offset = read(gguf.GGUFValueType.STRING, offset)
                (value_type,) = struct.unpack_from("<I", buf, offset)
                metadata[key], offset = read(value_type, offset + 4)
        except struct.error as e:
            raise ValueError(f"{path}: GGUF metadata ends early, at byte {offset}") from e
        return metadata


class Llama2cTokenizer(Tokenizer):
    """The llama2.c tokenizer format (`tok512.bin`, `tokenizer.bin`), encoding exactly as llama2.c's `encode`.

    bos_id=1, eos_id=2, pad_id=None: the format has no pad token (id 0 is `<unk>`), so batching code picks
    a pad id and passes a mask. No chat template.
    """

    _UNK, _BOS, _EOS, _BYTE_OFFSET = 0, 1, 2, 3  # llama2.c's fixed ids; <0xXX> is id 3 + byte
    # tokenizer.json names of ids 0, 1, 2: SentencePiece's. The file spells BOS and EOS "\n<s>\n" and "\n</s>\n",
    # llama2.c's display forms (run.c prints pieces verbatim).
    _HF_SPECIALS = ("<unk>", "<s>", "</s>")

    def __init__(self, path: str | Path):
        path = Path(path)
        self._path = path
        data = path.read_bytes()
        self._pieces: list[bytes] = []
        self._scores: list[float] = []
        try:
            (max_token_len,) = struct.unpack_from("<i", data, 0)
            offset = 4
            while offset < len(data):
                score, length = struct.unpack_from("<fi", data, offset)
                if not 0 <= length <= max_token_len or offset + 8 + length > len(data):
                    raise ValueError(f"token {len(self._pieces)} has length {length} > {max_token_len}")
                self._pieces.append(data[offset + 8:offset + 8 + length])
                self._scores.append(score)
                offset += 8 + length
            if len(self._pieces) < self._BYTE_OFFSET + 256:
                raise ValueError(f"{len(self._pieces)} tokens, fewer than <unk>, BOS, EOS and 256 byte tokens")
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path} is not a llama2.c tokenizer file: {e}") from e
        # llama2.c looks strings up by bsearch over a sorted vocabulary; keep the first id of a duplicate.
        self._piece_to_id: dict[bytes, int] = {}
        for i, piece in enumerate(self._pieces):
            self._piece_to_id.setdefault(piece, i)
        if b" " not in self._piece_to_id:
            raise ValueError(f"{path}: no ' ' token for llama2.c's dummy prefix")
        self._byte_of = {i: int(m[1], 16) for i, piece in enumerate(self._pieces)
                         if (m := re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece))}
        super().__init__(source=str(path), bos_id=self._BOS, eos_id=self._EOS, pad_id=None,
                         vocab_size=len(self._pieces), chat_template=None, special_tokens={})

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # The dummy prefix: the SentencePiece-trained merges expect every word to start with a space.
        return self._with_specials(self._encode_chars((" " + text) if text else ""), add_bos, add_eos)

    def encode_continuation(self, text: str) -> list[int]:
        return self._encode_chars(text)

    def _encode_chars(self, text: str) -> list[int]:
        ids = []
        for char in text:
            char_bytes = char.encode("utf-8")
            token = self._piece_to_id.get(char_bytes)
            ids.extend([token] if token is not None else [self._BYTE_OFFSET + b for b in char_bytes])
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        """llama2.c's loop (merge the best-scoring adjacent pair, the leftmost on ties, until none merges),
        in O(n log n) with a heap of candidate pairs over a linked list instead of rescanning every pair."""
        n = len(ids)
        token, next_, prev, alive = list(ids), list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = []

        def push_pair(left: int) -> None:
            right = next_[left]
            if right < n:
                merged = self._piece_to_id.get(self._pieces[token[left]] + self._pieces[token[right]])
                if merged is not None:
                    # (-score, left position): the best score pops first and, among equals, the leftmost pair.
                    heapq.heappush(heap, (-self._scores[merged], left, token[left], right, token[right], merged))

        for left in range(n - 1):
            push_pair(left)
        while heap:
            _, left, left_token, right, right_token, merged = heapq.heappop(heap)
            # A stale entry names a symbol that has since merged away or grown. Symbols only grow, so equal
            # (position, token) on both sides means the pair is still there, unchanged.
            if not (alive[left] and alive[right] and token[left] == left_token and token[right] == right_token):
                continue
            token[left], alive[right] = merged, False
            next_[left] = next_[right]
            if next_[left] < n:
                prev[next_[left]] = left
            if prev[left] >= 0:
                push_pair(prev[left])
            push_pair(left)
        return [token[i] for i in range(n) if alive[i]]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        prev = None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{self.source}: token id {i} is outside the vocabulary of {self.vocab_size}")
            if skip_special_tokens and i in (self._UNK, self._BOS, self._EOS):
                prev = i
                continue
            piece = self._pieces[i]
            if i in self._byte_of:
                piece = bytes([self._byte_of[i]])
            # encode() always adds the dummy-prefix space. llama2.c drops it after BOS; we also drop it at the
            # start of the ids, so decode(encode(text)) == text with or without BOS.
            elif prev in (None, self._BOS) and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            prev = i
        return out.decode("utf-8", errors="replace")

    def to_hf_tokenizer(self) -> tokenizers.Tokenizer:
        """This tokenizer as a `tokenizers.Tokenizer`: SentencePiece-style BPE with byte fallback.

        `encode(text, add_special_tokens=False).ids` equals `self.encode(text)`, and `decode(ids,
        skip_special_tokens=True)` equals `self.decode(ids)`, but for the cases below. A `Prepend(" ")`
        normalizer adds the dummy prefix (to non-empty text only); with no pre-tokenizer, BPE merges over the
        whole text, as llama2.c does. The merges are every split (a, b) of every piece p into two pieces,
        ranked by the score of p, best first (then by id, then the shorter a first). BPE merges the adjacent
        pair of lowest rank, the leftmost on ties: llama2.c's best-scoring merge, unless two pieces share a
        score, or two different splits of the best piece are adjacent pairs at once and the merge order
        changes what follows (llama2.c takes the leftmost). tok512.bin's merged pieces have distinct scores,
        and the tests compare the two on several hundred texts. `encode_special_tokens` is set, so "<s>" in
        text is text, as in `encode`; tokenizer.json does not keep that flag, `save` writes transformers'
        `split_special_tokens` for it. The post-processor adds BOS, as llama2.c's run.c does.

        Decoding differs only for ids that no single `encode` call gives. It drops one space at the start of
        the whole text, where `decode` drops the one after each BOS (packed documents) and at the start, but
        none after a leading EOS/UNK nor from a leading `<0x20>`. It writes one U+FFFD per byte of an invalid
        UTF-8 run (`decode`: one per maximal invalid subsequence), and unskipped BOS/EOS as "<s>"/"</s>".

        Returns:
          The tokenizer; `<unk>`, `<s>` and `</s>` (ids 0, 1, 2) are its special tokens.

        Raises:
          ValueError: a piece is not UTF-8, two pieces are equal, a byte token is not `<0xXX>` at id 3 + XX,
            or a special token is a part or the result of a merge (its tokenizer.json name is not its piece).
        """
        try:
            names = [*self._HF_SPECIALS, *(piece.decode("utf-8") for piece in self._pieces[self._BYTE_OFFSET:])]
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.source}: a piece is not UTF-8, which tokenizer.json cannot hold: {e}") from e
        if len(self._piece_to_id) != len(self._pieces) or len(set(names)) != len(names):
            raise ValueError(f"{self.source}: duplicate pieces; tokenizer.json needs one id per string")
        for byte in range(256):
            if names[self._BYTE_OFFSET + byte] != f"<0x{byte:02X}>":
                raise ValueError(f"{self.source}: token {self._BYTE_OFFSET + byte} is "
                                 f"{names[self._BYTE_OFFSET + byte]!r}, not the byte token <0x{byte:02X}>")
        ranked = []  # (-score of p, p, split point, a, b)
        for merged, piece in enumerate(self._pieces):
            for cut in range(1, len(piece)):
                left, right = self._piece_to_id.get(piece[:cut]), self._piece_to_id.get(piece[cut:])
                if left is not None and right is not None:
                    if min(merged, left, right) < self._BYTE_OFFSET:
                        raise ValueError(f"{self.source}: special token merge {piece[:cut]!r} + {piece[cut:]!r}")
                    ranked.append((-self._scores[merged], merged, cut, left, right))
        model = models.BPE(vocab={name: i for i, name in enumerate(names)},
                           merges=[(names[a], names[b]) for *_, a, b in sorted(ranked)],
                           unk_token=names[self._UNK], byte_fallback=True)
        backend = tokenizers.Tokenizer(model)
        backend.normalizer = normalizers.Prepend(" ")
        bos = names[self._BOS]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self._BOS)])
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        backend.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in self._HF_SPECIALS])
        backend.encode_special_tokens = True
        return backend

    def save(self, directory: str | Path) -> None:
        """Writes `tokenizer.bin` (a copy of the file) and its Hugging Face form to `directory`.

        The Hugging Face form is `to_hf_tokenizer()` as `tokenizer.json`, and a `tokenizer_config.json` that
        makes transformers' `AutoTokenizer` add BOS by default and encode special-token strings in text as
        text, as llama2.c does. `load_tokenizer(directory)` reads `tokenizer.json`, with the same ids as this
        tokenizer. No `model_max_length`: the tokenizer has none; the model's context is in its config.json.

        Args:
          directory: an existing directory.
        """
        directory = Path(directory)
        (directory / "tokenizer.bin").write_bytes(self._path.read_bytes())
        self.to_hf_tokenizer().save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **dict(zip(("unk_token", "bos_token", "eos_token"), self._HF_SPECIALS)),
                  "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True,
                  "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer stored at `path`.

    Args:
      path: a Hugging Face tokenizer directory (`tokenizer.json`, or `vocab.json` + `merges.txt`); a `.gguf`
        file; a llama2.c tokenizer `.bin` file; or a directory holding `tok512.bin` or `tokenizer.bin`.

    Returns:
      The tokenizer, or None for a directory without tokenizer files (e.g. weights only).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is a file that is not a tokenizer this module reads.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file()
                                                   and (path / "merges.txt").is_file()):
            return HFTokenizer.from_dir(path)
        for name in ("tok512.bin", "tokenizer.bin"):
            if (path / name).is_file():
                return Llama2cTokenizer(path / name)
        if (path / "tokenizer.model").is_file():
            raise ValueError(f"{path}: a SentencePiece tokenizer.model without tokenizer.json is not supported; "
                             "convert it with transformers and save tokenizer.json")
        return None
    if not path.exists():
        raise FileNotFoundError(f"No tokenizer at {path}: the path does not exist")
    if path.suffix == ".gguf":
        return HFTokenizer.from_gguf(path)
    if path.suffix == ".bin":
        return Llama2cTokenizer(path)
    raise ValueError(f"{path}: not a tokenizer file (expected a directory, a .gguf file or a llama2.c .bin)")
