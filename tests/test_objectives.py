"""Objectives on the full model: padding tokens change nothing; JSONL data trains; NaN steps stop runs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.data import DataError, split_hh
from ava_jax import objectives
from ava_jax.losses import AvaConfig
from ava_jax.models import HeadConfig, TQR
from ava_jax.pipelines import reward_model
from ava_jax.train.loop import IteratorBatches, LoopOptions, NonFiniteError, train_loop
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
    loss_fn = objectives.get(objective).loss_fn()

    def f(p, batch):
        return loss_fn(nnx.merge(graphdef, p), batch, None, {})[0]

    batch = _pairs()
    other = jax.tree.map(lambda x: x, batch)
    for side in ("chosen", "rejected"):
        s = batch[side]
        other[side] = dict(s, tokens_BxT=jnp.where(s["mask_BxT"] == 1, s["tokens_BxT"], (s["tokens_BxT"] * 7 + 1) % 97))
    assert not np.array_equal(np.asarray(other["chosen"]["tokens_BxT"]), np.asarray(batch["chosen"]["tokens_BxT"]))
    vg = jax.jit(jax.value_and_grad(f))
    (l1, g1), (l2, g2) = vg(params, batch), vg(params, other)
    assert np.isfinite(float(l1)) and float(l1) == pytest.approx(float(l2), rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And a real token does change the loss (the check above is not vacuous).
    real = jax.tree.map(lambda x: x, batch)
    real["chosen"] = dict(batch["chosen"], tokens_BxT=batch["chosen"]["tokens_BxT"].at[0, 3].add(1))
    assert float(jax.jit(f)(params, real)) != float(l1)


def test_swapping_chosen_and_rejected_flips_the_margin():
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(1))
    loss_fn = objectives.get("ava_p").loss_fn()
    batch = _pairs(seed=3)
    _, m1 = loss_fn(model, batch, None, {})
    _, m2 = loss_fn(model, {"chosen": batch["rejected"], "rejected": batch["chosen"]}, None, {})
    assert float(m1["margin"][0]) == pytest.approx(-float(m2["margin"][0]), rel=1e-5)
    assert abs(float(m1["margin"][0])) > 0


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.mark.slow
def test_any_jsonl_file_trains(tmp_path):
    splits, _ = split_hh()
    # Rows from every bundled split: the file is split again by prompt hash, which would put rows of
    # one bundled split all in the same place.
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for name in ("train", "validation", "test") for r in splits[name][:60]]
    path = tmp_path / "prefs.jsonl"
    _write_jsonl(path, rows)
    c = reward_model.default_config("bt", "hh_tiny")
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
        train_loop(step, state, IteratorBatches(iter(range(100))), jax.random.key(0),
                   LoopOptions(num_steps=20, log_every=1, max_consecutive_bad_steps=3, progress=False),
                   writer=MetricWriter(None))


STORY_PAIRS = (  # (chosen, rejected) after the prompt "Once upon a time,"
    ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
     "she saw a big, red ball. She was very happy and she laughed.",
     "Once upon a time, there was a little boy named Tom. He was sad because his dog ran away. He cried and "
     "looked for the dog everywhere, but he could not find it."),
    ("Once upon a time, there was a cat. The cat liked to sleep in the sun. One day the cat saw a bird and "
     "wanted to play with it. The bird flew away.",
     "Once upon a time, there was a big tree. A little bird lived in the tree. The bird sang every day and all "
     "the animals came to listen. They were friends."),
)


def _story_batch(tok):
    prompt_len = len(tok.encode("Once upon a time,", add_bos=True))
    seqs = [[tok.encode(t, add_bos=True) for t in side] for side in zip(*STORY_PAIRS)]
    T = max(len(s) for side in seqs for s in side)

    def side(rows):
        tokens, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
        for i, s in enumerate(rows):
            tokens[i, :len(s)], mask[i, :len(s)] = s, 1
        return {"tokens_BxT": jnp.asarray(tokens), "mask_BxT": jnp.asarray(mask),
                "prompt_len_B": jnp.full((len(rows),), prompt_len, jnp.int32)}
    return {"chosen": side(seqs[0]), "rejected": side(seqs[1])}


def _reward_head_grad_norm(model, cfg, batch, part):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def term(p):
        _, metrics = objectives.get("ava_p").loss_fn(cfg)(nnx.merge(graphdef, p, rest), batch, None, {})
        total, norm = metrics[f"part_{part}"]
        return total / norm
    grads = jax.grad(term)(params)["reward_head"]
    return float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))


@pytest.mark.slow
def test_sequence_normalisation_gives_cer_a_say_on_the_reward_head():
    """On the pretrained backbone and ~60-token stories, CER's gradient on the reward head is >500x
    smaller than TD's per token ("token", logsigmoid CER); "sequence" brings it within 30x, and
    within 3x with a starting sigma near the rms TD error (method.md section 6)."""
    from ava_jax.checkpoints.load import load_pretrained
    from ava_jax.config import resolve_path
    ratios = {}
    for normalize, sigma_init in (("token", None), ("sequence", None), ("sequence", 4.0)):
        model, tok = load_pretrained(resolve_path("bundled:tinystories-260k"), heads=HeadConfig(sigma_init=sigma_init))
        cfg = AvaConfig(cer="logsigmoid", normalize=normalize)
        batch = _story_batch(tok)
        ratios[normalize, sigma_init] = (_reward_head_grad_norm(model, cfg, batch, "td")
                                         / _reward_head_grad_norm(model, cfg, batch, "cer"))
    assert ratios["token", None] > 500, ratios
    assert ratios["sequence", None] < 30, ratios
    assert ratios["sequence", 4.0] < 3, ratios


def test_loss_parts_add_up_and_lm_loglik_is_logged():
    cfg_model = tiny_config("llama")
    model = TQR(cfg_model, HeadConfig(), rngs=nnx.Rngs(0))
    batch = _pairs()
    for normalize in ("token", "sequence"):
        cfg = AvaConfig(normalize=normalize, td_terminal="zero", neg_floor=-3.0)
        loss, m = objectives.get("ava_p").loss_fn(cfg)(model, batch, None, {})
        parts = [k for k in m if k.startswith("part_")]
        assert set(parts) == {"part_lik_chosen", "part_lik_rejected", "part_kl", "part_td", "part_cer"}
        np.testing.assert_allclose(-sum(float(m[k][0]) for k in parts) / float(m["loss"][1]), float(loss), rtol=1e-5)
        np.testing.assert_allclose(sum(float(m[k.replace("part_", "share_")][0]) for k in parts), 1.0, rtol=1e-5)
    # With alpha = beta = 1 and no Q weighting the LM log-likelihood equals the Boltzmann likelihood.
    model = TQR(cfg_model, HeadConfig(reward_weighting="none"), rngs=nnx.Rngs(0))
    _, m = objectives.get("ava_p").loss_fn()(model, batch, None, {})
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(np.asarray(m[f"lm_loglik_{side}"]), np.asarray(m[f"lik_{side}"]), rtol=1e-5)


@pytest.mark.parametrize("objective,heads,beta,tie", [
    ("ava_p", dict(reward_weighting="attention", weight_heads="both"), 1.0, True),
    ("ava_p", dict(reward_weighting="attention", weight_heads="reward", alpha=0.7), 2.5, False),
    ("ava_d", dict(reward_weighting="none"), 0.5, True),
])
def test_vocabulary_chunks_give_the_same_loss_metrics_and_gradients(objective, heads, beta, tie):
    """TQR.q_summary (no [B, T, V] arrays) equals the AVRIL terms read from full Q rows."""
    model = TQR(tiny_config("llama", tie_embeddings=tie), HeadConfig(**heads), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    cfg = AvaConfig(beta=beta, normalize="sequence", cer="logsigmoid")
    batch = _pairs()
    results = []
    for chunks in (True, False):
        loss_fn = objectives.get(objective).loss_fn(cfg, vocab_chunks=chunks)

        def f(p):
            return loss_fn(nnx.merge(graphdef, p), batch, None, {})

        results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: f(p)[0]))(params).jaxpr
        shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
        has_btv = any(len(sh) == 3 and sh[-1] == 97 for sh in shapes)  # vocab 97: a [B, T, V] array
        assert has_btv == (not chunks)
    ((l1, m1), g1), ((l2, m2), g2) = results
    assert np.isfinite(float(l1))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert sorted(m1) == sorted(m2) and "lm_loglik_chosen" in m1
    for k in m1:
        for a, b in zip(m1[k], m2[k]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
