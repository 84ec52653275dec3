"""PPO's pieces as pure functions of arrays (policy.md "PPO with a learned reward model").

Arrays are [B, N] over the response tokens of a rollout: token j of row b is the j-th generated
token, `mask_BxN` is 1 on generated tokens (EOS included) and 0 on padding. Every function takes an
arbitrary mask: GAE skips masked positions (the next value of a real token is that of the next real
token), and means are masked means.

  rewards     r_t = score_t - kl_coef * kl_t              (`kl_estimate`: k1 or k3, clamped)
  GAE         delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}  (reverse scan)
  returns     R_t = A_t + V_t, computed before the advantages are whitened
  policy      max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(log pi - log pi_old)
  value       0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PpoConfig:
    """The `config.ppo` switches; defaults as the reference stacks agree (policy.md's table).

    gamma, lam: discount and GAE lambda (1.0 / 0.95; OpenRLHF uses lambda 1.0).
    clip_eps: policy ratio clip (0.2). value_clip: value clip around the rollout's values (0.2).
    vf_coef: value-loss coefficient when the value head shares the policy trunk (0.1).
    kl_coef: KL penalty coefficient in the reward (0.05, TRL and EasyDeL).
    kl_estimator: "k1" (log pi - log pi_ref) or "k3" (exp(r) - 1 - r, r = log pi_ref - log pi), each
      clamped to +-kl_clamp (10).
    adaptive_kl_target: > 0 turns on Ziegler et al.'s adaptive coefficient: kl_coef is multiplied by
      1 + clip(KL / target - 1, -0.2, 0.2) * (rollout rows / adaptive_kl_horizon) after each rollout.
    whiten_advantages: masked whitening of the advantages over the rollout (after the returns).
    missing_eos_penalty: subtracted from the score of a response that never produced EOS (TRL's
      recipe: 1.0; 0 disables; ignored by tasks without an EOS, e.g. stories' fixed lengths).
    entropy_coef: an entropy bonus (0: none, as the anchors).
    """

    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_clamp: float = 10.0
    adaptive_kl_target: float = 0.0
    adaptive_kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"ppo.kl_estimator={self.kl_estimator!r} is not one of ('k1', 'k3')")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name}={getattr(self, name)} must lie in [0, 1]")
        for name in ("clip_eps", "value_clip", "vf_coef", "kl_coef", "kl_clamp", "adaptive_kl_target",
                     "missing_eos_penalty", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"ppo.{name}={getattr(self, name)} must be >= 0")
        if self.adaptive_kl_horizon <= 0:
            raise ValueError(f"ppo.adaptive_kl_horizon={self.adaptive_kl_horizon} must be > 0")


def masked_mean(x, mask, axis=None):
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked entries (population variance); zero where masked."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return jnp.where(mask.astype(bool), (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def kl_estimate(logp_BxN, ref_logp_BxN, estimator: str = "k1", clamp: float = 10.0):
    """Per-token KL estimate of the sampled tokens (Schulman's k1 or k3), clamped to +-clamp."""
    if estimator == "k1":
        kl = logp_BxN - ref_logp_BxN
    elif estimator == "k3":
        r = ref_logp_BxN - logp_BxN
        kl = jnp.exp(r) - 1.0 - r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k3")
    return jnp.clip(kl, -clamp, clamp)


def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float):
    """(advantages, returns) by a reverse scan over the real tokens of each row.

    A masked position gets zero advantage and return and is skipped: the real token before it
    bootstraps from the next real token's value, and the last real token from 0 (the episode ends).
    """
    m = mask_BxN.astype(bool)
    r, v = rewards_BxN.astype(jnp.float32), values_BxN.astype(jnp.float32)

    def body(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
        return carry, jnp.where(m_t, a_t, 0.0)

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_NxB = jax.lax.scan(body, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv_NxB.T
    return adv, jnp.where(m, adv + v, 0.0)


def policy_loss(logp_BxN, old_logp_BxN, adv_BxN, mask_BxN, clip_eps: float):
    """Per-token clipped surrogate loss [B, N] and (approx KL, clip fraction) per token."""
    log_ratio = logp_BxN - old_logp_BxN
    ratio = jnp.exp(log_ratio)
    unclipped = -adv_BxN * ratio
    clipped = -adv_BxN * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    m = mask_BxN.astype(bool)
    return (jnp.where(m, loss, 0.0), jnp.where(m, 0.5 * jnp.square(log_ratio), 0.0),
            jnp.where(m, (clipped > unclipped).astype(jnp.float32), 0.0))


def value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, value_clip: float):
    """Per-token clipped value loss [B, N] and the clip fraction per token."""
    clipped_v = old_values_BxN + jnp.clip(values_BxN - old_values_BxN, -value_clip, value_clip)
    a = jnp.square(values_BxN - returns_BxN)
    b = jnp.square(clipped_v - returns_BxN)
    m = mask_BxN.astype(bool)
    return jnp.where(m, 0.5 * jnp.maximum(a, b), 0.0), jnp.where(m, (b > a).astype(jnp.float32), 0.0)
