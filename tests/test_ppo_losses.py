"""PPO's pure pieces against float64 NumPy loops: GAE with arbitrary masks, KL estimators, the clipped
losses, reward placement, and the dense/sparse return identity at gamma = lambda = 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ava_jax.losses.ppo import PpoConfig, gae, kl_estimate, masked_whiten, policy_loss, value_loss
from ava_jax.rl.rewards import last_index, place_sparse, response_transitions


def gae_numpy(r, v, m, gamma, lam):
    """The textbook loop over each row's real tokens only (masked positions skipped)."""
    r, v, m = (np.asarray(x, np.float64) for x in (r, v, m))
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        next_v = next_a = 0.0
        for t in idx[::-1]:
            delta = r[b, t] + gamma * next_v - v[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = v[b, t]
            adv[b, t] = next_a
    return adv, np.where(m > 0, adv + v, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_loop_with_arbitrary_masks(gamma, lam):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 9)).astype(np.float32)
    v = rng.normal(size=(5, 9)).astype(np.float32)
    m = rng.random((5, 9)) < 0.7  # holes anywhere, not only right padding
    m[0] = False  # a row with no real token
    m[1] = True
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
    adv_np, ret_np = gae_numpy(r, v, m, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), adv_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ret_np, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~m] == 0)


def test_dense_and_sparse_give_the_same_first_return_at_gamma_lambda_one():
    """With gamma = lambda = 1 the return at the first response token is the sum of the rewards, so a
    dense reward summing to the sparse score gives the same return (policy.md)."""
    rng = np.random.default_rng(1)
    mask = np.zeros((4, 7), bool)
    for b, n in enumerate((7, 3, 5, 1)):
        mask[b, :n] = True
    dense = np.where(mask, rng.normal(size=(4, 7)), 0.0).astype(np.float32)
    sparse = place_sparse(dense.sum(1), jnp.asarray(mask))
    values = jnp.asarray(rng.normal(size=(4, 7)).astype(np.float32)) * mask
    _, ret_dense = gae(jnp.asarray(dense), values, jnp.asarray(mask), 1.0, 1.0)
    _, ret_sparse = gae(sparse, values, jnp.asarray(mask), 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(ret_dense)[:, 0], np.asarray(ret_sparse)[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret_dense)[:, 0], dense.sum(1), rtol=1e-5, atol=1e-5)
    # With lambda < 1 they differ (that is the experiment).
    _, rd = gae(jnp.asarray(dense), values, jnp.asarray(mask), 1.0, 0.5)
    _, rs = gae(sparse, values, jnp.asarray(mask), 1.0, 0.5)
    assert not np.allclose(np.asarray(rd)[0, 0], np.asarray(rs)[0, 0])


@pytest.mark.parametrize("layout", ["right_padding", "pad_is_eos", "no_eos", "eos_in_last_slot"])
def test_sparse_score_lands_on_the_last_real_response_token(layout):
    """Placement reads the mask only: pad == EOS ids, a response without EOS and an EOS in the last
    slot all put the score on the last real token; the tensor is float32 even for integer scores."""
    eos = 2
    tokens = np.array([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9], [5, 6, 7, 8, eos]], np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    if layout == "right_padding":
        tokens[0, 3:] = 0
    rows = {"right_padding": 0, "pad_is_eos": 0, "no_eos": 1, "eos_in_last_slot": 2}[layout]
    scores = np.array([3, 4, 5], np.int32)  # integers: must not truncate anything downstream
    placed = place_sparse(scores, jnp.asarray(mask))
    assert placed.dtype == jnp.float32
    expect_last = {0: 2, 1: 4, 2: 4}[rows]
    assert int(last_index(jnp.asarray(mask))[rows]) == expect_last
    row = np.asarray(placed)[rows]
    assert row[expect_last] == scores[rows] and np.count_nonzero(row) == 1
    placed_f = place_sparse(jnp.asarray([0.25, -1.5, 0.75]), jnp.asarray(mask))
    assert float(placed_f[rows, expect_last]) == [0.25, -1.5, 0.75][rows]


def test_left_padded_prompt_response_alignment():
    """Outputs that encode their position: with a prompt of width P, response token j's log-prob and
    value come from position P + j - 1, and its reward from reader transition P + j - 1 (whose
    action is the token at position P + j)."""
    from ava_jax.rl.ppo import response_slice
    P, N = 4, 3
    pos = jnp.arange(P + N)[None, :].repeat(2, 0)
    np.testing.assert_array_equal(np.asarray(response_slice(pos, N))[0], [P - 1, P, P + 1])
    transition_action = jnp.arange(1, P + N)[None, :].repeat(2, 0)  # transition t's action is token t + 1
    np.testing.assert_array_equal(np.asarray(response_transitions(transition_action, P, N))[0], [P, P + 1, P + 2])


def test_kl_estimators_against_numpy():
    rng = np.random.default_rng(2)
    lp, ref = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    np.testing.assert_allclose(np.asarray(kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k1")), lp - ref, rtol=1e-6)
    r = ref - lp
    np.testing.assert_allclose(np.asarray(kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k3")),
                               np.clip(np.exp(r) - 1 - r, -10, 10), rtol=1e-5)
    big = kl_estimate(jnp.asarray([[30.0]]), jnp.asarray([[0.0]]), "k1", clamp=10.0)
    assert float(big[0, 0]) == 10.0
    assert float(kl_estimate(jnp.asarray([[-1.3]]), jnp.asarray([[-1.3]]), "k3")[0, 0]) == 0.0


def test_clipped_losses_against_numpy():
    rng = np.random.default_rng(3)
    lp, old = rng.normal(size=(3, 5)) * 0.3, rng.normal(size=(3, 5)) * 0.3
    adv = rng.normal(size=(3, 5))
    m = rng.random((3, 5)) < 0.8
    loss, akl, clipped = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (lp, old, adv)), jnp.asarray(m), 0.2)
    ratio = np.exp(lp - old)
    expect = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(np.asarray(loss), np.where(m, expect, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(akl), np.where(m, 0.5 * (lp - old) ** 2, 0), rtol=1e-5, atol=1e-6)
    assert set(np.unique(np.asarray(clipped))) <= {0.0, 1.0}
    v, v_old, ret = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    vl, _ = value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, v_old, ret)), jnp.asarray(m), 0.2)
    vc = v_old + np.clip(v - v_old, -0.2, 0.2)
    np.testing.assert_allclose(np.asarray(vl), np.where(m, 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2), 0),
                               rtol=1e-5, atol=1e-6)


def test_first_minibatch_ratio_one_and_zero_advantage_zero_gradient():
    """policy = old: ratio 1, approx KL 0, no clipping; zero advantages give a zero policy gradient."""
    lp = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6)), jnp.float32)
    m = jnp.ones((2, 6), bool)
    loss, akl, clipped = policy_loss(lp, lp, jnp.ones_like(lp), m, 0.2)
    np.testing.assert_allclose(np.asarray(loss), -1.0)
    assert float(akl.sum()) == 0.0 and float(clipped.sum()) == 0.0
    g = jax.grad(lambda x: policy_loss(x, lp, jnp.zeros_like(lp), m, 0.2)[0].sum())(lp + 0.1)
    assert float(jnp.abs(g).max()) == 0.0


def test_masked_whiten():
    x = jnp.asarray([[1.0, 2.0, 3.0, 100.0]])
    m = jnp.asarray([[True, True, True, False]])
    w = np.asarray(masked_whiten(x, m))[0]
    np.testing.assert_allclose(w[:3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-5)
    assert w[3] == 0


def test_ppo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kl_estimator"):
        PpoConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="ppo.lam"):
        PpoConfig(lam=1.5)


def test_ppo_loss_gradient_is_finite_with_banned_ids():
    """Banned ids (log-prob -inf) must not send NaN into the gradient through the entropy."""
    from flax import nnx
    from ava_jax.losses.ppo import PpoConfig
    from ava_jax.models.actor_critic import ActorCritic
    from ava_jax.models.transformer import Transformer
    from ava_jax.rl.ppo import make_ppo_loss
    from conftest import tiny_config
    model = ActorCritic(Transformer(tiny_config("llama"), nnx.Rngs(0)))
    b, p, n = 2, 3, 4
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 90, (b, p + n)), jnp.int32)
    batch = {"tokens_BxT": tokens, "mask_BxT": jnp.ones((b, p + n), bool), "response_mask_BxN": jnp.ones((b, n), bool),
             "old_logp_BxN": jnp.full((b, n), -4.0), "old_values_BxN": jnp.zeros((b, n)),
             "advantages_BxN": jnp.ones((b, n)), "returns_BxN": jnp.ones((b, n))}
    loss_fn = make_ppo_loss(PpoConfig(entropy_coef=0.01), temperature=0.7, banned_ids=(1, 2))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda q: loss_fn(nnx.merge(graphdef, q), batch, None, {})[0])(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
