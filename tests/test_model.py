"""Backbone and TQR: shapes, causality, padding, rematerialisation, KV-cache equivalence, batched
generation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.models import HeadConfig, KVCache, TQR, Transformer
from ava_jax.models.linear import weight_einsum
from ava_jax import sampling
from ava_jax.sampling import SamplingConfig, generate

from conftest import tiny_config


def _tokens(B, T, V, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, (B, T)), jnp.int32)


def test_shapes(any_tiny_config):
    cfg = any_tiny_config
    model = TQR(cfg, HeadConfig(q_param="fresh"), rngs=nnx.Rngs(0))
    out = model(_tokens(2, 7, cfg.vocab_size))
    assert out.logits.shape == (2, 7, cfg.vocab_size)
    assert out.q_values.shape == (2, 7, cfg.vocab_size)
    assert out.hidden.shape == (2, 7, cfg.d_model)
    assert out.reward_mean.shape == out.reward_sigma.shape == out.weights.shape == (2, 7)
    assert bool(jnp.all(out.reward_sigma > 0))
    assert np.allclose(out.weights.mean(axis=1), 1.0, atol=1e-6)  # weight_norm="mean"
    literal = TQR(cfg, HeadConfig(q_param="fresh", weight_norm="sum"), rngs=nnx.Rngs(0))
    assert np.allclose(literal(_tokens(2, 7, cfg.vocab_size)).weights.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("q_param", ["lm_logprobs", "lm_probs", "fresh"])
def test_causality(any_tiny_config, q_param):
    """Q and reward outputs at position t have zero gradient w.r.t. inputs after t (weighting off)."""
    cfg = any_tiny_config
    model = TQR(cfg, HeadConfig(q_param=q_param, reward_weighting="none"), rngs=nnx.Rngs(1))
    T = 6
    embeds = model.backbone.embed_tokens(_tokens(1, T, cfg.vocab_size))

    def per_position(e):
        out = model(embeds_BxTxD=e)
        return out.q_values[0].sum(-1) + out.reward_mean[0] + out.reward_sigma[0]

    jac_TxT = jnp.abs(jax.jacrev(per_position)(embeds)[:, 0]).sum(-1)  # d out_t / d input_s
    future = np.triu(np.ones((T, T), bool), k=1)
    assert float(jac_TxT[future].max()) == 0.0, "an output sees a later input"
    assert float(jac_TxT[~future].min()) > 0.0, "an output ignores an earlier input"


@pytest.mark.parametrize("weight_heads", ["reward", "both"])
def test_q_is_causal_when_weighting_acts_on_the_reward_head_only(weight_heads):
    """With weight_heads="reward", Q at position t has zero gradient w.r.t. tokens after t; with the
    printed "both", the bidirectional w_t leaks the future into Q (so the check can fail)."""
    cfg = tiny_config("llama")
    model = TQR(cfg, HeadConfig(reward_weighting="attention", weight_heads=weight_heads), rngs=nnx.Rngs(1))
    T = 6
    embeds = model.backbone.embed_tokens(_tokens(1, T, cfg.vocab_size))
    jac_TxT = jnp.abs(jax.jacrev(lambda e: model(embeds_BxTxD=e).q_values[0].sum(-1))(embeds)[:, 0]).sum(-1)
    future = np.triu(np.ones((T, T), bool), k=1)
    if weight_heads == "reward":
        assert float(jac_TxT[future].max()) == 0.0, "Q sees a later input"
        assert float(jac_TxT[~future].min()) > 0.0
    else:
        assert float(jac_TxT[future].min()) > 0.0, "the printed weighting should make Q non-causal"
    # The reward head stays weighted in both readings (its mean sees the whole sequence).
    jac_mu = jnp.abs(jax.jacrev(lambda e: model(embeds_BxTxD=e).reward_mean[0])(embeds)[:, 0]).sum(-1)
    assert float(jac_mu[future].min()) > 0.0


@pytest.mark.parametrize("transform", ["softplus", "exp"])
def test_sigma_init_sets_the_starting_sigma(transform):
    from ava_jax.models.heads import RewardHead
    head = RewardHead(HeadConfig(sigma_transform=transform, sigma_init=4.0), 8, nnx.Rngs(0))
    _, sigma = head(jnp.zeros((1, 3, 8)))
    np.testing.assert_allclose(np.asarray(sigma), 4.0, rtol=1e-6)
    default = RewardHead(HeadConfig(sigma_transform=transform), 8, nnx.Rngs(0))(jnp.zeros((1, 3, 8)))[1]
    np.testing.assert_allclose(np.asarray(default), np.log(2.0) + 1e-4 if transform == "softplus" else 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="model.sigma_init"):
        HeadConfig(sigma_init=0.0)


def test_weighting_masks_padding():
    cfg = tiny_config("llama")
    model = TQR(cfg, HeadConfig(reward_weighting="attention", weight_norm="sum"), rngs=nnx.Rngs(2))
    tokens = _tokens(2, 8, cfg.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], bool)  # left and right padding
    out = model(tokens, mask)
    other = model(jnp.where(mask, tokens, (tokens + 5) % cfg.vocab_size), mask)
    assert np.all(np.asarray(out.weights)[~np.asarray(mask)] == 0)
    np.testing.assert_allclose(out.weights.sum(axis=1), 1.0, atol=1e-6)
    for field in ("weights", "reward_mean", "reward_sigma"):
        a, b = np.asarray(getattr(out, field)), np.asarray(getattr(other, field))
        np.testing.assert_allclose(a[np.asarray(mask)], b[np.asarray(mask)], rtol=1e-6, atol=1e-7)
    # The weights are not uniform (the layer really attends), so the check above is not vacuous.
    assert float(jnp.std(out.weights[0, 2:])) > 0


def test_left_padding_matches_unpadded(any_tiny_config):
    cfg = any_tiny_config
    model = Transformer(cfg, nnx.Rngs(3))
    tokens = _tokens(1, 5, cfg.vocab_size)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(model(padded, mask).logits[:, 3:], model(tokens).logits, rtol=1e-5, atol=1e-5)


def _grad_of_hidden_and_logits(cfg, tokens, mask):
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(5)))

    def loss(state):
        out = nnx.merge(graphdef, state)(tokens, mask)
        return jnp.mean(out.logits ** 2) + jnp.mean(out.hidden[..., 0] * out.hidden[..., 1])

    return jax.jit(jax.value_and_grad(loss))(state)


def test_remat_scan_equals_the_layer_loop(any_tiny_config):
    """model.remat runs the blocks as a checkpointed scan over stacked parameters: the same loss
    and parameter gradients as the Python loop over blocks, with left padding, to float32 rounding."""
    cfg = dataclasses.replace(any_tiny_config, n_layers=3, remat=False)
    tokens = _tokens(2, 9, cfg.vocab_size)
    mask = jnp.ones((2, 9), bool).at[1, :4].set(False)
    loss, grads = _grad_of_hidden_and_logits(cfg, tokens, mask)
    loss_r, grads_r = _grad_of_hidden_and_logits(dataclasses.replace(cfg, remat=True), tokens, mask)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
    leaves, leaves_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
    assert len(leaves) == len(leaves_r) == len(jax.tree.leaves(nnx.state(Transformer(cfg, nnx.Rngs(5)))))
    scale = max(float(jnp.abs(g).max()) for g in leaves)  # some leaves' gradients are 0 up to rounding
    for g, g_r in zip(leaves, leaves_r):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("eq, x_shape, w_shape", [
    ("btd,df->btf", (2, 5, 6), (6, 7)),           # MLP up / gate
    ("btd,dnh->btnh", (2, 5, 6), (6, 3, 4)),      # q, k, v
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 6)),   # attention output
])
def test_weight_einsum_values_and_gradients_match_float64_numpy(eq, x_shape, w_shape):
    """models.linear.weight_einsum's custom VJP (x^T g for the weight) against the matrix formulas
    in float64: every projection is [M, K] x [K, P] once its axes are flattened."""
    rng = np.random.default_rng(0)
    X, W = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    M = x_shape[0] * x_shape[1]
    x2, w2 = X.reshape(M, -1), W.reshape(X.reshape(M, -1).shape[1], -1)
    C = rng.standard_normal((M, w2.shape[1]))
    y, vjp = jax.vjp(lambda x, w: weight_einsum(eq, x, w), jnp.asarray(X, jnp.float32), jnp.asarray(W, jnp.float32))
    dx, dw = vjp(jnp.asarray(C.reshape(y.shape), jnp.float32))
    np.testing.assert_allclose(np.asarray(y).reshape(M, -1), x2 @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx).reshape(M, -1), C @ w2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw).reshape(w2.shape), x2.T @ C, rtol=1e-5, atol=1e-5)


def test_weight_einsum_steps_aside_for_an_einsum_interceptor(monkeypatch):
    """While qwix intercepts jnp.einsum (a LoRA-adapted model runs), weight_einsum must call it, or
    the adapters would never see their projection."""
    calls = []
    original = jnp.einsum

    def intercepted(eq, *ops, **kw):
        calls.append(eq)
        return original(eq, *ops, **kw)

    x, w = jnp.ones((1, 2, 3)), jnp.ones((3, 4))
    weight_einsum("btd,df->btf", x, w)
    assert calls == []
    monkeypatch.setattr(jnp, "einsum", intercepted)
    np.testing.assert_allclose(weight_einsum("btd,df->btf", x, w), 3.0)
    assert calls == ["btd,df->btf"]


def test_remat_default_is_on_for_cpu_only():
    cfg = tiny_config("llama")
    assert cfg.remat is None and cfg.remat_enabled() == (jax.default_backend() == "cpu")
    assert not dataclasses.replace(cfg, remat=False).remat_enabled()


def test_remat_keeps_only_each_layers_input():
    """The point of the scan: XLA's compiled temporaries of the backward shrink (an unrolled loop of
    jax.checkpoint'ed blocks keeps every activation on CPU, jax-ml/jax#19822). 8 layers x [4, 256]:
    103 MiB without remat and 21 MiB with it when this test was written."""
    toks = jnp.zeros((4, 256), jnp.int32)
    temps = {}
    for remat in (False, True):
        cfg = tiny_config("llama", n_layers=8, d_model=64, d_ff=256, max_seq_len=256, remat=remat)
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
        step = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(toks, logits=False).hidden.sum()))
        temps[remat] = step.lower(state).compile().memory_analysis().temp_size_in_bytes
    assert temps[True] < 0.4 * temps[False], temps


def test_remat_keeps_the_attention_kernels_inputs_and_output():
    """The checkpointed scan saves the blocked kernel's q, k, v, output and log-sum-exp
    (attention.REMAT_SAVED), so the compiled backward recomputes the MLP's products but neither the
    q/k/v projections nor the kernel's forward (its row maxima are the step's only reduce_max)."""
    toks = jnp.zeros((2, 64), jnp.int32)
    cfg = tiny_config("llama", n_layers=2, max_seq_len=64, remat=True, attention="blocked")
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    step = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(toks, logits=False).hidden.sum()))
    ops = [line for line in step.lower(state).compile().as_text().splitlines() if 'op_name="' in line]
    recomputed = [line for line in ops if "rematted_computation" in line]
    assert [line for line in recomputed if "btd,df->btf" in line], "the MLP is no longer recomputed"
    assert [line for line in ops if "reduce_max" in line] and [line for line in ops if "btd,dnh->btnh" in line]
    assert not [line for line in recomputed if "reduce_max" in line or "btd,dnh->btnh" in line]


def test_remat_keeps_the_compiled_kernels_inputs_and_output(cpu_kernel):
    """The same for the compiled CPU kernel: one forward custom call per layer, none in the backward's
    recomputation, and one backward call per layer."""
    toks = jnp.zeros((2, 64), jnp.int32)
    cfg = tiny_config("llama", n_layers=2, max_seq_len=64, remat=True, attention="cpu_kernel")
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    step = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(toks, logits=False).hidden.sum()))
    hlo = step.lower(state).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom-call(" in line or "custom_call_target" in line]
    forward = [line for line in calls if "attention_forward" in line]
    backward = [line for line in calls if "attention_backward" in line]
    assert len(forward) == 1 and len(backward) == 1, calls  # inside the scans' bodies: once per layer
    assert not [line for line in forward if "rematted_computation" in line]


def test_cache_decode_equals_full_forward(any_tiny_config):
    """Logits at each decode step equal a full forward over the same (unpadded) prefix."""
    cfg = any_tiny_config
    model = Transformer(cfg, nnx.Rngs(4))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    P, steps = 6, 4
    tokens = np.zeros((2, P), np.int32)
    mask = np.zeros((2, P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):], mask[i, P - len(p):] = p, True
    cache = KVCache.init(cfg, 2, P + steps)
    out = model(jnp.asarray(tokens), jnp.asarray(mask), cache=cache)
    seqs = [list(p) for p in prompts]
    logits = out.logits[:, -1]
    for s in range(steps):
        for i in range(2):
            full = model(jnp.asarray([seqs[i]], jnp.int32)).logits[0, -1]
            np.testing.assert_allclose(logits[i], full, rtol=1e-5, atol=1e-5, err_msg=f"row {i} step {s}")
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for i in range(2):
            seqs[i].append(int(nxt[i]))
        out = model(nxt[:, None], jnp.ones((2, 1), bool), cache=out.cache)
        logits = out.logits[:, -1]


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_prefill_into_an_empty_cache_equals_attending_over_its_slots(any_tiny_config, attention):
    """A prompt written into an empty cache attends among its own tokens with the uncached kernels
    (`KVCache.empty`); the same prompt through the slot-masked cached path gives the same logits and
    the same cache, and the next decoded token's logits agree."""
    cfg = dataclasses.replace(any_tiny_config, attention=attention)
    model = Transformer(cfg, nnx.Rngs(7))
    tokens = jnp.asarray([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 0, 15]], jnp.int32)
    mask = tokens != 0  # left-padded
    fresh = KVCache.init(cfg, 3, 9)
    assert fresh.empty
    outs = [jax.jit(lambda c: model(tokens, mask, cache=c))(c) for c in (fresh, dataclasses.replace(fresh, empty=False))]
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(outs[0].logits)[real], np.asarray(outs[1].logits)[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0].cache.k + outs[0].cache.v, outs[1].cache.k + outs[1].cache.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert not outs[0].cache.empty and not outs[1].cache.empty
    for name in ("valid_BxS", "next_pos_B", "index"):
        np.testing.assert_array_equal(getattr(outs[0].cache, name), getattr(outs[1].cache, name))
    nxt = jnp.asarray([[16], [17], [18]], jnp.int32)
    steps = [model(nxt, jnp.ones((3, 1), bool), cache=o.cache).logits for o in outs]
    np.testing.assert_allclose(np.asarray(steps[0]), np.asarray(steps[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 5, 0.9)])
def test_batched_generation_equals_one_by_one(temperature, top_k, top_p):
    cfg = tiny_config("llama", vocab_size=50)
    model = Transformer(cfg, nnx.Rngs(5))
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    scfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=None,
                          prompt_bucket=8, new_bucket=8)
    key = jax.random.key(0)
    batched = generate(model, prompts, key, scfg)
    for i, p in enumerate(prompts):
        single = generate(model, [p], key, scfg)
        if temperature == 0:  # sampling keys differ per batch row, so only greedy must match token for token
            np.testing.assert_array_equal(batched.tokens[i], single.tokens[0])
            np.testing.assert_allclose(batched.logprobs[i], single.logprobs[0], rtol=1e-5, atol=1e-5)
    assert batched.tokens.shape == batched.logprobs.shape == batched.mask.shape == (3, 10)
    assert bool(jnp.all(batched.logprobs <= 0))


def test_argmax_and_categorical_equal_jax_s_including_ties_infinities_and_nan():
    """The sampler's vectorised argmax returns jnp.argmax's index, and its categorical draws what
    jax.random.categorical draws from the same key."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 300)).astype(np.float32)
    x[1, [7, 150]] = 10.0  # a tie: the first one wins
    x[2, :] = -np.inf  # a row without a finite logit: index 0
    x[3, [5, 9]] = np.nan  # NaN counts as the maximum: the first NaN
    x[3, 2] = np.inf
    x[4, ::2] = -np.inf  # banned tokens
    x[5, 299] = np.inf
    x[6] = np.round(x[6])  # many ties
    x_j = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax_last)(x_j)), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax_last)(x_j)), np.asarray(jnp.argmax(x_j, -1)))
    finite = jnp.asarray(np.where(np.isnan(x), 0.0, x)[:, :257])  # an odd vocabulary size too
    for seed in range(5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(jax.jit(sampling.categorical)(key, finite)),
                                      np.asarray(jax.random.categorical(key, finite, axis=-1)))


def test_generation_logprobs_match_forward():
    """The returned per-token log-probs are the model's log-probs of the sampled tokens."""
    cfg = tiny_config("gpt2", vocab_size=50)
    model = Transformer(cfg, nnx.Rngs(6))
    prompt = [3, 4, 5, 6]
    g = generate(model, [prompt], jax.random.key(1), SamplingConfig(max_new_tokens=6, temperature=1.0,
                                                                     prompt_bucket=4, new_bucket=2))
    seq = jnp.asarray([prompt + [int(t) for t in g.tokens[0]]], jnp.int32)
    logp = jax.nn.log_softmax(model(seq).logits[0], axis=-1)
    want = [float(logp[len(prompt) - 1 + i, int(t)]) for i, t in enumerate(g.tokens[0])]
    np.testing.assert_allclose(g.logprobs[0], want, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_eos():
    cfg = tiny_config("llama", vocab_size=20)
    model = Transformer(cfg, nnx.Rngs(7))
    # Greedy decoding: find the first greedy token and declare it EOS, so row 0 stops at once.
    first = generate(model, [[3, 4]], jax.random.key(0), SamplingConfig(max_new_tokens=1, temperature=0.0,
                                                                         prompt_bucket=2, new_bucket=1))
    eos = int(first.tokens[0, 0])
    g = generate(model, [[3, 4]], jax.random.key(0), SamplingConfig(max_new_tokens=5, temperature=0.0, eos_id=eos,
                                                                    pad_id=0, prompt_bucket=2, new_bucket=1))
    assert g.mask[0].tolist() == [True, False, False, False, False]
    assert g.tokens[0].tolist() == [eos, 0, 0, 0, 0]
