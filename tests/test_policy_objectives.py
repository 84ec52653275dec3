"""SFT and DPO as registered policy objectives on a tiny model: reference handling and invariants."""
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ava_jax import objectives
from ava_jax import sharding as shd
from ava_jax.losses.lm import token_logprobs
from ava_jax.losses.policy import DpoConfig, sft_loss
from ava_jax.models import TQR
from ava_jax.models.positions import token_positions
from ava_jax.train.step import freeze, init_train_state, make_train_step

from conftest import tiny_config
from test_objectives import _pairs


def test_registry_lists_policy_objectives_and_rejects_unknown_names():
    assert objectives.names("policy") == ("ava_d", "ava_p", "dpo", "sft")
    # AVA serves both pipelines (a reward model, or the policy itself); the others one each.
    assert set(objectives.names("policy")) & set(objectives.names("reward_model")) == {"ava_d", "ava_p"}
    with pytest.raises(ValueError, match="known: .*dpo.*sft"):
        objectives.get("dpo2")
    with pytest.raises(ValueError, match="is not a reward_model objective"):
        objectives.get("dpo", "reward_model")
    with pytest.raises(ValueError, match=r"config.loss.lam is not a setting of objective 'dpo'"):
        objectives.get("dpo").config(lam=1.0)


def test_dpo_is_log2_at_the_reference_cached_or_online_and_needs_one():
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(0))
    batch = _pairs()
    dpo = objectives.get("dpo")
    loss_fn = dpo.loss_fn(DpoConfig(beta=0.5))
    # Online: the frozen reference is the policy itself.
    loss, m = loss_fn(model, batch, None, {"reference": model})
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-6)
    # Cached: the reference log-probs in the batch, as the cache would store them.
    (pc, pr), _ = objectives.policy.pair_logprobs(model, batch)
    cached = dict(batch, reference={"chosen_B": pc, "rejected_B": pr})
    loss_c, m_c = loss_fn(model, cached, None, {})
    assert float(loss_c) == pytest.approx(math.log(2.0), abs=1e-6)
    np.testing.assert_allclose(float(m_c["logps/chosen"][0]), float(m["logps/chosen"][0]), rtol=1e-6)
    # Another reference moves the loss off log 2; reference-free needs none.
    other = TQR(tiny_config("llama"), rngs=nnx.Rngs(5))
    assert abs(float(loss_fn(model, batch, None, {"reference": other})[0]) - math.log(2.0)) > 1e-3
    free, _ = dpo.loss_fn(DpoConfig(reference_free=True))(model, batch, None, {})
    assert np.isfinite(float(free))
    with pytest.raises(ValueError, match="reference"):
        loss_fn(model, batch, None, {})


def test_sft_is_the_response_nll_of_the_full_logits():
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(2))
    batch = _pairs(seed=4)
    loss, m = objectives.get("sft").loss_fn()(model, batch, None, {})
    side = batch["chosen"]
    logp = np.asarray(token_logprobs(model(side["tokens_BxT"], side["mask_BxT"]).logits, side["tokens_BxT"]))
    response, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    real = np.asarray(side["mask_BxT"], bool)
    counted = real[:, :-1] & real[:, 1:] & np.asarray(response, bool)[:, 1:]
    assert float(m["loss"][1]) == counted.sum() > 0
    np.testing.assert_allclose(float(loss), -logp[counted].mean(), rtol=1e-5)


def test_sft_gradients_equal_those_of_the_full_logits():
    """SFT's fused NLL (gradient formed in the forward) against autodiff through [B, T, V] logits."""
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(2))
    batch = _pairs(seed=4)
    side = batch["chosen"]
    graphdef, params = nnx.split(model, nnx.Param)
    sft = objectives.get("sft").loss_fn()

    def full(p):
        m = nnx.merge(graphdef, p)
        response, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
        logp = token_logprobs(m(side["tokens_BxT"], side["mask_BxT"]).logits, side["tokens_BxT"])
        return sft_loss(logp, response, side["mask_BxT"])[0]

    (l_ref, g_ref), (l_new, g_new) = (jax.value_and_grad(f)(params) for f in
                                      (full, lambda p: sft(nnx.merge(graphdef, p), batch, None, {})[0]))
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_dpo_train_step_moves_the_policy_and_leaves_the_reference():
    """Through the real train step: the reference is a frozen argument, the margin grows."""
    mesh = shd.make_mesh()
    batch = jax.tree.map(np.asarray, _pairs(B=4, seed=1))
    policy = TQR(tiny_config("llama"), rngs=nnx.Rngs(0))
    frozen = freeze({"reference": TQR(tiny_config("llama"), rngs=nnx.Rngs(0))}, mesh)
    before = jax.tree.map(lambda x: np.array(x, copy=True), frozen.params)
    graphdef, state = init_train_state(policy, optax.adam(3e-3), mesh)
    step = make_train_step(graphdef, objectives.get("dpo").loss_fn(DpoConfig(beta=0.5)), optax.adam(3e-3), mesh,
                           state, batch, frozen=frozen)
    margins = []
    for _ in range(5):
        state, metrics = step(state, batch, jax.random.key(0))
        margins.append(float(metrics["rewards/margin"][0] / metrics["rewards/margin"][1]))
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # the first step sees policy = reference
    assert margins[-1] > margins[0] + 0.05, margins
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
