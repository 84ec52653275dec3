"""Objectives on the full model: padding tokens change nothing; JSONL data trains; NaN steps stop runs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.config import reward_model_config
from ava_jax.data import DataError, split_hh
from ava_jax.losses import LossConfig
from ava_jax.models import HeadConfig, TQR
from ava_jax.objectives import make_loss_fn
from ava_jax.pipelines import reward_model
from ava_jax.train.loop import LoopOptions, NonFiniteError, train_loop
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.step import TrainState

from conftest import tiny_config


def _pairs(B=4, T=12, V=97, seed=0):
    rng = np.random.default_rng(seed)

    def side(left):
        lens = rng.integers(5, T + 1, B)
        idx = np.arange(T)[None]
        mask = (idx >= T - lens[:, None]) if left else (idx < lens[:, None])
        return {"tokens_BxT": jnp.asarray(rng.integers(3, V, (B, T)), jnp.int32),
                "mask_BxT": jnp.asarray(mask, jnp.int32), "prompt_len_B": jnp.asarray(lens // 2, jnp.int32)}
    return {"chosen": side(False), "rejected": side(True)}


@pytest.mark.parametrize("objective,weighting", [("ava_p", "attention"), ("ava_d", "none"), ("bt", "none"),
                                                 ("pt", "attention")])
def test_padding_tokens_change_no_loss_and_no_gradient(objective, weighting):
    model = TQR(tiny_config("llama"), HeadConfig(reward_weighting=weighting), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = make_loss_fn(LossConfig(objective=objective))

    def f(p, batch):
        return loss_fn(nnx.merge(graphdef, p), batch, None)[0]

    batch = _pairs()
    other = jax.tree.map(lambda x: x, batch)
    for side in ("chosen", "rejected"):
        s = batch[side]
        other[side] = dict(s, tokens_BxT=jnp.where(s["mask_BxT"] == 1, s["tokens_BxT"], (s["tokens_BxT"] * 7 + 1) % 97))
    assert not np.array_equal(np.asarray(other["chosen"]["tokens_BxT"]), np.asarray(batch["chosen"]["tokens_BxT"]))
    (l1, g1), (l2, g2) = jax.value_and_grad(f)(params, batch), jax.value_and_grad(f)(params, other)
    assert np.isfinite(float(l1)) and float(l1) == pytest.approx(float(l2), rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And a real token does change the loss (the check above is not vacuous).
    real = jax.tree.map(lambda x: x, batch)
    real["chosen"] = dict(batch["chosen"], tokens_BxT=batch["chosen"]["tokens_BxT"].at[0, 3].add(1))
    assert float(f(params, real)) != float(l1)


def test_swapping_chosen_and_rejected_flips_the_margin():
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(1))
    loss_fn = make_loss_fn(LossConfig(objective="ava_p"))
    batch = _pairs(seed=3)
    _, m1 = loss_fn(model, batch, None)
    _, m2 = loss_fn(model, {"chosen": batch["rejected"], "rejected": batch["chosen"]}, None)
    assert float(m1["margin"][0]) == pytest.approx(-float(m2["margin"][0]), rel=1e-5)
    assert abs(float(m1["margin"][0])) > 0


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_any_jsonl_file_trains(tmp_path):
    splits, _ = split_hh()
    # Rows from every bundled split: the file is split again by prompt hash, which would put rows of
    # one bundled split all in the same place.
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for name in ("train", "validation", "test") for r in splits[name][:60]]
    path = tmp_path / "prefs.jsonl"
    _write_jsonl(path, rows)
    c = reward_model_config("bt", "tiny")
    c.data.update(path=str(path), format="jsonl", max_train_pairs=64, max_validation_pairs=32, max_test_pairs=32)
    c.train.progress = False
    result = reward_model.run(c)
    assert sum(m["pairs"] for m in result.metrics.values()) > 0
    # The same file through the TFDS array_record builder (prepared once, read back with grain).
    pytest.importorskip("tensorflow_datasets")
    c.data.update(format="tfds", tfds_dir=str(tmp_path / "tfds"))
    via_tfds = reward_model.run(c)
    assert via_tfds.metrics["test"]["pairs"] == result.metrics["test"]["pairs"]
    assert os.path.isdir(tmp_path / "tfds")
    c.data.update(format="jsonl")
    # A malformed row stops the run with an error naming the file and line (default on_bad_row).
    rows[5] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    _write_jsonl(path, rows)
    c.data.on_bad_row = "error"
    with pytest.raises(DataError, match=r"prefs.jsonl:6"):
        reward_model.run(c)


def test_loop_stops_after_consecutive_nonfinite_steps():
    def step(state, batch, key):  # steps 3, 4, 5, ... are bad, as make_train_step would count them
        bad = int(state.step) >= 2
        new = state.replace(step=state.step + 1, bad_steps=state.bad_steps + 1 if bad else jnp.int32(0))
        one = jnp.float32(1.0)
        return new, {"loss": (one, one), "skipped": (jnp.float32(bad), one),
                     "bad_run": (new.bad_steps.astype(jnp.float32), one)}

    state = TrainState(step=jnp.int32(0), params={}, opt_state={}, bad_steps=jnp.int32(0))
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps .* \[3, 4, 5\]"):
        train_loop(step, state, iter(range(100)), jax.random.key(0),
                   LoopOptions(num_steps=20, log_every=1, max_consecutive_bad_steps=3, progress=False),
                   writer=MetricWriter(None))
