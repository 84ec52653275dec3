"""The reference log-prob cache: computed once, reused without a forward, invalidated by any change."""
import dataclasses

import jax
import numpy as np
from flax import nnx

from ava_jax.data import make_dataset
from ava_jax.data import synthetic as syn
from ava_jax.data.ground_truth import pair_arrays
from ava_jax.models import TQR
from ava_jax.objectives.policy import pair_logprobs
from ava_jax.train.reference import ReferenceCache

from conftest import tiny_config


def _setup(seed=0):
    arrays = pair_arrays(syn.make_preference_dataset(syn.SyntheticConfig(num_examples=21, seed=3)))
    graphdef, params = nnx.split(TQR(tiny_config("llama", vocab_size=16), rngs=nnx.Rngs(seed)), nnx.Param)
    return arrays, graphdef, params


def _cache(tmp_path):
    return ReferenceCache(str(tmp_path), batch_size=8, pad_id=syn.EOS_ID, pad_to_multiple=None)


def test_reference_logprobs_are_cached_and_reused(tmp_path):
    arrays, graphdef, params = _setup()
    first = _cache(tmp_path)
    ref = first.load_or_compute(graphdef, params, arrays, settings={"max_len": 64})
    assert ref.computed and first.forward_passes == 3  # 21 pairs in batches of 8
    # The values are the reference's own summed response log-probs, row by row (the last short batch
    # was padded, and its padding rows dropped).
    ds = make_dataset(arrays, 7, 0, pad_id=syn.EOS_ID, pad_to_multiple=None, shuffle=False, num_epochs=1,
                      drop_remainder=False)
    model = nnx.merge(graphdef, params)
    for batch in ds:
        (c, r), _ = pair_logprobs(model, jax.tree.map(np.asarray, {k: batch[k] for k in ("chosen", "rejected")}))
        np.testing.assert_allclose(ref.chosen_N[batch["index_B"]], np.asarray(c), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.rejected_N[batch["index_B"]], np.asarray(r), rtol=1e-5, atol=1e-5)
    assert np.all(ref.chosen_N < 0) and np.all(ref.rejected_N < 0)
    # A second run (a new process would build a new cache object) reads the file: no forward at all.
    second = _cache(tmp_path)
    again = second.load_or_compute(graphdef, params, arrays, settings={"max_len": 64})
    assert not again.computed and second.forward_passes == 0 and again.key == ref.key
    np.testing.assert_array_equal(again.chosen_N, ref.chosen_N)
    # attach() hands each batch its rows.
    batch = {"index_B": np.asarray([4, 0, 20]), "chosen": {}, "rejected": {}}
    np.testing.assert_array_equal(again.attach(batch)["reference"]["rejected_B"], ref.rejected_N[[4, 0, 20]])


def test_any_changed_input_invalidates_the_cache(tmp_path):
    arrays, graphdef, params = _setup()
    base = _cache(tmp_path).load_or_compute(graphdef, params, arrays)
    # One token of one response changed.
    tokens = list(arrays.rejected.tokens)
    tokens[7] = tokens[7].copy()
    tokens[7][-2] = (tokens[7][-2] + 1) % 14 + 1
    edited = dataclasses.replace(arrays, rejected=dataclasses.replace(arrays.rejected, tokens=tuple(tokens)))
    # Another reference checkpoint; other length settings.
    _, _, other_params = _setup(seed=1)
    for args, settings in (((graphdef, params, edited), None), ((graphdef, other_params, arrays), None),
                           ((graphdef, params, arrays), {"max_len": 32})):
        cache = _cache(tmp_path)
        ref = cache.load_or_compute(*args, settings=settings)
        assert ref.computed and cache.forward_passes > 0 and ref.key != base.key
    # A disabled disk cache always computes.
    cache = ReferenceCache("", batch_size=8, pad_id=syn.EOS_ID, pad_to_multiple=None)
    assert cache.load_or_compute(graphdef, params, arrays).computed


def test_repeated_evaluations_reuse_one_compiled_program():
    """Log-probs of the same model graph with other parameters (an evaluation during training) run
    through the compiled program of the first call, not a retraced closure."""
    from ava_jax.train import reference
    arrays, graphdef, params = _setup()
    _, _, other = _setup(seed=1)
    first = reference.pair_sequence_logprobs(graphdef, params, arrays, batch_size=8, pad_id=syn.EOS_ID,
                                             pad_to_multiple=16)
    second = reference.pair_sequence_logprobs(graphdef, other, arrays, batch_size=8, pad_id=syn.EOS_ID,
                                              pad_to_multiple=16)
    assert not np.allclose(first[0], second[0])
    assert reference._pair_fn(graphdef)._cache_size() == 1
