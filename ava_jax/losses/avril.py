"""AVRIL terms per transition of a token sequence (method.md section 2).

A sequence y_0 .. y_{T-1} is prompt + response as one token stream. Transition t (t = 0 .. T-2) is
(state y_0..y_t, action y_{t+1}); Q_a(t) = q[b, t, y_{t+1}] is read from h_t, which has seen y_0..y_t.
All per-transition arrays here are [B, N] with N = T - 1 (index t = transition t).

Padding may sit anywhere (left, right, inside). Values at positions that do not count are replaced
with harmless constants by `jnp.where` BEFORE any arithmetic, so a NaN/Inf or a garbage token id
there can change neither the value nor the gradient (multiplying by a mask would let 0 * NaN leak
into the backward pass).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ava_jax.losses.config import AvaConfig

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class QSummary(NamedTuple):
    """Q read per transition instead of as [B, T, V] rows (`TQR.q_summary`, vocabulary chunks).

    Attributes:
      q_a_BxN: Q(s_t, y_{t+1}) for t = 0..T-2.
      beta_lse_BxN: logsumexp_v(beta * Q(s_t, v)), with the loss's beta.
    """

    q_a_BxN: jax.Array
    beta_lse_BxN: jax.Array


class AvrilInputs(NamedTuple):
    """The model outputs and masks of one batch of sequences (a pytree).

    Attributes:
      q_BxTxV: Q(s_t, .) read from h_t, or a QSummary of it.
      mu_BxT: reward mean read from h_t (already weighted by w_t).
      sigma_BxT: reward standard deviation read from h_t, > 0 at real positions.
      tokens_BxT: token ids y_t.
      response_mask_BxT: 1 where y_t is a real response token (prompt and padding 0).
      mask_BxT: 1 where y_t is a real token (prompt or response).
    """

    q_BxTxV: "jax.Array | QSummary"
    mu_BxT: jax.Array
    sigma_BxT: jax.Array
    tokens_BxT: jax.Array
    response_mask_BxT: jax.Array
    mask_BxT: jax.Array


def _check_shapes(q_BxTxV, mu_BxT, sigma_BxT, tokens_BxT, response_mask_BxT, mask_BxT):
    if isinstance(q_BxTxV, QSummary):
        T = mu_BxT.shape[1]
        for name, x in (("q_a_BxN", q_BxTxV.q_a_BxN), ("beta_lse_BxN", q_BxTxV.beta_lse_BxN)):
            if x.shape != (mu_BxT.shape[0], T - 1):
                raise ValueError(f"QSummary.{name} must have shape {(mu_BxT.shape[0], T - 1)}, got {x.shape}")
        return
    if q_BxTxV.ndim != 3:
        raise ValueError(f"q_BxTxV must be [B, T, V], got shape {q_BxTxV.shape}")
    bt = q_BxTxV.shape[:2]
    for name, x in (("mu_BxT", mu_BxT), ("sigma_BxT", sigma_BxT), ("tokens_BxT", tokens_BxT),
                    ("response_mask_BxT", response_mask_BxT), ("mask_BxT", mask_BxT)):
        if tuple(x.shape) != tuple(bt):
            raise ValueError(f"{name} must have shape {tuple(bt)} (q_BxTxV's [B, T]), got {x.shape}")
    if bt[1] < 2:
        raise ValueError(f"tokens_BxT needs T >= 2 to hold a transition, got T={bt[1]}")


def transition_masks(response_mask_BxT, mask_BxT, include_prompt: bool, td_terminal: str = "none"):
    """Which transitions count, and which have a TD error.

    Transition t counts iff its action y_{t+1} is a real response token (any real token when
    `include_prompt`) and its state ends on a real token y_t. The second condition only matters
    for left padding with include_prompt=True: there the first real token would otherwise be an
    "action" taken from a state made only of padding, which the 0-based rule "y_0 is never an
    action" excludes for unpadded rows.

    Args:
      response_mask_BxT: 1 = real response token.
      mask_BxT: 1 = real token.
      include_prompt: count prompt tokens as actions too.
      td_terminal: "none": delta_t exists where transitions t and t+1 both count; "zero": also at
        the last counted transition of each row (V = 0 after the final token).

    Returns:
      (mask_BxN, td_mask_BxN, terminal_BxN), bool, N = T - 1: mask_BxN[b, t] = transition t counts;
      td_mask_BxN[b, t] = delta_t exists; terminal_BxN[b, t] = t is the row's last counted
      transition and delta_t = Q_a(t) (only with td_terminal="zero"; all False otherwise).
    """
    real_BxT = mask_BxT.astype(bool)
    action_BxT = real_BxT if include_prompt else real_BxT & response_mask_BxT.astype(bool)
    mask_BxN = action_BxT[:, 1:] & real_BxT[:, :-1]
    next_BxN = jnp.concatenate([mask_BxN[:, 1:], jnp.zeros_like(mask_BxN[:, :1])], axis=1)
    td_mask_BxN = mask_BxN & next_BxN
    if td_terminal == "zero":
        n_idx_N = jnp.arange(mask_BxN.shape[1])
        last_B = jnp.max(jnp.where(mask_BxN, n_idx_N[None, :], -1), axis=1)
        terminal_BxN = mask_BxN & (n_idx_N[None, :] == last_B[:, None])
    elif td_terminal == "none":
        terminal_BxN = jnp.zeros_like(mask_BxN)
    else:
        raise ValueError(f"td_terminal must be 'none' or 'zero', got {td_terminal!r}")
    return mask_BxN, td_mask_BxN | terminal_BxN, terminal_BxN


def last_transition(values_BxN, mask_BxN):
    """Value at the last counted transition of each row, and whether the row has one.

    Args:
      values_BxN: per-transition values (already finite where mask_BxN is 0).
      mask_BxN: bool, counted transitions.

    Returns:
      (value_B, has_B): value_B is 0 for rows with no counted transition.
    """
    n_idx_N = jnp.arange(mask_BxN.shape[1])
    last_B = jnp.max(jnp.where(mask_BxN, n_idx_N[None, :], -1), axis=1)
    has_B = last_B >= 0
    value_B = jnp.take_along_axis(values_BxN, jnp.maximum(last_B, 0)[:, None], axis=1)[:, 0]
    return jnp.where(has_B, value_B, 0.0), has_B


def avril_terms(q_BxTxV, mu_BxT, sigma_BxT, tokens_BxT, response_mask_BxT, mask_BxT,
                cfg: AvaConfig) -> dict:
    """Per-transition likelihood, KL and TD log-likelihood (method.md section 2; AVRIL's ELBO terms).

    Args:
      q_BxTxV: Q(s_t, .) from h_t, or a QSummary (Q_a and logsumexp(beta Q) per transition).
      mu_BxT: Gaussian reward head mean at h_t.
      sigma_BxT: Gaussian reward head std at h_t (> 0 at real positions; anything elsewhere).
      tokens_BxT: token ids.
      response_mask_BxT: 1 = real response token.
      mask_BxT: 1 = real token.
      cfg: uses gamma, beta, likelihood, reward_align, include_prompt, td_terminal.

    Returns:
      dict of [B, N] arrays (N = T - 1, zero where the transition does not count):
        "lik_BxN" log-likelihood of the action, "kl_BxN" KL(q(R) || N(0,1)),
        "td_BxN" log N(delta_t; mu_t, sigma_t^2) (zero where td_mask is 0), "delta_BxN" TD error,
        "q_a_BxN" Q_a(t), "mu_BxN"/"sigma_BxN" the reward of transition t after reward_align
        (sigma is 1 where not counted), "mask_BxN" and "td_mask_BxN" (bool);
      and [B] arrays: "mu_last_B", "sigma_last_B" (reward of the last counted transition; 0 and 1
        for a row without one), "has_B" (bool, the row has a counted transition).
    """
    _check_shapes(q_BxTxV, mu_BxT, sigma_BxT, tokens_BxT, response_mask_BxT, mask_BxT)
    summary = q_BxTxV if isinstance(q_BxTxV, QSummary) else None
    # Compute in at least float32 (bf16 logsumexp over a vocabulary loses the small terms).
    q_dtype = summary.q_a_BxN if summary is not None else q_BxTxV
    dtype = jnp.promote_types(jnp.result_type(q_dtype, mu_BxT, sigma_BxT), jnp.float32)
    mask_BxN, td_mask_BxN, terminal_BxN = transition_masks(response_mask_BxT, mask_BxT, cfg.include_prompt,
                                                           cfg.td_terminal)

    if summary is None:
        vocab = q_BxTxV.shape[2]
        # Action y_{t+1}; pad ids may be anything (even out of range), so replace them first.
        actions_BxN = jnp.where(mask_BxN, tokens_BxT[:, 1:], 0).astype(jnp.int32)
        actions_BxN = jnp.clip(actions_BxN, 0, vocab - 1)
        # Only Q rows of counted transitions are read (Q_a(t+1) of a TD pair is itself a counted row).
        q_BxNxV = jnp.where(mask_BxN[..., None], q_BxTxV[:, :-1].astype(dtype), 0.0)
        q_a_BxN = jnp.take_along_axis(q_BxNxV, actions_BxN[..., None], axis=-1)[..., 0]
    else:  # the same quantities, read per transition by TQR.q_summary (no [B, N, V] rows)
        q_a_BxN = jnp.where(mask_BxN, summary.q_a_BxN.astype(dtype), 0.0)

    if cfg.likelihood == "boltzmann":
        # AVA Eq. 3: log pi(a|s) = log_softmax(beta * Q(s, .))[a] = beta * Q_a - logsumexp(beta * Q).
        # logsumexp (max-shifted, stable) and a gather: the [B, N, V] log-probs are never kept.
        lse_BxN = (jax.nn.logsumexp(cfg.beta * q_BxNxV, axis=-1) if summary is None
                   else jnp.where(mask_BxN, summary.beta_lse_BxN.astype(dtype), 0.0))
        lik_BxN = cfg.beta * q_a_BxN - lse_BxN
    else:
        # AVA Eq. 13 as printed: the likelihood term is beta * Q(s_t, a_t) itself.
        lik_BxN = cfg.beta * q_a_BxN
    lik_BxN = jnp.where(mask_BxN, lik_BxN, 0.0)

    # method.md section 1, reward_align: "next" reads transition t's reward at h_{t+1}, which has
    # seen the action; "state" reads it at h_t (state-only reward, AVRIL's reference code).
    if cfg.reward_align == "next":
        mu_raw_BxN, sigma_raw_BxN = mu_BxT[:, 1:], sigma_BxT[:, 1:]
    else:
        mu_raw_BxN, sigma_raw_BxN = mu_BxT[:, :-1], sigma_BxT[:, :-1]
    mu_BxN = jnp.where(mask_BxN, mu_raw_BxN.astype(dtype), 0.0)
    # sigma := 1 where not counted, so log(sigma) and 1/sigma stay finite there (double-where).
    sigma_BxN = jnp.where(mask_BxN, sigma_raw_BxN.astype(dtype), 1.0)
    log_sigma_BxN = jnp.log(sigma_BxN)

    # Closed-form KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1) - log sigma (AVRIL's KL
    # to the N(0,1) prior, method.md section 2 kl_t).
    kl_BxN = 0.5 * (mu_BxN * mu_BxN + sigma_BxN * sigma_BxN - 1.0) - log_sigma_BxN
    kl_BxN = jnp.where(mask_BxN, kl_BxN, 0.0)

    # TD error delta_t = Q_a(t) - gamma * Q_a(t+1), where transitions t and t+1 both count; with
    # td_terminal="zero" also at the last transition, whose successor value is 0 (terminal state).
    q_a_next_BxN = jnp.concatenate([q_a_BxN[:, 1:], jnp.zeros_like(q_a_BxN[:, :1])], axis=1)
    q_a_next_BxN = jnp.where(terminal_BxN, 0.0, q_a_next_BxN)
    delta_BxN = jnp.where(td_mask_BxN, q_a_BxN - cfg.gamma * q_a_next_BxN, 0.0)
    # td_t = log N(delta_t; mu_t, sigma_t^2), written with log sigma (no log of sigma^2, no 1/var).
    z_BxN = (delta_BxN - mu_BxN) / sigma_BxN
    td_BxN = -0.5 * z_BxN * z_BxN - log_sigma_BxN - _HALF_LOG_2PI
    td_BxN = jnp.where(td_mask_BxN, td_BxN, 0.0)

    mu_last_B, has_B = last_transition(mu_BxN, mask_BxN)
    sigma_last_B, _ = last_transition(sigma_BxN, mask_BxN)
    return {
        "lik_BxN": lik_BxN,
        "kl_BxN": kl_BxN,
        "td_BxN": td_BxN,
        "delta_BxN": delta_BxN,
        "q_a_BxN": q_a_BxN,
        "mu_BxN": mu_BxN,
        "sigma_BxN": sigma_BxN,
        "mask_BxN": mask_BxN,
        "td_mask_BxN": td_mask_BxN,
        "mu_last_B": mu_last_B,
        "sigma_last_B": jnp.where(has_B, sigma_last_B, 1.0),
        "has_B": has_B,
    }
