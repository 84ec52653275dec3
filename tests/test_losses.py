"""Objectives against an independent float64 NumPy reference written with plain loops."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from ava_jax.losses import (AvrilInputs, AvaConfig, ava_d_loss, ava_p_loss, bradley_terry_loss,
                            gather_last, preference_transformer_loss)

RTOL = ATOL = 1e-5  # float32 JAX against float64 NumPy


def np_rows(q, mu, sigma, tokens, resp, mask, cfg):
    """Per row, the counted transitions as dicts (t, lik, kl, td or None, mu)."""
    B, T, _ = q.shape
    rows = []
    for b in range(B):
        counted = [t for t in range(T - 1)
                   if mask[b, t] and mask[b, t + 1] and (cfg.include_prompt or resp[b, t + 1])]
        row = []
        for t in counted:
            a = int(tokens[b, t + 1])
            z = [cfg.beta * float(v) for v in q[b, t]]
            zmax = max(z)
            lse = zmax + math.log(sum(math.exp(v - zmax) for v in z))
            lik = z[a] - lse if cfg.likelihood == "boltzmann" else z[a]
            p = t + 1 if cfg.reward_align == "next" else t
            m, s = float(mu[b, p]), float(sigma[b, p])
            kl = 0.5 * (m * m + s * s - 1.0) - math.log(s)
            td = None
            delta = None
            if t + 1 in counted:
                delta = q[b, t, a] - cfg.gamma * q[b, t + 1, int(tokens[b, t + 2])]
            elif cfg.td_terminal == "zero" and t == counted[-1]:  # V = 0 after the final token
                delta = q[b, t, a]
            if delta is not None:
                td = -0.5 * math.log(2 * math.pi * s * s) - (delta - m) ** 2 / (2 * s * s)
            row.append(dict(t=t, lik=lik, kl=kl, td=td, mu=m))
        rows.append(row)
    return rows


def np_mean(values, sequence):
    """A row's term: its sum ("token"), or its mean over the row ("sequence"; 0 for an empty row)."""
    values = list(values)
    return sum(values) / max(len(values), 1) if sequence else sum(values)


def np_irl(row, cfg):
    seq = cfg.normalize == "sequence"
    return (-np_mean((x["kl"] for x in row), seq)
            + cfg.lam * np_mean((x["td"] for x in row if x["td"] is not None), seq))


def np_ava_d(batch, cfg):
    """(-F_d summed, normaliser): transitions ("token") or non-empty sequences ("sequence")."""
    rows = np_rows(*batch, cfg)
    seq = cfg.normalize == "sequence"
    f = sum(np_mean((x["lik"] for x in row), seq) + (np_irl(row, cfg) if cfg.use_irl else 0.0) for row in rows)
    return -f, (sum(bool(row) for row in rows) if seq else sum(len(row) for row in rows))


def check_kl_td(metrics, rows):
    xs = [x for row in rows for x in row]
    close(metrics["kl"][0], sum(x["kl"] for x in xs))
    close(metrics["td"][0], sum(x["td"] or 0.0 for x in xs))
    assert float(metrics["td"][1]) == sum(x["td"] is not None for x in xs) > 0


def np_ava_p(chosen, rejected, cfg):
    rows_c, rows_r = np_rows(*chosen, cfg), np_rows(*rejected, cfg)
    seq = cfg.normalize == "sequence"
    f, n = 0.0, 0
    out = dict(lik_c=0.0, lik_r=0.0, cer=0.0, acc=0.0, margin=0.0, pairs=0)
    for rc, rr in zip(rows_c, rows_r):
        out["lik_c"] += sum(x["lik"] for x in rc)
        out["lik_r"] += sum(x["lik"] for x in rr)
        if seq and not (rc and rr):  # "sequence": a pair with an empty side contributes nothing
            continue
        n += 1 if seq else len(rc) + len(rr)
        f += np_mean((x["lik"] for x in rc), seq)
        if cfg.use_neg:
            floor = -math.inf if cfg.neg_floor is None else cfg.neg_floor
            f -= np_mean((max(x["lik"], floor) for x in rr), seq)
        if cfg.use_irl:
            f += np_irl(rc, cfg) + np_irl(rr, cfg)
        if rc and rr:
            if cfg.cer_score == "sum":
                d = sum(x["mu"] for x in rc) - sum(x["mu"] for x in rr)
            else:
                d = rc[-1]["mu"] - rr[-1]["mu"]
            cer = 1 / (1 + math.exp(-d)) if cfg.cer == "sigmoid" else -math.log1p(math.exp(-d))
            f += cfg.cer_weight * cer if cfg.use_cer else 0.0
            out["cer"] += cer
            out["acc"] += float(d > 0)
            out["margin"] += d
            out["pairs"] += 1
    return -f, n, out


def make_batch(seed, B=5, T=9, V=7, garbage="nan", empty_rows=()):
    """Random left/right padded rows; masked positions hold `garbage`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, V)) * 2.0
    mu, sigma = rng.normal(size=(B, T)), rng.uniform(0.3, 2.0, size=(B, T))
    tokens = rng.integers(0, V, size=(B, T))
    mask, resp = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        length = int(rng.integers(2, T + 1))
        prompt = length if b in empty_rows else int(rng.integers(1, length))
        start = 0 if rng.random() < 0.5 else T - length  # right or left padding
        mask[b, start:start + length] = 1
        resp[b, start + prompt:start + length] = 1
    pad, n = mask == 0, int((mask == 0).sum())
    if garbage == "nan":
        q[pad], mu[pad], sigma[pad], tokens[pad] = np.nan, np.inf, np.nan, -1
    else:  # finite but wild: huge Q, negative sigma, out-of-range token ids
        q[pad], mu[pad], sigma[pad] = rng.normal(size=q[pad].shape) * 50, rng.normal(size=n), -1.0
        tokens[pad] = q.shape[2] + 3
    return [q, mu, sigma, tokens, resp, mask]


def to_inputs(batch, dtype=jnp.float32):
    q, mu, sigma, tokens, resp, mask = batch
    return AvrilInputs(jnp.asarray(q, dtype), jnp.asarray(mu, dtype), jnp.asarray(sigma, dtype),
                       jnp.asarray(tokens), jnp.asarray(resp), jnp.asarray(mask))


BASE = AvaConfig(gamma=0.9, lam=0.7, beta=1.3, cer_weight=0.8)
D_VARIANTS = [{}, dict(likelihood="raw_q"), dict(reward_align="state"), dict(include_prompt=True),
              dict(use_irl=False), dict(gamma=1.0, lam=1.0, beta=1.0), dict(normalize="sequence"),
              dict(td_terminal="zero"), dict(normalize="sequence", td_terminal="zero", include_prompt=True)]
P_VARIANTS = D_VARIANTS + [dict(cer="logsigmoid"), dict(use_neg=False), dict(use_cer=False),
                           dict(neg_floor=-2.0),
                           dict(likelihood="raw_q", reward_align="state", include_prompt=True,
                                cer="logsigmoid", neg_floor=-1.0),
                           dict(normalize="sequence", cer="logsigmoid", neg_floor=-2.0, td_terminal="zero"),
                           dict(cer_score="sum"), dict(cer_score="sum", normalize="sequence", cer="logsigmoid")]


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", D_VARIANTS, ids=str)
def test_ava_d_matches_numpy(variant):
    cfg = dataclasses.replace(BASE, **variant)
    batch = make_batch(0)
    loss, metrics = ava_d_loss(to_inputs(batch), cfg)
    ref_sum, ref_n = np_ava_d(batch, cfg)
    if variant:  # the switch must matter on this batch, or the comparison proves nothing
        assert abs(ref_sum - np_ava_d(batch, BASE)[0]) > 1e-3
    close(loss, ref_sum / ref_n)
    close(metrics["loss"][0], ref_sum)
    assert float(metrics["loss"][1]) == ref_n
    close(metrics["loss"][0] / metrics["loss"][1], float(loss))
    check_kl_td(metrics, np_rows(*batch, cfg))


@pytest.mark.parametrize("variant", P_VARIANTS, ids=str)
def test_ava_p_matches_numpy(variant):
    cfg = dataclasses.replace(BASE, **variant)
    chosen, rejected = make_batch(1, empty_rows=(2,)), make_batch(2, T=8)
    loss, metrics = ava_p_loss(to_inputs(chosen), to_inputs(rejected), cfg)
    ref_sum, ref_n, ref = np_ava_p(chosen, rejected, cfg)
    if variant:
        assert abs(ref_sum - np_ava_p(chosen, rejected, BASE)[0]) > 1e-3
    if cfg.neg_floor is not None:  # the floor must be active on some tokens and not on others
        liks = [x["lik"] for row in np_rows(*rejected, cfg) for x in row]
        assert min(liks) < cfg.neg_floor < max(liks)
    close(loss, ref_sum / ref_n)
    close(metrics["loss"][0], ref_sum)
    assert float(metrics["loss"][1]) == ref_n
    for name, key in (("lik_chosen", "lik_c"), ("lik_rejected", "lik_r"), ("cer", "cer"),
                      ("accuracy", "acc"), ("margin", "margin")):
        close(metrics[name][0], ref[key])
    check_kl_td(metrics, np_rows(*chosen, cfg) + np_rows(*rejected, cfg))
    # Row 2 of chosen has no response: that pair drops out unless prompt tokens count.
    assert float(metrics["accuracy"][1]) == ref["pairs"] == (5 if cfg.include_prompt else 4)


def test_neg_floor_gradient_stops_below_floor():
    cfg = dataclasses.replace(BASE, neg_floor=-2.0, use_irl=False, use_cer=False)
    chosen, rejected = make_batch(1), make_batch(2)
    grad_q = jax.grad(lambda q: ava_p_loss(to_inputs(chosen), to_inputs(rejected)._replace(
        q_BxTxV=q), cfg)[0])(jnp.asarray(rejected[0], jnp.float32))
    below = [(b, x["t"], x["lik"] < cfg.neg_floor)
             for b, row in enumerate(np_rows(*rejected, cfg)) for x in row]
    for b, t, is_below in below:  # a floored token's Q row gets exactly zero gradient
        assert (np.abs(np.asarray(grad_q[b, t])).max() == 0) == is_below
    assert 0 < sum(x[2] for x in below) < len(below)


def test_avril_special_case_tabular_mdp():
    """Original AVRIL (gamma = lambda = beta = 1, prior N(0,1)) on a 3-state x 2-action MDP."""
    nxt = [[1, 2], [2, 0], [0, 1]]  # deterministic s' = nxt[s][a]
    Q = [[0.5, -0.2], [0.1, 0.3], [-0.4, 0.8]]
    MU = [[0.2, -0.5], [1.0, 0.0], [-0.3, 0.4]]
    SD = [[0.9, 1.2], [0.5, 1.5], [1.1, 0.7]]

    def lsm(s, a):  # log softmax_a Q(s, a) over the 2 actions
        return Q[s][a] - math.log(math.exp(Q[s][0]) + math.exp(Q[s][1]))

    def kl(s, a):  # KL(N(MU, SD^2) || N(0, 1))
        return 0.5 * (MU[s][a] ** 2 + SD[s][a] ** 2 - 1.0) - math.log(SD[s][a])

    def log_n(x, m, sd):
        return -0.5 * math.log(2 * math.pi) - math.log(sd) - 0.5 * ((x - m) / sd) ** 2

    # Trajectory A: s0 -a1-> s2 -a0-> s0 -a0-> s1.  Trajectory B: s0 -a0-> s1 -a1-> s0.
    # TD uses (s, a) and the next pair (s', a'); a trajectory's last transition has no a'.
    f_a = (lsm(0, 1) - kl(0, 1) + log_n(Q[0][1] - 1.0 * Q[2][0], MU[0][1], SD[0][1])
           + lsm(2, 0) - kl(2, 0) + log_n(Q[2][0] - 1.0 * Q[0][0], MU[2][0], SD[2][0])
           + lsm(0, 0) - kl(0, 0))
    f_b = (lsm(0, 0) - kl(0, 0) + log_n(Q[0][0] - 1.0 * Q[1][1], MU[0][0], SD[0][0])
           + lsm(1, 1) - kl(1, 1))
    expected = -(f_a + f_b) / 5.0

    # Token form: y_0 = BOS (id 0, the prompt), then the actions. A right-, B left-padded.
    trajs, starts = [[1, 0, 0], [0, 1]], [0, 2]
    for align in ("next", "state"):
        T = 5
        q, mu, sigma = np.full((2, T, 2), np.nan), np.full((2, T), np.nan), np.full((2, T), np.nan)
        tokens, resp, mask = np.full((2, T), -1), np.zeros((2, T)), np.zeros((2, T))
        for b, (acts, st) in enumerate(zip(trajs, starts)):
            s = 0
            tokens[b, st], mask[b, st] = 0, 1
            for i, a in enumerate(acts):
                t = st + i  # transition t: state s at position t, action at position t+1
                q[b, t] = Q[s]
                p = t + 1 if align == "next" else t
                mu[b, p], sigma[b, p] = MU[s][a], SD[s][a]
                tokens[b, t + 1], resp[b, t + 1], mask[b, t + 1] = a, 1, 1
                s = nxt[s][a]
            q[b, st + len(acts)] = Q[s]
        cfg = AvaConfig(gamma=1.0, lam=1.0, beta=1.0, reward_align=align)
        with jax.enable_x64(True):
            loss, metrics = ava_d_loss(to_inputs([q, mu, sigma, tokens, resp, mask],
                                                 jnp.float64), cfg)
            assert loss.dtype == jnp.float64
            np.testing.assert_allclose(float(loss), expected, rtol=1e-12, atol=0)
        assert float(metrics["loss"][1]) == 5.0


def numeric_grad(fn, arrays, eps=1e-6):
    grads = []
    for i, x in enumerate(arrays):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = [a.copy() for a in arrays], [a.copy() for a in arrays]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (fn(*plus) - fn(*minus)) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("variant", [{}, dict(neg_floor=-1.0),
                                     dict(likelihood="raw_q", reward_align="state",
                                          include_prompt=True, cer="logsigmoid"),
                                     dict(normalize="sequence", td_terminal="zero")], ids=str)
def test_gradients_match_numpy_finite_differences(variant):
    cfg = dataclasses.replace(BASE, **variant)
    chosen, rejected = make_batch(3, B=2, T=5, V=3), make_batch(4, B=2, T=5, V=3)
    if cfg.neg_floor is not None:  # keep the kink of max(lik, floor) away from the differences
        liks = [x["lik"] for row in np_rows(*rejected, cfg) for x in row]
        assert min(abs(v - cfg.neg_floor) for v in liks) > 1e-3

    ref_p = lambda *a: np.divide(*np_ava_p(list(a[:3]) + chosen[3:], list(a[3:]) + rejected[3:],
                                           cfg)[:2])
    ref_d = lambda *a: np.divide(*np_ava_d(list(a) + chosen[3:], cfg))

    with jax.enable_x64(True):
        c64, r64 = to_inputs(chosen, jnp.float64), to_inputs(rejected, jnp.float64)
        g_p = jax.grad(lambda *a: ava_p_loss(AvrilInputs(*a[:3], *c64[3:]),
                                             AvrilInputs(*a[3:], *r64[3:]), cfg)[0],
                       argnums=tuple(range(6)))(*c64[:3], *r64[:3])
        g_d = jax.grad(lambda *a: ava_d_loss(AvrilInputs(*a, *c64[3:]), cfg)[0],
                       argnums=(0, 1, 2))(*c64[:3])
    want = numeric_grad(ref_p, chosen[:3] + rejected[:3]) + numeric_grad(ref_d, chosen[:3])
    for got, w in zip(list(g_p) + list(g_d), want):
        np.testing.assert_allclose(np.asarray(got), w, atol=1e-6)


def test_baseline_gradients_check_grads():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        rc, rr = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3))
        jax.test_util.check_grads(lambda a, b: bradley_terry_loss(a, b)[0], (rc, rr), order=2)
        args = [jnp.asarray(rng.normal(size=(3, 4))) for _ in range(4)]
        masks = [jnp.asarray(rng.random((3, 4)) < 0.7) for _ in range(2)]
        label = jnp.asarray([1.0, 0.3, 0.5])
        jax.test_util.check_grads(
            lambda *a: preference_transformer_loss(*a, *masks, label_B=label)[0], args, order=2)


def test_padding_changes_neither_value_nor_gradient():
    cfg = dataclasses.replace(BASE, neg_floor=-2.0)
    batches = {g: (make_batch(6, garbage=g), make_batch(7, garbage=g)) for g in ("nan", "finite")}

    def value_and_grads(chosen, rejected):
        c, r = to_inputs(chosen), to_inputs(rejected)
        fn_p = lambda c3, r3: ava_p_loss(AvrilInputs(*c3, *c[3:]), AvrilInputs(*r3, *r[3:]), cfg)[0]
        fn_d = lambda c3: ava_d_loss(AvrilInputs(*c3, *c[3:]), cfg)[0]
        vp, gp = jax.value_and_grad(fn_p, argnums=(0, 1))(tuple(c[:3]), tuple(r[:3]))
        vd, gd = jax.value_and_grad(fn_d)(tuple(c[:3]))
        return [vp, vd], jax.tree.leaves((gp, gd))

    (v1, g1), (v2, g2) = (value_and_grads(*batches[g]) for g in ("nan", "finite"))
    assert np.isfinite(np.asarray(v1)).all()
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    for a, b in zip(g1, g2):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Control: the same change at a real, counted position does move the loss.
    chosen, rejected = [x.copy() for x in batches["finite"][0]], batches["finite"][1]
    b, t = np.argwhere(chosen[4][:, 1:] * chosen[5][:, :-1])[0]
    chosen[0][b, t] += 1.0
    assert float(value_and_grads(chosen, rejected)[0][0]) != float(v2[0])


def test_baselines_ignore_padded_positions_and_pairs():
    rng = np.random.default_rng(8)
    r, w = rng.normal(size=(2, 4, 6)), rng.uniform(size=(2, 4, 6))
    masks = rng.random((2, 4, 6)) < 0.6
    pair = np.array([1, 1, 0, 1])
    keep = masks & (pair[None, :, None] == 1)  # the filler pair 2 may hold anything too
    bad_r, bad_w = np.where(keep, r, np.nan), np.where(keep, w, np.inf)

    def pt(rs, ws):
        fn = lambda *a: preference_transformer_loss(*a, *masks, label_B=0.8, pair_mask_B=pair)[0]
        return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(rs[0], ws[0], rs[1], ws[1])

    (v1, g1), (v2, g2) = pt(jnp.asarray(r), jnp.asarray(w)), pt(jnp.asarray(bad_r),
                                                                jnp.asarray(bad_w))
    assert float(v1) == float(v2) and np.isfinite(float(v1))
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bt = lambda a, b: bradley_terry_loss(a, b, pair_mask_B=pair)
    rc, rr = rng.normal(size=4), rng.normal(size=4)
    rc_bad, rr_bad = np.where(pair, rc, np.nan), np.where(pair, rr, -np.inf)
    g_ok = jax.grad(lambda a: bt(a, jnp.asarray(rr))[0])(jnp.asarray(rc))
    g_bad = jax.grad(lambda a: bt(a, jnp.asarray(rr_bad))[0])(jnp.asarray(rc_bad))
    np.testing.assert_array_equal(np.asarray(g_ok), np.asarray(g_bad))
    assert float(bt(rc, rr)[1]["loss"][1]) == 3.0


def test_swapping_chosen_and_rejected_flips_margin():
    chosen, rejected = to_inputs(make_batch(9)), to_inputs(make_batch(10))
    _, m = ava_p_loss(chosen, rejected, BASE)
    _, m_swap = ava_p_loss(rejected, chosen, BASE)
    assert abs(float(m["margin"][0])) > 1e-3
    close(m_swap["margin"][0], -float(m["margin"][0]))
    assert float(m_swap["accuracy"][0]) == float(m["accuracy"][1]) - float(m["accuracy"][0])


def test_bradley_terry_matches_numpy_and_is_shift_invariant():
    rng = np.random.default_rng(11)
    rc, rr = rng.normal(size=16) * 2, rng.normal(size=16) * 2
    ref = np.mean([math.log1p(math.exp(-(a - b))) for a, b in zip(rc, rr)])
    loss, m = bradley_terry_loss(jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32))
    close(loss, ref)
    close(m["accuracy"][0], float(np.sum(rc > rr)))
    close(m["margin"][0], float(np.sum(rc - rr)))
    shifted, _ = bradley_terry_loss(jnp.asarray(rc + 3.7, jnp.float32),
                                    jnp.asarray(rr + 3.7, jnp.float32))
    close(shifted, ref)


def test_gather_last():
    r = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(gather_last(jnp.asarray(r), jnp.asarray([3, 0, 2]))),
                                  [3.0, 4.0, 10.0])


def test_preference_transformer_soft_labels():
    rng = np.random.default_rng(12)
    r, w = rng.normal(size=(2, 5, 7)), rng.uniform(size=(2, 5, 7))
    masks = rng.random((2, 5, 7)) < 0.7
    label = rng.uniform(size=5)
    ref = []
    for b in range(5):
        s = [sum(w[k, b, t] * r[k, b, t] for t in range(7) if masks[k, b, t]) for k in (0, 1)]
        lse = max(s) + math.log(sum(math.exp(v - max(s)) for v in s))
        ref.append(-(label[b] * (s[0] - lse) + (1 - label[b]) * (s[1] - lse)))
    args = [jnp.asarray(x, jnp.float32) for x in (r[0], w[0], r[1], w[1])]
    loss, _ = preference_transformer_loss(*args, *masks, label_B=label)
    close(loss, np.mean(ref))
    # A hard label equals Bradley-Terry on the scores.
    scores = [np.sum(np.where(masks[k], w[k] * r[k], 0.0), axis=1) for k in (0, 1)]
    hard, _ = preference_transformer_loss(*args, *masks)
    close(hard, float(bradley_terry_loss(*(jnp.asarray(s, jnp.float32) for s in scores))[0]))
    # The soft-label optimum: zero gradient where score difference = logit(label), not elsewhere.
    ones, p = jnp.ones((1, 2)), 0.8
    grad = jax.grad(lambda d: preference_transformer_loss(
        d, ones, jnp.zeros((1, 2)), ones, ones, ones, label_B=p)[0])
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray([[math.log(p / (1 - p)), 0.0]]))), 0.0,
                               atol=1e-6)
    assert float(grad(jnp.zeros((1, 2)))[0, 0]) < -0.1


def test_loss_config_validation_names_the_field():
    for kwargs, field in ((dict(gamma=1.5), "gamma"), (dict(beta=0.0), "beta"),
                          (dict(lam=-1.0), "lam"), (dict(likelihood="x"), "likelihood"),
                          (dict(cer="tanh"), "cer"), (dict(reward_align="prev"), "reward_align"),
                          (dict(use_neg=1), "use_neg"),
                          (dict(neg_floor=float("nan")), "neg_floor"),
                          (dict(cer_weight=-0.1), "cer_weight")):
        with pytest.raises((ValueError, TypeError), match=f"AvaConfig.{field} "):
            AvaConfig(**kwargs)
    assert hash(AvaConfig(gamma=1)) == hash(AvaConfig())  # ints coerced: one jit cache entry


def test_shape_errors_name_the_tensor_and_jit_works():
    batch, other = to_inputs(make_batch(13)), to_inputs(make_batch(14))
    with pytest.raises(ValueError, match="sigma_BxT"):
        ava_d_loss(batch._replace(sigma_BxT=batch.sigma_BxT[:, 1:]), BASE)
    loss, _ = jax.jit(lambda c, r: ava_p_loss(c, r, BASE))(batch, other)
    close(loss, float(ava_p_loss(batch, other, BASE)[0]))
