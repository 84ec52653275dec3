"""The query-blocked causal attention, in XLA's ops and as the compiled CPU kernel, equals a float64
NumPy reference and XLA's dot_product_attention, in value and in gradient (its backward is a
hand-written custom VJP)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax.errors import ConfigError
from ava_jax.models import TQR
from ava_jax.models import attention as attn_lib
from ava_jax.kernels import cpu_attention
from ava_jax.models.attention import blocked_causal_attention, block_size, resolve

from conftest import tiny_config


def _full_mask(valid_BxT):
    T = valid_BxT.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    own = np.eye(T, dtype=bool)
    return causal[None] & (valid_BxT[:, None, :] | own[None])


def _numpy_attention(q, k, v, valid, scale, w=None):
    """float64 reference: repeat K/V heads, mask, softmax. With `w`, also the gradients of
    sum(w * out) with respect to q, k and v, by the textbook softmax backward."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.where(_full_mask(np.asarray(valid))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    if w is None:
        return out
    w = np.asarray(w, np.float64)
    dp = np.einsum("btnh,bsnh->bnts", w, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = np.einsum("bnts,bsnh->btnh", ds, k)
    dk = np.einsum("bnts,btnh->bsnh", ds, q)
    dv = np.einsum("bnts,btnh->bsnh", p, w)
    fold = lambda x: x.reshape(*x.shape[:2], -1, G, x.shape[-1]).sum(axis=3)  # the G heads sharing K/V
    return out, (dq, fold(dk), fold(dv))


# The compiled kernel: T not a multiple of its 4-row micro-blocks or 16-key vectors, grouped heads
# (G = 1, 2 and 3), and each head dim it is built for.
_KERNEL_CASES = [(37, 4, 2, 8), (64, 4, 4, 8), (5, 2, 1, 8), (33, 6, 2, 16), (19, 2, 2, 32), (9, 2, 1, 64)]


@pytest.mark.parametrize("T,block", [(37, 8), (64, 32), (20, 64), (33, None)])
def test_blocked_matches_float64_reference(T, block):
    B, N, K, H = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, T - 4:] = False  # right padding
    valid[2, 3:7] = False  # a hole
    out = jax.jit(blocked_causal_attention, static_argnums=(4, 5))(q, k, v, jnp.asarray(valid), H ** -0.5, block)
    ref = _numpy_attention(q, k, v, valid, H ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def _padded_valid(B, T):
    valid = np.ones((B, T), bool)
    valid[0, :min(5, T - 1)] = False  # left padding
    valid[1, max(T - 4, 1):] = False  # right padding
    valid[2, 3:7] = False  # a hole
    return valid


@pytest.mark.parametrize("T,N,K,H", _KERNEL_CASES)
def test_cpu_kernel_matches_float64_reference(T, N, K, H, cpu_kernel):
    """Value and q/k/v gradients of the compiled kernel against the float64 reference."""
    B = 3
    keys = jax.random.split(jax.random.key(3), 4)
    q, w = (jax.random.normal(kk, (B, T, N, H)) for kk in (keys[0], keys[3]))
    k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in (keys[1], keys[2]))
    valid = _padded_valid(B, T)

    def f(q, k, v):
        return blocked_causal_attention(q, k, v, jnp.asarray(valid), H ** -0.5, compiled=True)

    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    ref, ref_grads = _numpy_attention(q, k, v, valid, H ** -0.5, w)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", vjp(w), ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_cpu_kernel_under_vmap_and_in_bfloat16(cpu_kernel):
    """vmap runs the custom calls per element; bf16 inputs are computed in float32 and cast back."""
    B, T, N, K, H = 2, 21, 4, 2, 8
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (3, B, T, N, H))
    k, v = (jax.random.normal(kk, (3, B, T, K, H)) for kk in keys[1:])
    valid = jnp.asarray(_padded_valid(3, T)[:B])
    f = lambda q, k, v, c: blocked_causal_attention(q, k, v, valid, H ** -0.5, compiled=c)
    batched = jax.jit(jax.vmap(lambda q, k, v: f(q, k, v, True)))(q, k, v)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), _numpy_attention(q[i], k[i], v[i], valid, H ** -0.5),
                                   rtol=1e-5, atol=1e-5)
    half_in = [x[0].astype(jnp.bfloat16) for x in (q, k, v)]
    half = jax.jit(f, static_argnums=3)(*half_in, True)
    assert half.dtype == jnp.bfloat16
    ref = _numpy_attention(*(np.asarray(x, np.float32) for x in half_in), valid, H ** -0.5)
    np.testing.assert_allclose(np.asarray(half, np.float32), ref, rtol=2 ** -8, atol=2 ** -8)  # bf16's rounding


@pytest.mark.parametrize("T,block", [(37, 8), (40, 16), (20, 64)])
def test_blocked_gradient_matches_float64_reference(T, block):
    B, N, K, H = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(2), 4)
    q, w = (jax.random.normal(kk, (B, T, N, H)) for kk in (keys[0], keys[3]))
    k, v = (jax.random.normal(kk, (B, T, K, H)) for kk in (keys[1], keys[2]))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, T - 4:] = False  # right padding
    valid[2, 3:7] = False  # a hole

    def loss(q, k, v):
        return jnp.sum(w * blocked_causal_attention(q, k, v, jnp.asarray(valid), H ** -0.5, block))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    _, ref = _numpy_attention(q, k, v, valid, H ** -0.5, w)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_blocked_gradient_matches_xla():
    B, T, N, K, H = 2, 40, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    w = jax.random.normal(keys[3], (B, T, N, H))
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [6]]))
    mask = jnp.asarray(_full_mask(np.asarray(valid)))[:, None]

    def blocked(q, k, v):
        return jnp.sum(w * blocked_causal_attention(q, k, v, valid, H ** -0.5, 16))

    def xla(q, k, v):
        return jnp.sum(w * jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5))

    grads = [jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v) for f in (blocked, xla)]
    for g_b, g_x in zip(*grads):
        np.testing.assert_allclose(np.asarray(g_b), np.asarray(g_x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_backbone_same_with_every_kernel(arch, cpu_kernel):
    """The whole model (logits, reward heads and parameter gradients) does not depend on the kernel."""
    cfgs = [tiny_config(arch, attention=a) for a in ("xla", "blocked", "cpu_kernel")]
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 45)), jnp.int32)
    mask = jnp.asarray(np.arange(45)[None] >= np.array([[0], [9]]))
    outs, grads = [], []
    for cfg in cfgs:
        model = TQR(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            out = nnx.merge(graphdef, p)(tokens, mask)
            return jnp.sum(jnp.where(mask[..., None], out.logits, 0.0) ** 2) + jnp.sum(out.reward_mean * mask)

        outs.append(jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, mask))(params))
        grads.append(jax.jit(jax.grad(loss))(params))
    for i in (1, 2):
        for name in ("logits", "reward_mean", "reward_sigma"):
            a, b = getattr(outs[i], name), getattr(outs[0], name)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
        for g_b, g_x in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(grads[0])):
            np.testing.assert_allclose(np.asarray(g_b), np.asarray(g_x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,index", [(6, 0), (1, 9), (3, 5)])  # a prompt's prefill, one decoded token, a few
def test_cached_attention_matches_float64_reference(T, index):
    """New queries at slots [index, index + T) over a heads-major cache of S slots, left-padded rows."""
    B, N, K, H, S = 3, 6, 2, 8, 12
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(x, (B, K, S, H)) for x in keys[1:])
    valid = np.ones((B, S), bool)
    valid[0, :4] = False  # a short prompt, left-padded
    valid[1, index + T - 1] = False  # a padding query: it still attends to itself
    query_slot = index + np.arange(T)
    mask = (np.arange(S)[None, :] <= query_slot[:, None])[None] & (
        valid[:, None, :] | (np.arange(S)[None, :] == query_slot[:, None])[None])
    got = jax.jit(attn_lib.cached_attention, static_argnums=4)(
        q, k, v, attn_lib.attention_mask(jnp.asarray(valid), jnp.asarray(query_slot), jnp.arange(S)), H ** -0.5)

    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    k64, v64 = (np.repeat(x, N // K, axis=1) for x in (k64, v64))  # query head n reads key/value head n // G
    s = np.einsum("btnh,bnsh->bnts", q64, k64) * H ** -0.5
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnts,bnsh->btnh", p / p.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)

    # In bfloat16 it computes what jax.nn.dot_product_attention (XLA) does with the cache token-major.
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask_j = jnp.asarray(mask)
    got_b = attn_lib.cached_attention(qb, kb, vb, mask_j, H ** -0.5)
    want_b = jax.nn.dot_product_attention(qb, jnp.swapaxes(kb, 1, 2), jnp.swapaxes(vb, 1, 2),
                                          mask=mask_j[:, None], scale=H ** -0.5)
    assert got_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_b, np.float32), np.asarray(want_b, np.float32), rtol=1e-2, atol=1e-2)


def test_resolve_and_block_size():
    cfg = tiny_config()  # head dim 8
    assert resolve(cfg, cached=True) == "xla"  # the KV cache always takes the general path
    assert resolve(tiny_config(attention="blocked"), cached=False) == "blocked"
    on_cpu = "blocked" if cpu_attention.unavailable_reason() else "cpu_kernel"  # no compiler: XLA's ops
    assert resolve(cfg, cached=False) == (on_cpu if jax.default_backend() == "cpu" else
                                          "cudnn" if attn_lib.cudnn_available() else "xla")
    wide = tiny_config(d_model=128, n_heads=2)  # head dim 64: XLA's products beat the kernel there
    assert resolve(wide, cached=False) == ("blocked" if jax.default_backend() == "cpu" else
                                           "cudnn" if attn_lib.cudnn_available() else "xla")
    with pytest.raises(ConfigError, match="model.attention='cpu_kernel'.*head_dim=128"):
        tiny_config(d_model=256, n_heads=2, attention="cpu_kernel")
    with pytest.raises(ValueError, match="attention="):
        tiny_config(attention="flash")
    assert block_size(256) == 32 and block_size(1024) == 64 and block_size(7) == 32


def test_auto_takes_cudnn_on_an_nvidia_gpu_where_it_fits(monkeypatch):
    monkeypatch.setattr(attn_lib.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda: True)
    assert resolve(tiny_config(dtype="bfloat16", d_model=64), cached=False) == "cudnn"
    assert resolve(tiny_config(dtype="bfloat16", d_model=64), cached=True) == "xla"
    assert resolve(tiny_config(dtype="float32", d_model=64), cached=False) == "xla"  # cuDNN has no float32 path
    assert resolve(tiny_config(dtype="bfloat16", d_model=40), cached=False) == "xla"  # head dim 10
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda: False)  # a ROCm GPU
    assert resolve(tiny_config(dtype="bfloat16", d_model=64), cached=False) == "xla"


def test_cudnn_forced_where_it_cannot_run_names_the_config_key(monkeypatch):
    with pytest.raises(ConfigError, match="model.attention='cudnn'.*dtype='float32'"):
        tiny_config(attention="cudnn")
    with pytest.raises(ConfigError, match="head_dim=10"):
        tiny_config(attention="cudnn", dtype="bfloat16", d_model=40)
    cfg = tiny_config(attention="cudnn", dtype="bfloat16", d_model=64)
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda: False)
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs an NVIDIA GPU"):
        resolve(cfg, cached=False)
    assert resolve(cfg, cached=True) == "xla"  # decoding with the KV cache never needed cuDNN
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda: True)
    assert resolve(cfg, cached=False) == "cudnn"


_PADDINGS = {  # rows of key_valid for T = 24: (first real slot, end), plus a hole in one case
    "none": [(0, 24), (0, 24)],
    "right": [(0, 24), (0, 17)],
    "right, one row empty": [(0, 9), (0, 0)],
    "left": [(0, 24), (5, 24)],
    "hole": [(0, 24), (0, 24)],
}


def _valid(case: str, T: int = 24):
    valid = np.zeros((2, T), bool)
    for b, (start, end) in enumerate(_PADDINGS[case]):
        valid[b, start:end] = True
    if case == "hole":
        valid[1, 10:13] = False
    return valid


@pytest.mark.parametrize("case", sorted(_PADDINGS))
def test_cudnn_path_equals_the_reference_and_takes_the_fused_branch_only_when_right_padded(case):
    """The cuDNN path's padding logic, with XLA standing in for cuDNN (same causal flag and lengths).

    Real queries match the float64 reference in value and gradient whichever branch runs. Padding
    queries tell the branches apart: the fused branch lets them attend to the row's real tokens
    only, the masked branch also to themselves; so they show that right-padded batches (and only
    those) take the fused branch.
    """
    B, T, N, K, H = 2, 24, 4, 2, 8
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H)) for kk, n in zip(keys, (N, K, K)))
    valid = _valid(case)
    w = jax.random.normal(keys[3], (B, T, N, H)) * valid[:, :, None, None]  # loss on real queries only

    def f(q, k, v):
        return attn_lib.cudnn_causal_attention(q, k, v, jnp.asarray(valid), H ** -0.5, implementation="xla")

    out, vjp = jax.vjp(f, q, k, v)
    grads = vjp(w)
    out, grads = np.asarray(out), [np.asarray(g) for g in grads]
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    ref, ref_grads = _numpy_attention(q, k, v, valid, H ** -0.5, w)
    real = valid[:, :, None, None]
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)

    # Each padding query under either branch's rule, in float64: fused = causal keys below the row's
    # length (at least 1); masked = causal keys that are real or the query itself.
    lengths = np.maximum(valid.sum(axis=1), 1)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    G = N // K
    differs = False
    for b, t in zip(*np.nonzero(~valid)):
        slots = np.arange(T)
        rules = {"fused": (slots <= t) & (slots < lengths[b]), "masked": (slots <= t) & (valid[b] | (slots == t))}
        want = {}
        for rule, keep in rules.items():
            s_ = np.einsum("nh,snh->ns", qn[b, t], np.repeat(kn[b], G, axis=1)[keep]) * H ** -0.5
            p_ = np.exp(s_ - s_.max(-1, keepdims=True))
            want[rule] = np.einsum("ns,snh->nh", p_ / p_.sum(-1, keepdims=True), np.repeat(vn[b], G, axis=1)[keep])
        branch = "fused" if case in ("none", "right", "right, one row empty") else "masked"
        np.testing.assert_allclose(out[b, t], want[branch], rtol=1e-5, atol=1e-5, err_msg=f"query ({b}, {t})")
        differs |= not np.allclose(want["fused"], want["masked"], atol=1e-3)
    assert differs or case == "none"  # some padding query tells the two branches apart


def test_the_masked_branch_adds_no_score_sized_residual(monkeypatch):
    """Under autodiff lax.cond returns both branches' residuals, so the masked fallback must not add
    [B, N, T, T]-sized ones to a step on the fused branch (cuDNN keeps only o and the log-sum-exp).
    A stand-in for cuDNN that, like it, keeps no score-sized residual, shows the fallback adds none
    (it is checkpointed), where XLA's masked attention on its own keeps some."""
    xla_attention = jax.nn.dot_product_attention

    def cudnn_stand_in(*args, implementation=None, **kw):
        if implementation == "cudnn":
            return jax.checkpoint(functools.partial(xla_attention, implementation="xla", **kw))(*args)
        return xla_attention(*args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in)
    B, T, N, H = 2, 40, 4, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, N, H)) for i in range(3))
    valid = jnp.asarray(np.arange(T)[None] < np.array([[40], [31]]))

    def score_sized_residuals(f):
        _, vjp = jax.vjp(f, q, k, v)
        return sum(x.size >= B * N * T * T for x in jax.tree.leaves(vjp))

    mask = jnp.asarray(_full_mask(np.asarray(valid)))[:, None]
    assert score_sized_residuals(functools.partial(xla_attention, mask=mask)) >= 1
    assert score_sized_residuals(functools.partial(attn_lib.cudnn_causal_attention, key_valid_BxT=valid,
                                                   scale=H ** -0.5)) == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_backbone_cudnn_path_equals_xla(monkeypatch, side):
    """The backbone wired to the cuDNN path (XLA standing in for cuDNN) equals model.attention='xla'
    in bfloat16, at every real position, for right padding (fused branch) and left (masked)."""
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda: True)
    monkeypatch.setattr(attn_lib, "cudnn_causal_attention",
                        functools.partial(attn_lib.cudnn_causal_attention, implementation="xla"))
    T = 20
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, T)), jnp.int32)
    n = np.array([[T], [13]])
    mask = jnp.asarray(np.arange(T)[None] < n if side == "right" else np.arange(T)[None] >= T - n)
    outs = []
    for impl in ("cudnn", "xla"):
        model = TQR(tiny_config(attention=impl, dtype="bfloat16", d_model=64), rngs=nnx.Rngs(0))
        outs.append(np.asarray(jax.jit(lambda m: m(tokens, mask).logits)(model), np.float32))
    real = np.asarray(mask)[..., None]
    np.testing.assert_array_equal(np.where(real, outs[0], 0), np.where(real, outs[1], 0))


def test_cpu_kernel_unavailable_falls_back_or_names_the_config_key(monkeypatch, caplog):
    """Without a compiler "auto" takes XLA's blocked kernel and says why once; "cpu_kernel" is an error."""
    monkeypatch.setattr(cpu_attention, "unavailable_reason", lambda: "no C++ compiler: 'c++' is not on PATH")
    attn_lib._cpu_kernel_builds.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="ava_jax.models.attention"):
            assert resolve(tiny_config(), cached=False) == "blocked"
            assert resolve(tiny_config(), cached=False) == "blocked"
        assert [r.getMessage() for r in caplog.records if "not on PATH" in r.getMessage()] and len(caplog.records) == 1
        with pytest.raises(ConfigError, match="model.attention='cpu_kernel'.*not on PATH.*'blocked'"):
            resolve(tiny_config(attention="cpu_kernel"), cached=False)
    finally:
        attn_lib._cpu_kernel_builds.cache_clear()
