"""Tests for ava_jax.data: readers, validation, tokenisation, padding, splits, iterator state."""

import gzip
import json
import logging
import os

import numpy as np
import pytest

from ava_jax import data
from ava_jax.data import DataError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ava_jax",
                      "assets")


class ByteTokenizer:
    """Toy tokenizer: one token per UTF-8 byte (id = byte + 3); BOS = 1, EOS = pad = 2."""

    bos_id, eos_id, pad_id = 1, 2, 2

    def encode(self, text, add_bos=False, add_eos=False):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class LossyTokenizer(ByteTokenizer):
    """Drops leading spaces (as a SentencePiece-style tokenizer may): round trip fails."""

    def encode(self, text, add_bos=False, add_eos=False):
        return super().encode(text.lstrip(" "), add_bos, add_eos)


class GPT2Tokenizer:
    """The bundled GPT-2 BPE behind the project's tokenizer interface (BOS = EOS = pad = 50256)."""

    bos_id = eos_id = pad_id = 50256

    def __init__(self):
        from tokenizers import ByteLevelBPETokenizer
        d = os.path.join(ASSETS, "gpt2-bpe")
        self._tok = ByteLevelBPETokenizer(os.path.join(d, "vocab.json"),
                                          os.path.join(d, "merges.txt"))

    def encode(self, text, add_bos=False, add_eos=False):
        ids = self._tok.encode(text).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def hh(prompt_turns, chosen, rejected):
    prompt = "".join(f"\n\nHuman: {h}\n\nAssistant:{a}" for h, a in prompt_turns)
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


GOOD = hh([("Hi", " Hello."), ("How are you?", "")], " Fine, thanks.", " Go away.")


def write_lines(tmp_path, lines, name="d.jsonl", compress=False):
    path = tmp_path / name
    text = "".join(ln if isinstance(ln, str) else json.dumps(ln) + "\n" for ln in lines)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- readers
def test_hh_parsing_takes_last_assistant_turn(tmp_path):
    path = write_lines(tmp_path, [GOOD, "\n", GOOD], compress=True, name="d.jsonl.gz")
    rows, report = data.read_preferences(path, "hh")
    assert len(rows) == 2 and report.n_rows == 2 and report.n_blank_lines == 1
    row = rows[0]
    assert row.prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert (row.chosen, row.rejected) == (" Fine, thanks.", " Go away.")
    assert row.prompt + row.chosen == GOOD["chosen"]
    assert (rows[0].line, rows[1].line) == (1, 3)
    assert report.bad_counts == {}


MALFORMED = [
    ("not_json", '{"chosen": "x",\n', "<line>"),
    ("not_json", "[1, 2]\n", "<line>"),
    ("missing_field", {"chosen": GOOD["chosen"]}, "rejected"),
    ("wrong_type", {"chosen": GOOD["chosen"], "rejected": 3}, "rejected"),
    ("empty_response", hh([("Q", "")], " ", " ok"), "chosen"),
    ("empty_response", hh([("Q", "")], " ok", ""), "rejected"),
    ("identical_responses", hh([("Q", "")], " same", " same"), "rejected"),
    ("prefix_mismatch", {"chosen": "\n\nHuman: A\n\nAssistant: x",
                         "rejected": "\n\nHuman: B\n\nAssistant: y"}, "rejected"),
    ("no_assistant_turn", {"chosen": "\n\nHuman: A", "rejected": "\n\nHuman: A"}, "chosen"),
]


@pytest.mark.parametrize("reason,line,field", MALFORMED)
def test_malformed_row_error_names_file_line_field(tmp_path, reason, line, field):
    path = write_lines(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError) as info:
        data.read_preferences(path, "hh")
    err = info.value
    assert (err.path, err.line, err.field, err.reason) == (path, 2, field, reason)
    assert f"{path}:2:" in str(err) and f"field '{field}'" in str(err) and reason in str(err)


def test_skip_mode_counts_by_reason_and_logs(tmp_path, caplog):
    lines = [GOOD] * 300 + [line for _, line, _ in MALFORMED]
    path = write_lines(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="ava_jax.data.validate"):
        rows, report = data.read_preferences(path, "hh", on_bad_row="skip",
                                             max_bad_fraction=0.05)
    assert len(rows) == 300 and report.n_rows == 309 and report.n_bad == 9
    assert report.bad_counts == {"not_json": 2, "missing_field": 1, "wrong_type": 1,
                                 "empty_response": 2, "identical_responses": 1,
                                 "prefix_mismatch": 1, "no_assistant_turn": 1}
    assert f"{path}:301:" in caplog.text and "skipped 9 of 309" in caplog.text


def test_skip_mode_stops_above_max_bad_fraction(tmp_path):
    bad = hh([("Q", "")], " same", " same")
    path = write_lines(tmp_path, [GOOD] * 9 + [bad])  # 10% bad
    rows, report = data.read_preferences(path, "hh", on_bad_row="skip", max_bad_fraction=0.1)
    assert report.bad_counts == {"identical_responses": 1} and len(rows) == 9
    with pytest.raises(DataError, match=r"1 of 10 rows are bad"):
        data.read_preferences(path, "hh", on_bad_row="skip", max_bad_fraction=0.09)
    with pytest.raises(ValueError, match="on_bad_row"):
        data.read_preferences(path, "hh", on_bad_row="ignore")


def test_generic_jsonl_and_demonstrations(tmp_path):
    good = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    path = write_lines(tmp_path, [good, {"prompt": "Q", "chosen": "", "rejected": "x"}],
                       compress=True, name="p.jsonl.gz")
    rows, report = data.read_preferences(path, "jsonl", on_bad_row="skip", max_bad_fraction=0.5)
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [("Q: 2+2?", " 4", " 5")]
    assert report.bad_counts == {"empty_response": 1}

    full = {"prompt": "Q:", "chosen": "Q: yes", "rejected": "Q: no"}
    path = write_lines(tmp_path, [full, {"prompt": "Q:", "chosen": "Q: a", "rejected": "R: b"}])
    with pytest.raises(DataError, match=r":2: field 'rejected'.*prefix_mismatch"):
        data.read_preferences(path, "jsonl", responses_include_prompt=True)
    rows, _ = data.read_preferences(path, "jsonl", responses_include_prompt=True,
                                    on_bad_row="skip", max_bad_fraction=0.5)
    assert (rows[0].prompt, rows[0].chosen, rows[0].rejected) == ("Q:", " yes", " no")

    path = write_lines(tmp_path, [{"prompt": "P", "response": " r"}, {"prompt": "P"}])
    with pytest.raises(DataError, match=r":2: field 'response'.*missing_field"):
        data.read_demonstrations(path)
    demos, report = data.read_demonstrations(path, on_bad_row="skip", max_bad_fraction=0.5)
    assert [(d.prompt, d.response) for d in demos] == [("P", " r")]
    assert report.bad_counts == {"missing_field": 1}
    demos, _ = data.read_demonstrations(write_lines(tmp_path, [GOOD]), "hh")
    assert demos[0].response == " Fine, thanks." and demos[0].prompt.endswith("Assistant:")


# ----------------------------------------------------------------------------- tokenisation
def test_build_sequence_truncation_rule():
    tok = ByteTokenizer()
    p, r = tok.encode("abcdefgh"), tok.encode("xyz")
    # Fits: [BOS] + 8 + 3 + [EOS] = 13.
    s = data.build_sequence(p, r, max_len=13, bos_id=1, eos_id=2)
    assert s.ids.tolist() == [1] + p + r + [2] and s.prompt_len == 9
    assert not s.prompt_truncated and not s.response_truncated
    # Prompt left-truncated, BOS kept, response (with EOS) whole.
    s = data.build_sequence(p, r, max_len=8, bos_id=1, eos_id=2)
    assert s.ids.tolist() == [1] + p[-3:] + r + [2] and s.prompt_len == 4
    assert s.prompt_truncated and not s.response_truncated
    # Response longer than max_len - min_prompt_tokens: tail (EOS first) cut.
    s = data.build_sequence(p, r, max_len=3, bos_id=1, eos_id=2, min_prompt_tokens=1)
    assert s.ids.tolist() == [1] + r[:2] and s.prompt_len == 1 and s.response_truncated
    s = data.build_sequence(p, r, max_len=5, bos_id=None, eos_id=2, min_prompt_tokens=2)
    assert s.ids.tolist() == p[-2:] + r and s.prompt_len == 2
    with pytest.raises(data.validate.InvalidRow, match="response_truncated_to_nothing"):
        data.build_sequence(p, [], max_len=8, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="no room"):
        data.build_sequence(p, r, max_len=2, bos_id=1, eos_id=2, min_prompt_tokens=2)


def test_tokenize_pairs_builds_from_ids_and_counts_truncation():
    rows = [data.PreferenceRow("P" * 10, " ab", " abcdefgh", "f.jsonl", 1),
            data.PreferenceRow("Q", " a", " b", "f.jsonl", 2)]
    arrays, report = data.tokenize_pairs(rows, ByteTokenizer(), max_len=8)
    tok = ByteTokenizer()
    c0, r0 = arrays.chosen.tokens[0], arrays.rejected.tokens[0]
    # chosen: BOS + 10 + 3 + EOS = 15 > 8 -> prompt keeps 4 tokens (BOS + last 3).
    assert c0.tolist() == [1] + tok.encode("PPP") + tok.encode(" ab") + [2]
    assert arrays.chosen.prompt_len_N.tolist() == [4, 2]
    # rejected: response (9 + EOS) > 8 - 1 -> cut to 7, prompt is BOS only.
    assert r0.tolist() == [1] + tok.encode(" abcdefgh")[:7]
    assert arrays.rejected.prompt_len_N[0] == 1
    assert arrays.chosen.tokens[1].tolist() == [1] + tok.encode("Q") + tok.encode(" a") + [2]
    assert (report.n_kept, report.n_prompt_truncated, report.n_response_truncated,
            report.n_truncated) == (2, 1, 1, 1)
    assert arrays.chosen.line_N.tolist() == [1, 2]
    assert arrays.chosen.len_N.max() <= 8 and arrays.rejected.len_N.max() <= 8


def test_tokenize_bad_rows_roundtrip_and_empty():
    rows = [data.PreferenceRow("Q", " a", " b", "f.jsonl", 7)]
    with pytest.raises(DataError, match=r"f.jsonl:7: field 'chosen'.*roundtrip_mismatch"):
        data.tokenize_pairs(rows, LossyTokenizer(), max_len=16)
    arrays, report = data.tokenize_pairs(rows, LossyTokenizer(), max_len=16,
                                         check_roundtrip=False)
    assert len(arrays) == 1 and report.n_bad == 0

    class Empty(ByteTokenizer):
        def encode(self, text, add_bos=False, add_eos=False):
            return [] if text == " b" else super().encode(text)

    many = [data.PreferenceRow("Q", " a", " c", "f.jsonl", i) for i in range(1, 20)]
    arrays, report = data.tokenize_pairs(many + [data.PreferenceRow("Q", " a", " b", "f", 20)],
                                         Empty(), max_len=16, check_roundtrip=False,
                                         on_bad_row="skip", max_bad_fraction=0.05)
    assert report.bad_counts == {"response_truncated_to_nothing": 1} and len(arrays) == 19
    demos = [data.DemonstrationRow("Q", " b", "d.jsonl", 3)]
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'response'.*truncated_to_nothing"):
        data.tokenize_demonstrations(demos, Empty(), max_len=16, check_roundtrip=False)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_with_pad_equal_to_eos(side):
    tok = ByteTokenizer()
    rows = [data.PreferenceRow("ab", " c", " defg", "f", 1),
            data.PreferenceRow("abcdef", " h", " i", "f", 2)]
    arrays, _ = data.tokenize_pairs(rows, tok, max_len=64)
    batch = data.collate_pairs([data.batching.PairSource(arrays)[i] for i in range(2)],
                               pad_id=tok.pad_id, padding_side=side, pad_to_multiple=4,
                               max_len=64)
    longest = max(arrays.chosen.len_N.max(), arrays.rejected.len_N.max())  # 10
    T = batch["chosen"]["tokens_BxT"].shape[1]
    assert T == 12 == -(-longest // 4) * 4 and batch["rejected"]["tokens_BxT"].shape == (2, T)
    for side_name in ("chosen", "rejected"):
        b = batch[side_name]
        seqs = getattr(arrays, side_name)
        assert b["tokens_BxT"].dtype == np.int32 and b["mask_BxT"].dtype == np.int32
        for i, ids in enumerate(seqs.tokens):
            n = len(ids)
            assert ids[-1] == tok.eos_id == tok.pad_id  # pad == eos: ids cannot give the mask
            assert b["mask_BxT"][i].sum() == n
            real = slice(0, n) if side == "right" else slice(T - n, T)
            assert b["mask_BxT"][i, real].all()
            assert b["tokens_BxT"][i, real].tolist() == ids.tolist()
            pad = np.ones(T, bool)
            pad[real] = False
            assert (b["tokens_BxT"][i, pad] == tok.pad_id).all()
        assert b["prompt_len_B"].tolist() == seqs.prompt_len_N.tolist()
    assert batch["index_B"].tolist() == [0, 1]


def test_bucket_length():
    assert data.bucket_length(1, pad_to_multiple=64, max_len=200) == 64
    assert data.bucket_length(64, pad_to_multiple=64, max_len=200) == 64
    assert data.bucket_length(65, pad_to_multiple=64, max_len=200) == 128
    assert data.bucket_length(190, pad_to_multiple=64, max_len=200) == 192
    assert data.bucket_length(193, pad_to_multiple=64, max_len=200) == 200
    assert data.bucket_length(37, pad_to_multiple=None, max_len=200) == 37
    with pytest.raises(ValueError, match="longer than max_len"):
        data.bucket_length(201, pad_to_multiple=64, max_len=200)


# ----------------------------------------------------------------------------- bundled HH file
@pytest.fixture(scope="module")
def hh_splits():
    return data.split_hh()


def test_bundled_hh_split_sizes_and_bad_rows(hh_splits):
    parts, report = hh_splits
    assert report.n_rows == 2312 and report.n_kept == 2303
    assert report.bad_counts == {"prefix_mismatch": 5, "empty_response": 4}
    assert report.bad_counts == data.HH_HARMLESS_BAD_COUNTS
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 1813, "validation": 237, "test": 253} == data.HH_HARMLESS_SPLIT_SIZES
    lines = [set(r.line for r in v) for v in parts.values()]
    assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    prompts = [set(r.prompt for r in v) for v in parts.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    with pytest.raises(DataError, match=r"test.jsonl.gz:87: field 'chosen'.*empty_response"):
        data.read_preferences(data.HH_HARMLESS_BASE_TEST, "hh")


def test_split_is_order_independent(hh_splits):
    parts, _ = hh_splits
    rows = sum(parts.values(), ())
    rng = np.random.default_rng(0)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    again = data.split_rows(shuffled)
    assert {k: {r.line for r in v} for k, v in again.items()} == \
        {k: {r.line for r in v} for k, v in parts.items()}
    other = data.split_rows(rows, salt="1")
    assert {r.line for r in other["test"]} != {r.line for r in parts["test"]}


def test_bundled_hh_tokenizes_with_gpt2(hh_splits):
    parts, _ = hh_splits
    tok = GPT2Tokenizer()
    rows = parts["validation"]
    arrays, report = data.tokenize_pairs(rows, tok, max_len=256)
    assert report.n_bad == 0 and report.n_kept == len(rows)  # every HH row round-trips
    assert 0 < report.n_truncated < len(rows)
    n_whole = 0
    for i, row in enumerate(rows):
        for side, seqs in ((row.chosen, arrays.chosen), (row.rejected, arrays.rejected)):
            prompt_ids = [tok.bos_id] + tok.encode(row.prompt)
            response_ids = tok.encode(side) + [tok.eos_id]
            full = seqs.tokens[i].tolist()
            p = int(seqs.prompt_len_N[i])
            assert len(full) <= 256 and full[0] == tok.bos_id
            if len(prompt_ids) + len(response_ids) <= 256:  # untruncated: exact layout
                n_whole += 1
                assert full == prompt_ids + response_ids and p == len(prompt_ids)
                assert tok.decode(full[1:-1]) == row.prompt + side
            else:  # the response is kept (or cut at 255), the prompt's tail is kept
                assert full[p:] == response_ids[: 256 - p]
                assert full[1:p] == prompt_ids[len(prompt_ids) - p + 1:]
    assert len(rows) <= n_whole < 2 * len(rows)  # some, not all, sequences were truncated


# ----------------------------------------------------------------------------- iterator
def _toy_pairs(n=23):
    rows = [data.PreferenceRow(f"prompt {i}", f" yes {'x' * (i % 7)}", f" no {i}", "f", i + 1)
            for i in range(n)]
    return data.tokenize_pairs(rows, ByteTokenizer(), max_len=32)[0]


def test_eval_batches_cover_every_row_once_in_full_batches():
    arrays = _toy_pairs(23)
    seen = []
    for batch, n in data.eval_batches(arrays, 4, pad_id=2, pad_to_multiple=8):
        assert batch["index_B"].shape == (4,) and batch["chosen"]["tokens_BxT"].shape[0] == 4
        assert batch["chosen"]["tokens_BxT"].shape[1] % 8 == 0
        seen += batch["index_B"][:n].tolist()
        if n < 4:  # the last batch: 23 = 5 * 4 + 3, filled with its first row
            assert n == 3 and batch["index_B"].tolist() == [20, 21, 22, 20]
            np.testing.assert_array_equal(batch["chosen"]["tokens_BxT"][3], batch["chosen"]["tokens_BxT"][0])
    assert seen == list(range(23))
    full = {"x": np.arange(8).reshape(4, 2)}
    assert data.fill_rows(full, 4) is full


def test_iterator_state_restore_mid_epoch():
    arrays = _toy_pairs()
    it = data.make_iterator(arrays, batch_size=4, seed=7, pad_id=2, pad_to_multiple=8)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(10)]  # runs past the end of epoch 1 (5 batches/epoch)
    fresh = data.make_iterator(arrays, batch_size=4, seed=7, pad_id=2, pad_to_multiple=8)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(10)]
    for a, b in zip(expected, got):
        assert a["index_B"].tolist() == b["index_B"].tolist()
        for side in ("chosen", "rejected"):
            for k in a[side]:
                np.testing.assert_array_equal(a[side][k], b[side][k])
    first = [b["index_B"].tolist() for b in expected]
    restarted = data.make_iterator(arrays, batch_size=4, seed=7, pad_id=2, pad_to_multiple=8)
    assert [next(restarted)["index_B"].tolist() for _ in range(13)][3:] == first


def test_iterator_epochs_reshuffle_and_cover_all_rows():
    arrays = _toy_pairs(20)
    it = data.make_iterator(arrays, batch_size=5, seed=0, pad_id=2, num_epochs=3)
    order = np.concatenate([b["index_B"] for b in it])
    assert len(order) == 60
    epochs = order.reshape(3, 20)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(20))
    assert epochs[0].tolist() != epochs[1].tolist() != epochs[2].tolist()
    other = data.make_iterator(arrays, batch_size=5, seed=1, pad_id=2, num_epochs=1)
    assert np.concatenate([b["index_B"] for b in other]).tolist() != epochs[0].tolist()
    plain = data.make_iterator(arrays, batch_size=8, seed=0, pad_id=2, shuffle=False,
                               num_epochs=1, drop_remainder=False)
    batches = list(plain)
    assert [b["index_B"].tolist() for b in batches][-1] == list(range(16, 20))
    assert all(b["chosen"]["tokens_BxT"].shape[1] % 64 == 0 or
               b["chosen"]["tokens_BxT"].shape[1] == 32 for b in batches)


def test_demonstration_iterator_left_padding():
    demos = [data.DemonstrationRow("hello", f" world{'!' * i}", "d", i + 1) for i in range(6)]
    arrays, report = data.tokenize_demonstrations(demos, ByteTokenizer(), max_len=24)
    assert report.n_kept == 6 and report.n_truncated == 0
    it = data.make_iterator(arrays, batch_size=3, seed=3, pad_id=2, padding_side="left",
                            pad_to_multiple=None)
    batch = next(it)
    lens = arrays.len_N[batch["index_B"]]
    assert batch["tokens_BxT"].shape == (3, lens.max())
    assert batch["mask_BxT"].sum(1).tolist() == lens.tolist()
    assert (batch["mask_BxT"][:, -1] == 1).all()  # left padding: last column is real
    assert (batch["tokens_BxT"][:, -1] == 2).all()  # ... and it is EOS


# ----------------------------------------------------------------------------- user files -> splits
TEMPLATE_PROMPTS = ("Tell me a story about a cat.", "Tell me a story about a dog.",
                    "Tell me a story about a bird.")


def _templated_rows(n=600):
    """n pairs on three templated prompts: too few prompts to split by prompt hash."""
    return [{"prompt": TEMPLATE_PROMPTS[i % 3], "chosen": f" The pet was happy {i}.",
             "rejected": f" The pet was sad {i}."} for i in range(n)]


def _varied_rows(n=200, per_prompt=2, start=0):
    return [{"prompt": f"Tell me story number {start + i // per_prompt}.", "chosen": f" Max ran {i}.",
             "rejected": f" Max sat {i}."} for i in range(n)]


def _prepare(**data_keys):
    from ava_jax.config import data_config, resolve_path
    from ava_jax.data.load import load_pair_splits
    from ava_jax.pipelines.reward_model import default_config as reward_model_config
    from ava_jax.tokenizers import load_tokenizer
    c = reward_model_config("bt", "hh_tiny")
    c.data.update(format="jsonl", max_train_pairs=0, max_validation_pairs=0, max_test_pairs=0,
                  **data_keys)
    return load_pair_splits(data_config(c.data), load_tokenizer(resolve_path("bundled:tinystories-260k")))


def test_few_prompts_split_by_row_hash_and_say_so(tmp_path, caplog):
    rows = _templated_rows()
    path = write_lines(tmp_path, rows, name="templated.jsonl")
    with caplog.at_level(logging.WARNING, logger="ava_jax.data.splits"):
        splits, _, extra = _prepare(path=path)
    assert extra["split_method"] == "row_hash"
    assert "only 3 distinct prompts" in caplog.text and "row hash" in caplog.text
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 600 and sizes["validation"] > 20 and sizes["test"] > 20, sizes
    # The row hash is order-independent, like the prompt hash.
    parsed, _ = data.read_preferences(path, "jsonl")
    by_row, method = data.split_preferences(parsed)
    again, _ = data.split_preferences(parsed[::-1])
    assert method == "row_hash"
    assert {k: sorted(r.line for r in v) for k, v in by_row.items()} == {
        k: sorted(r.line for r in v) for k, v in again.items()}
    assert {k: len(v) for k, v in by_row.items()} == sizes
    # Forcing the prompt split gives back the old error, which now names the split method.
    with pytest.raises(DataError, match=r"templated.jsonl.*the validation split has no pairs.*prompt_hash"):
        _prepare(path=path, split_by="prompt")


def test_many_prompts_still_split_by_prompt(tmp_path):
    path = write_lines(tmp_path, _varied_rows(200), name="varied.jsonl")
    rows, _ = data.read_preferences(path, "jsonl")
    parts, method = data.split_preferences(rows)
    assert method == "prompt_hash"
    assert parts == data.split_rows(rows)  # the same split as before split_preferences existed
    prompts = {k: {r.prompt for r in v} for k, v in parts.items()}
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["test"]
                or prompts["validation"] & prompts["test"])
    splits, _, extra = _prepare(path=path)
    assert extra["split_method"] == "prompt_hash"
    assert {k: len(v) for k, v in splits.items()} == {k: len(v) for k, v in parts.items()}
    _, method = data.split_preferences(rows, split_by="row")
    assert method == "row_hash"
    with pytest.raises(ValueError, match="split_by"):
        data.split_preferences(rows, split_by="line")


def test_given_validation_and_test_files_are_used_as_given(tmp_path):
    train = write_lines(tmp_path, _varied_rows(40), name="train.jsonl")
    val = write_lines(tmp_path, _varied_rows(7, start=100), name="val.jsonl")
    test = write_lines(tmp_path, _varied_rows(5, start=200), name="test.jsonl")
    splits, _, extra = _prepare(path=train, validation_path=val, test_path=test)
    assert extra["split_method"] == "files"
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "validation": 7, "test": 5}
    assert splits["validation"].chosen.line_N.tolist() == list(range(1, 8))
    # Only one given: the other split is made from the train file (by prompt, 10%) and logged.
    splits, _, extra = _prepare(path=write_lines(tmp_path, _varied_rows(200), name="big.jsonl"),
                                validation_path=val)
    assert extra["split_method"] == "files+prompt_hash"
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes["validation"] == 7 and sizes["train"] + sizes["test"] == 200 and sizes["test"] > 0, sizes


def test_missing_split_file_error_names_key_and_path(tmp_path):
    from ava_jax.errors import ConfigError, UserError
    train = write_lines(tmp_path, _varied_rows(40), name="train.jsonl")
    missing = str(tmp_path / "no_such_val.jsonl")
    with pytest.raises(ConfigError) as info:
        _prepare(path=train, validation_path=missing)
    assert "data.validation_path" in str(info.value) and missing in str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match=r"data\.path=.*nope\.jsonl.* does not exist"):
        _prepare(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"data\.split_by='line'"):
        _prepare(path=train, split_by="line")


def test_process_shares_of_a_global_batch_are_disjoint_and_padded_alike():
    """Each process reads only its contiguous share of every global batch; together the shares are
    the single-process batch (same rows, same order, same padded length), with no row twice."""
    from ava_jax.data.batching import make_dataset
    from ava_jax.data.tokenization import SeqArrays
    rng = np.random.default_rng(0)
    seqs = tuple(rng.integers(3, 50, rng.integers(2, 40)).astype(np.int32) for _ in range(37))
    arrays = SeqArrays(seqs, np.ones(37, np.int32), np.arange(1, 38, dtype=np.int32), 64)
    whole = make_dataset(arrays, 8, 3, pad_id=0, pad_to_multiple=16, num_epochs=1)
    shares = [make_dataset(arrays, 8, 3, pad_id=0, pad_to_multiple=16, shard=(i, 4), num_epochs=1) for i in range(4)]
    for b in range(len(whole)):
        parts = [s[b] for s in shares]
        assert len({p["tokens_BxT"].shape for p in parts}) == 1
        np.testing.assert_array_equal(np.concatenate([p["index_B"] for p in parts]), whole[b]["index_B"])
        np.testing.assert_array_equal(np.concatenate([p["tokens_BxT"] for p in parts]), whole[b]["tokens_BxT"])
    seen = np.concatenate([s[b]["index_B"] for s in shares for b in range(len(whole))])
    assert len(seen) == len(set(seen.tolist())) == 32
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        make_dataset(arrays, 8, 3, pad_id=0, shard=(0, 3))
