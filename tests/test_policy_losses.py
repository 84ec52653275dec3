"""SFT and the DPO family against float64 NumPy on fixed log-probs, and the sequence log-prob masks."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from ava_jax.losses.policy import DpoConfig, dpo_loss, sequence_logprobs, sft_loss
from ava_jax.models.positions import token_positions

RNG = np.random.default_rng(0)
PC, PR, RC, RR = (RNG.normal(-40.0, 8.0, 6) for _ in range(4))
LC, LR = RNG.integers(5, 40, 6).astype(np.float64), RNG.integers(5, 40, 6).astype(np.float64)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_dpo(pc, pr, rc, rr, lc, lr, *, beta, loss_type, eps=0.0, reference_free=False, ipo_length_norm=True):
    """Float64 reference of every variant, per pair (written from the papers' formulas)."""
    if reference_free:
        rc = rr = np.zeros_like(pc)
    ratio_c, ratio_r = pc - rc, pr - rr
    if loss_type == "ipo" and ipo_length_norm:
        ratio_c, ratio_r = ratio_c / lc, ratio_r / lr
    d = ratio_c - ratio_r
    if loss_type == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid(beta * d) - eps * _log_sigmoid(-beta * d)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    else:
        loss = np.maximum(0.0, 1 - beta * d)
    return loss, beta * ratio_c, beta * ratio_r


VARIANTS = [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", beta=0.5), dict(loss_type="sigmoid", eps=0.2),
            dict(loss_type="sigmoid", reference_free=True), dict(loss_type="ipo"),
            dict(loss_type="ipo", ipo_length_norm=False, beta=0.05), dict(loss_type="hinge", beta=0.3),
            dict(loss_type="hinge", reference_free=True)]


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_dpo_variants_match_float64_numpy(v):
    beta = v.get("beta", 0.1)
    cfg = DpoConfig(beta=beta, loss_type=v["loss_type"], label_smoothing=v.get("eps", 0.0),
                    reference_free=v.get("reference_free", False), ipo_length_norm=v.get("ipo_length_norm", True))
    loss, m = dpo_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC), jnp.asarray(RR), cfg,
                       len_chosen_B=jnp.asarray(LC), len_rejected_B=jnp.asarray(LR))
    ref, rw_c, rw_r = numpy_dpo(PC, PR, RC, RR, LC, LR, beta=beta, loss_type=v["loss_type"], eps=v.get("eps", 0.0),
                                reference_free=v.get("reference_free", False),
                                ipo_length_norm=v.get("ipo_length_norm", True))
    np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-5, atol=1e-5)
    mean = {k: float(s) / float(c) for k, (s, c) in m.items()}
    np.testing.assert_allclose(mean["loss"], ref.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean["rewards/chosen"], rw_c.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean["rewards/rejected"], rw_r.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean["rewards/margin"], (rw_c - rw_r).mean(), rtol=1e-5, atol=1e-5)
    assert mean["rewards/accuracy"] == pytest.approx(np.mean(rw_c > rw_r))
    np.testing.assert_allclose(mean["logps/chosen"], PC.mean(), rtol=1e-6)
    np.testing.assert_allclose(mean["logps/rejected"], PR.mean(), rtol=1e-6)
    assert float(m["loss"][1]) == 6


def test_dpo_golden_values_and_invariants():
    # One pair by hand: delta = (-10 + 11) - (-12 + 11) = 2, beta 0.1 -> log(1 + e^-0.2).
    one = lambda *xs: [jnp.asarray([x], jnp.float32) for x in xs]
    loss, _ = dpo_loss(*one(-10.0, -12.0, -11.0, -11.0), DpoConfig())
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    loss, _ = dpo_loss(*one(-10.0, -12.0, -11.0, -11.0), DpoConfig(loss_type="hinge"))
    assert float(loss) == pytest.approx(0.8, abs=1e-6)
    loss, _ = dpo_loss(*one(-10.0, -12.0, -11.0, -11.0), DpoConfig(loss_type="ipo", ipo_length_norm=False))
    assert float(loss) == pytest.approx((2.0 - 5.0) ** 2, abs=1e-5)
    # Policy = reference: the sigmoid loss is exactly log 2, whatever beta and the log-probs.
    for beta in (0.1, 1.0, 3.0):
        loss, m = dpo_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(PC), jnp.asarray(PR), DpoConfig(beta=beta))
        assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
        assert float(m["rewards/margin"][0]) == 0.0
    # Swapping chosen and rejected flips the margin (and the accuracy).
    _, a = dpo_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC), jnp.asarray(RR), DpoConfig())
    _, b = dpo_loss(jnp.asarray(PR), jnp.asarray(PC), jnp.asarray(RR), jnp.asarray(RC), DpoConfig())
    assert float(a["rewards/margin"][0]) == pytest.approx(-float(b["rewards/margin"][0]), rel=1e-6)
    assert abs(float(a["rewards/margin"][0])) > 0.1
    assert float(a["rewards/accuracy"][0]) + float(b["rewards/accuracy"][0]) == 6
    # Invalid pairs do not count.
    _, m = dpo_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.asarray(RC), jnp.asarray(RR), DpoConfig(),
                    valid_B=jnp.asarray([1, 1, 0, 0, 0, 1]))
    assert float(m["loss"][1]) == 3


def test_dpo_config_names_the_field():
    for kwargs, field in ((dict(beta=0.0), "beta"), (dict(loss_type="kto"), "loss_type"),
                          (dict(label_smoothing=0.5), "label_smoothing"), (dict(reference_free=1), "reference_free"),
                          (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing")):
        with pytest.raises((ValueError, TypeError), match=f"DpoConfig.{field} "):
            DpoConfig(**kwargs)


@pytest.mark.parametrize("padding", ["right", "left", "pad_is_eos"])
def test_sequence_logprobs_count_response_tokens_only(padding):
    """Prompt tokens and padding never count, whichever side is padded and even when pad == EOS."""
    T, eos = 9, 2
    rows = [([5, 6, 7], [8, 9, eos]), ([5, 6], [7, 8, 9, 10, eos]), ([5, 6, 7, 8], [eos])]
    tokens, mask, plen = np.full((3, T), eos if padding == "pad_is_eos" else 0), np.zeros((3, T), np.int32), []
    for i, (p, r) in enumerate(rows):
        seq = p + r
        start = T - len(seq) if padding == "left" else 0
        tokens[i, start:start + len(seq)], mask[i, start:start + len(seq)] = seq, 1
        plen.append(len(p))
    response, _ = token_positions(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(plen))
    # logp of transition t = 1000 * (row) + t + 1 (the action's position): sums are checkable by hand.
    logp = jnp.asarray(np.arange(1, T)[None, :] + 1000.0 * np.arange(3)[:, None], jnp.float32)
    total, count = sequence_logprobs(logp, response, jnp.asarray(mask))
    for i, (p, r) in enumerate(rows):
        start = T - len(p) - len(r) if padding == "left" else 0
        positions = range(start + len(p), start + len(p) + len(r))  # the response tokens' positions
        assert float(count[i]) == len(r)
        assert float(total[i]) == sum(1000.0 * i + t for t in positions)
    loss, m = sft_loss(-jnp.abs(logp), response, jnp.asarray(mask))
    assert float(m["loss"][1]) == sum(len(r) for _, r in rows)
    assert float(loss) == pytest.approx(float(jnp.sum(jnp.abs(total))) / float(m["loss"][1]), rel=1e-6)
