"""The `stories` real-text ground truth: gold rule, token pieces, layout, labels, caching, splits."""
import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from ava_jax.config import BUNDLED
from ava_jax.data import gold
from ava_jax.data import stories as st
from ava_jax.data import synthetic as syn
from ava_jax.models.transformer import Transformer
from ava_jax.sampling import SamplingConfig, generate
from ava_jax.tokenizers import load_tokenizer
from conftest import tiny_config

# One compiled sampling shape for the whole file: 32 rows, 24 new tokens.
SMALL = st.StoriesConfig(num_pairs=24, num_demos=8, num_demo_candidates=4, response_len=24, batch_size=32)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(st.MODEL_DIR)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stories_cache"))


@pytest.fixture(scope="module")
def prefs(cache_dir):
    return st.load_or_make_preferences(SMALL, cache_dir)


def _rewards_at(pieces):
    r = gold.gold_token_rewards(pieces)
    return {i: float(x) for i, x in enumerate(r) if x != 0}


# ------------------------------------------------------------------------------------------- gold rule


@pytest.mark.parametrize("text, expected", [
    ("She was happy.", [("happy", 1.0, False)]),
    ("She was not happy.", [("happy", -1.0, True)]),
    ("Not. Happy!", [("happy", 1.0, False)]),  # a sentence end cancels the negation
    ("not\nhappy", [("happy", 1.0, False)]),  # so does a newline
    ("He didn't cry, he was sad.", [("cry", 0.75, True), ("sad", -1.0625, False)]),  # used up by one word
    ("never, never sad", [("sad", 1.0625, True)]),  # several negations flip once; a comma ends nothing
    ("not the dog, but sad", [("sad", 1.0625, True)]),  # the NEXT lexicon word, however far in the sentence
    ("HAPPY 'Happy' (happy)", [("happy", 1.0, False)] * 3),  # case and punctuation around a word
    ("unhappy happyx happy2 happy_", [("happy", 1.0, False), ("happy", 1.0, False)]),  # whole words only
    ("She didn’t cry", [("cry", 0.75, True)]),  # a curly apostrophe is an apostrophe
    ("sad's", []),  # "sad's" is one word, not in the lexicon
    ("", []),
])
def test_scored_words(text, expected):
    got = [(w.word, w.reward, w.negated) for w in gold.scored_words(text)]
    assert got == expected
    assert gold.gold_return(text) == sum(r for _, r, _ in expected)
    assert [i for i, _ in gold.gold_char_rewards(text)] == [w.end - 1 for w in gold.scored_words(text)]
    assert all(text[w.start:w.end].lower().replace("’", "'") == w.word for w in gold.scored_words(text))


def test_reward_goes_to_the_token_completing_the_word():
    assert _rewards_at([" She", " ha", "pp", "y", " day"]) == {3: 1.0}
    assert _rewards_at(["ha", "ppy", "!"]) == {1: 1.0}
    assert _rewards_at(["hap", "", "py"]) == {2: 1.0}  # empty pieces (skipped special tokens) get nothing
    assert _rewards_at([" happ", "y sa", "d"]) == {1: 1.0, 2: -1.0625}
    assert _rewards_at([" happy sad"]) == {0: 1.0 - 1.0625}
    assert _rewards_at([" not", " ha", "ppy"]) == {2: -1.0}
    assert _rewards_at([]) == {}
    pieces = [" Tim", " was", " not", " sc", "ared", ".", " He", " smi", "led", " and", " c", "ried", "\n"]
    r = gold.gold_token_rewards(pieces)
    assert r.dtype == np.float64 and r.shape == (len(pieces),)
    assert r.sum() == gold.gold_return("".join(pieces)) == 0.9375 + 0.9375 - 1.0


def test_lexicon_file():
    lex = gold.load_lexicon()
    assert 30 <= len(lex.weights) <= 60
    assert not lex.negations & lex.weights.keys() and {"not", "never", "didn't"} <= lex.negations
    w = np.array(list(lex.weights.values()))
    assert np.all(w != 0) and np.all(w * 16 == np.round(w * 16)), "weights are multiples of 1/16"
    assert (w > 0).sum() >= 10 and (w < 0).sum() >= 10


def test_lexicon_errors_name_the_line(tmp_path):
    bad = tmp_path / "lex.tsv"
    bad.write_text("# comment\nword\tweight\nhappy\t1\n\nsad -1\n")
    with pytest.raises(ValueError, match="line 5 'sad -1'"):
        gold.load_lexicon(str(bad), gold.NEGATIONS_PATH)
    bad.write_text("word\tweight\nhappy\tvery\n")
    with pytest.raises(ValueError, match="line 2"):
        gold.load_lexicon(str(bad), gold.NEGATIONS_PATH)
    bad.write_text("happy\t1\n")
    with pytest.raises(ValueError, match="header"):
        gold.load_lexicon(str(bad), gold.NEGATIONS_PATH)
    clash = tmp_path / "clash.tsv"
    clash.write_text("word\tweight\nnot\t1\n")
    with pytest.raises(ValueError, match="also lexicon words"):
        gold.load_lexicon(str(clash), gold.NEGATIONS_PATH)


# ---------------------------------------------------------------------------------------- token pieces


def test_token_pieces_join_to_decode_on_tok512(tok):
    texts = ["Once upon a time, there was a little dog named Tim.", "She said, \"No!\"\nThen café ☃ ok.", ""]
    rows = [[tok.bos_id] + tok.encode(t) for t in texts] + [tok.encode(t) for t in texts]
    rows += [[tok.bos_id] + tok.encode("A") + [tok.eos_id, tok.bos_id] + tok.encode("b c")]
    rng = np.random.default_rng(0)
    # Random ids include byte tokens (invalid UTF-8 alone: the exact path) and special tokens.
    rows += [rng.integers(0, tok.vocab_size, n).tolist() for n in (1, 5, 40, 40, 40)]
    for ids in rows:
        pieces = gold.token_pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids), ids
    ids = [tok.bos_id] + tok.encode("Tim was happy.")
    pieces = gold.token_pieces(tok, ids)
    assert pieces[0] == "" and not pieces[1].startswith(" ")  # llama2.c drops the dummy space after BOS
    assert pieces == gold._exact_pieces(tok, ids)  # fast path == exact path where both apply
    # A three-byte character over byte tokens belongs to the token that completes it.
    snow = [3 + b for b in "☃".encode()]
    assert gold.token_pieces(tok, tok.encode("a") + snow) == ["a", "", "", "☃"]


def test_token_pieces_on_a_byte_level_bpe():
    gpt2 = load_tokenizer(BUNDLED["gpt2-bpe"])
    rng = np.random.default_rng(1)
    for ids in [gpt2.encode("I was not happy, but then I smiled. café ☃")] + [
            rng.integers(0, gpt2.vocab_size, 30).tolist() for _ in range(3)]:
        pieces = gold.token_pieces(gpt2, ids)
        assert "".join(pieces) == gpt2.decode(ids)
    pieces = gold.token_pieces(gpt2, gpt2.encode("I was not happy, but then I smiled."))
    assert gold.gold_token_rewards(pieces).sum() == -1.0 + 0.9375


# ------------------------------------------------------------------------------------- prompts, splits


def test_prompts_fit_the_bucket(tok):
    def longest(words):
        return max(words, key=lambda w: len(tok.encode(w)))
    names = sorted(st.NAMES, key=lambda w: -len(tok.encode(w)))
    for template in st.TEMPLATES:
        prompt = template.format(name=names[0], name2=names[1], animal=longest(st.ANIMALS),
                                 place=longest(st.PLACES), adj_a=st._with_article(longest(st.ADJECTIVES)),
                                 object=longest(st.OBJECTS), object_a=st._with_article(longest(st.OBJECTS)))
        assert 1 + len(tok.encode(prompt)) <= st.PROMPT_BUCKET, prompt
        assert prompt.endswith(".")  # no word or negation crosses into the response


def test_splits_share_no_prompt():
    pools = {}
    for name in ("train", "validation", "test"):
        pools[name] = set(st.draw_prompts(np.random.default_rng(0), 1000, name))
        assert all(st.prompt_split(p) == name for p in pools[name])
    assert not (pools["train"] & pools["validation"] or pools["train"] & pools["test"]
                or pools["validation"] & pools["test"])
    assert min(map(len, pools.values())) > 900  # hundreds of distinct prompts in every split


def test_config_validation():
    for kw, field in [(dict(num_pairs=0), "num_pairs"), (dict(split="dev"), "split"),
                      (dict(batch_size=31), "batch_size"), (dict(temperature=0.0), "temperature"),
                      (dict(response_len=600), "response_len"), (dict(num_demo_candidates=3), "batch_size")]:
        with pytest.raises(ValueError, match=f"StoriesConfig.{field}="):
            st.StoriesConfig(**kw)


# -------------------------------------------------------------------------------------------- sampling


def test_banned_ids_are_never_sampled():
    cfg = tiny_config("llama")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    banned = tuple(range(0, cfg.vocab_size, 2))
    out = generate(model, [[1, 2, 3], [5]], jax.random.key(0),
                   SamplingConfig(max_new_tokens=20, temperature=2.0, banned_ids=banned, eos_id=None))
    tokens = np.asarray(out.tokens)
    assert np.all(tokens % 2 == 1) and np.all(np.isfinite(np.asarray(out.logprobs)))
    greedy = generate(model, [[1, 2, 3]], jax.random.key(0), SamplingConfig(max_new_tokens=1, temperature=0.0))
    best = int(greedy.tokens[0, 0])
    second = generate(model, [[1, 2, 3]], jax.random.key(0),
                      SamplingConfig(max_new_tokens=1, temperature=0.0, banned_ids=(best,)))
    assert int(second.tokens[0, 0]) != best
    assert SamplingConfig().banned_ids == ()
    with pytest.raises(ValueError, match="banned_ids"):
        SamplingConfig(banned_ids=[2])


# ---------------------------------------------------------------------------------------------- datasets


def test_layout(prefs, tok):
    n, h = SMALL.num_pairs, SMALL.response_len
    for side in ("chosen", "rejected"):
        tokens, mask, plen, reward, ret = (getattr(prefs, f"{side}_{k}") for k in
                                          ("tokens_NxT", "mask_NxT", "prompt_len_N", "true_reward_NxT", "return_N"))
        assert tokens.shape == mask.shape == reward.shape == (n, st.PROMPT_BUCKET + h)
        assert tokens.dtype == np.int32 and mask.dtype == bool and plen.dtype == np.int32
        assert reward.dtype == np.float32 and ret.dtype == np.float64
        pos = np.arange(tokens.shape[1])[None, :]
        np.testing.assert_array_equal(mask, pos < (plen + h)[:, None])
        assert np.all(tokens[:, 0] == st.BOS_ID) and np.all(tokens[~mask] == st.EOS_ID)
        in_resp = mask & (pos >= plen[:, None])
        assert np.all(reward[~in_resp] == 0)
        assert not np.isin(tokens[in_resp], [st.BOS_ID, st.EOS_ID]).any(), "no BOS/EOS in responses"
        assert np.all(in_resp.sum(1) == h), "every response has exactly response_len tokens"
        np.testing.assert_array_equal(ret, reward.sum(1, dtype=np.float64))
        for i in range(n):
            assert plen[i] == 1 + len(tok.encode(prefs.prompts[i]))
            text = getattr(prefs, f"{side}_text")[i]
            ids = tokens[i, mask[i]].tolist()
            assert tok.decode(ids) == prefs.prompts[i] + text
            assert gold.gold_return(text) == ret[i]
            np.testing.assert_array_equal(gold.gold_token_rewards(gold.token_pieces(tok, ids)[plen[i]:]),
                                          reward[i, plen[i]:plen[i] + h])
    np.testing.assert_array_equal(prefs.chosen_prompt_len_N, prefs.rejected_prompt_len_N)
    assert np.all(prefs.chosen_return_N != prefs.rejected_return_N), "exact ties are dropped"
    assert prefs.num_candidate_pairs == n + prefs.num_ties_dropped
    assert all(st.prompt_split(p) == "train" for p in prefs.prompts)


def test_labels_and_bayes_ceiling(prefs):
    tau = SMALL.bt_temperature
    gap = prefs.chosen_return_N - prefs.rejected_return_N
    np.testing.assert_allclose(prefs.prob_chosen_N, 1 / (1 + np.exp(-gap / tau)), rtol=1e-12)
    exact = prefs.bayes_optimal_accuracy
    np.testing.assert_allclose(exact, np.mean(1 / (1 + np.exp(-np.abs(gap) / tau))), rtol=1e-12)
    # Monte Carlo: resample the BT labels of these pairs and score the gold-return ranking.
    rng = np.random.default_rng(0)
    a, b = prefs.chosen_return_N, prefs.rejected_return_N
    draws = 4000
    a_wins = rng.random((draws, a.size)) < 1 / (1 + np.exp(-(a - b) / tau))
    correct = a_wins == (a > b)
    se = np.sqrt(exact * (1 - exact) / correct.size)
    assert abs(correct.mean() - exact) < 4 * se, (correct.mean(), exact, se)
    assert 0.5 < exact < 1


def test_determinism_and_cache(prefs, cache_dir):
    fresh = st.make_stories_preferences(SMALL)
    cached = st.load_or_make_preferences(SMALL, cache_dir)
    for other in (fresh, cached):
        for f in dataclasses.fields(st.StoriesPreferences):
            x, y = getattr(prefs, f.name), getattr(other, f.name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and np.array_equal(x, y), f.name
            else:
                assert x == y, f.name
    assert len(list(pathlib.Path(cache_dir).glob("stories_preferences_*.npz"))) == 1
    other_seed = st.make_stories_preferences(dataclasses.replace(SMALL, data_seed=1))
    # seed draws the candidate prompts, data_seed the samples; dropped ties differ, so kept prompts differ.
    assert len(set(other_seed.prompts) & set(prefs.prompts)) >= SMALL.num_pairs // 4
    assert other_seed.chosen_text != prefs.chosen_text
    assert st.cache_key(SMALL, "preferences") != st.cache_key(dataclasses.replace(SMALL, data_seed=1), "preferences")
    # A field the kind does not read leaves its key alone; one it reads changes it.
    fewer_demos = dataclasses.replace(SMALL, num_demos=SMALL.num_demos + 1)
    assert st.cache_key(SMALL, "preferences") == st.cache_key(fewer_demos, "preferences")
    assert st.cache_key(SMALL, "demonstrations") != st.cache_key(fewer_demos, "demonstrations")


def test_cache_keeps_texts_exactly(prefs, tmp_path):
    odd = dataclasses.replace(prefs, chosen_text=("ends in NUL\x00", "☃ \n") + prefs.chosen_text[2:])
    cfg = dataclasses.replace(SMALL, data_seed=99)
    st._load_or_make(st.StoriesPreferences, lambda c: odd, "preferences", cfg, str(tmp_path))
    loaded = st._load_or_make(st.StoriesPreferences, None, "preferences", cfg, str(tmp_path))
    assert loaded.chosen_text == odd.chosen_text and loaded.num_ties_dropped == odd.num_ties_dropped


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("AVA_JAX_CACHE", "/some/where")
    assert st.default_cache_dir() == "/some/where"
    monkeypatch.delenv("AVA_JAX_CACHE")
    assert st.default_cache_dir().endswith("/.cache/ava_jax")


def test_validation_split_dataset():
    val = st.make_stories_preferences(dataclasses.replace(SMALL, split="validation", num_pairs=8))
    assert all(st.prompt_split(p) == "validation" for p in val.prompts)


def test_demonstrations():
    demos = st.make_stories_demonstrations(SMALL)
    n, h = SMALL.num_demos, SMALL.response_len
    assert demos.tokens_NxT.shape == (n, st.PROMPT_BUCKET + h) and demos.candidate_return_NxK.shape == (n, 4)
    np.testing.assert_array_equal(demos.return_N, demos.candidate_return_NxK.max(1))
    np.testing.assert_array_equal(demos.return_N, demos.true_reward_NxT.sum(1, dtype=np.float64))
    assert [gold.gold_return(t) for t in demos.text] == demos.return_N.tolist()
    assert all(st.prompt_split(p) == "train" for p in demos.prompts)


def test_prefix_pairs_and_describe(prefs):
    pairs = syn.make_prefix_pairs(prefs, response_len=prefs.response_len)
    assert pairs.length_M.max() <= prefs.response_len - 1 and np.all(pairs.true_diff_M != 0)
    assert syn.prefix_pair_accuracy(pairs, prefs.chosen_true_reward_NxT, prefs.rejected_true_reward_NxT) == 1.0
    stats = st.describe(prefs)
    assert stats["pairs"] == SMALL.num_pairs and stats["bayes_optimal_accuracy"] == prefs.bayes_optimal_accuracy
    assert stats["ties_dropped"] == prefs.num_ties_dropped
    assert stats["response_tokens"] == 2 * SMALL.num_pairs * SMALL.response_len
    assert sum(stats["return_sign"].values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in stats["heuristics"].values())


@pytest.mark.slow
def test_default_config_ceiling():
    stats = st.describe(st.load_or_make_preferences(st.StoriesConfig()))
    assert 0.75 <= stats["bayes_optimal_accuracy"] <= 0.85
