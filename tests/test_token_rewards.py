"""Per-token reward means for the ground-truth diagnostics: equal to the reader's values row by row,
whatever the batching and padding, one compiled program per length bucket, and read in the pair
scorer's own forward."""
import jax
import numpy as np
from flax import nnx

from ava_jax import objectives
from ava_jax.data import PairArrays, SeqArrays, collate_sequences, eval_batches
from ava_jax.eval.intermediate import make_token_reward_reader, token_reward_means
from ava_jax.eval.reward import make_pair_scorer, pair_scores
from ava_jax.models import TQR

from conftest import tiny_config

MAX_LEN = 32


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    # Batches of 4: lengths up to 32, 17 and 9 (buckets 32, 24 and 16); one row fills its bucket exactly.
    lens = [5, 17, 9, 32, 5, 9, 17, 5, 9]
    n = len(lens)
    tokens = tuple(rng.integers(3, 97, size=int(k)).astype(np.int32) for k in lens)
    prompt = rng.integers(1, 4, size=n).astype(np.int32)
    return SeqArrays(tokens=tokens, prompt_len_N=prompt, line_N=np.arange(1, n + 1, dtype=np.int32), max_len=MAX_LEN)


def test_token_reward_means_match_each_row_alone():
    model = TQR(tiny_config(max_seq_len=MAX_LEN), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    reader = objectives.get("ava_p").reward_reader()
    arrays = _arrays()
    token_reader = make_token_reward_reader(reader, graphdef)
    alone = jax.jit(lambda p, side: reader(nnx.merge(graphdef, p), side)[0])  # compiled once per row length

    got = token_reward_means(token_reader, params, arrays, MAX_LEN, pad_id=0, batch_size=4, pad_to_multiple=8)

    assert got.shape == (len(arrays), MAX_LEN)
    for i, toks in enumerate(arrays.tokens):
        # The row alone, unpadded: transition t (action token t + 1) belongs in column t + 1.
        side = collate_sequences([{"tokens": toks, "prompt_len": int(arrays.prompt_len_N[i]), "index": i}],
                                 pad_id=0, pad_to_multiple=None, max_len=MAX_LEN)
        mu_N = np.asarray(alone(params, side))[0]
        np.testing.assert_allclose(got[i, 1:len(toks)], mu_N[:len(toks) - 1], rtol=1e-5, atol=1e-6)
        assert got[i, 0] == 0.0
    # Batches of 4 padded to multiples of 8, the last (1 row) padded to 4 rows: one program per bucket.
    assert token_reader._cache_size() == 3
    # A second side or split reuses the compiled programs.
    token_reward_means(token_reader, params, arrays, MAX_LEN, pad_id=0, batch_size=4, pad_to_multiple=8)
    assert token_reader._cache_size() == 3


def test_pair_scorer_reads_token_means_in_its_scoring_pass():
    """make_pair_scorer's reader: the same scores as the plain scorer, the same means as
    token_reward_means on each side, and one forward (XLA merges the reader's with the score's)."""
    model = TQR(tiny_config(max_seq_len=MAX_LEN), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    objective = objectives.get("ava_p")
    score_fn, reader = objective.score_fn(None, "sum"), objective.reward_reader()
    arrays = PairArrays(chosen=_arrays(0), rejected=_arrays(1))
    batching = dict(batch_size=4, pad_id=0, pad_to_multiple=8)
    plain_scorer = make_pair_scorer(score_fn, graphdef)
    scorer = make_pair_scorer(score_fn, graphdef, reader=reader)

    plain = pair_scores(plain_scorer, params, arrays, **batching)
    got = pair_scores(scorer, params, arrays, token_length=MAX_LEN, **batching)

    assert set(got) == set(plain) | {"mu_c", "mu_r"}
    for k, v in plain.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    token_reader = make_token_reward_reader(reader, graphdef)
    for k, side in (("mu_c", arrays.chosen), ("mu_r", arrays.rejected)):
        want = token_reward_means(token_reader, params, side, MAX_LEN, **batching)
        assert got[k].shape == want.shape == (len(arrays), MAX_LEN) and np.abs(want).max() > 0
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    # One pass: the program with the means costs about what the plain one does (two forwards: 2x).
    batch, _ = next(eval_batches(arrays, **batching))
    flops = [f.lower(params, batch).compile().cost_analysis()["flops"] for f in (plain_scorer, scorer)]
    assert flops[1] < 1.2 * flops[0], flops
    # Without token_length the means are as wide as a row can be.
    wide = pair_scores(scorer, params, arrays, **batching)
    assert wide["mu_c"].shape == (len(arrays), arrays.max_len)
