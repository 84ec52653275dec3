"""The PPO update: per-token log-probs and values of a rollout batch, and the clipped loss.

Alignment (policy.md "the bugs every stack has had"): in the rollout layout (`rl.rollout`) response
token j sits at column P + j, so its log-prob under the policy and the value of the state it was
chosen in are both read from position P + j - 1 (`response_slice`); the reward model's output for
it is read at its own position through the reward reader (`rl.rewards`). Log-probs are those of the
distribution actually sampled: banned ids removed, logits divided by the sampling temperature
(the reference's too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.losses.ppo import PpoConfig, policy_loss, value_loss


def response_slice(x_BxT, n: int):
    """Positions P - 1 .. P + N - 2 of a [B, T = P + N, ...] array: the outputs that predict (or
    value the state before) response tokens 0 .. N - 1."""
    p = x_BxT.shape[1] - n
    return x_BxT[:, p - 1:p - 1 + n]


def response_logprobs_from_hidden(backbone, h_BxTxD, tokens_BxT, n: int, temperature: float = 1.0,
                                  banned_ids: tuple[int, ...] = (), entropy: bool = False):
    """([B, N] log-probs of the response tokens, [B, N] entropies or None) under the sampled policy."""
    logits = backbone.logits(response_slice(h_BxTxD, n))  # [B, N, V] float32
    if banned_ids:
        logits = logits.at[..., jnp.asarray(banned_ids)].set(-jnp.inf)
    if temperature > 0:
        logits = logits / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    actions = tokens_BxT[:, tokens_BxT.shape[1] - n:]
    logp = jnp.take_along_axis(logp_all, actions[..., None], axis=-1)[..., 0]
    if not entropy:
        return logp, None
    # Banned ids have log-prob -inf and probability 0: count them as 0 without a 0 x inf in either
    # pass (a where around the product would still send NaN into the gradient).
    safe = jnp.where(jnp.isfinite(logp_all), logp_all, 0.0)
    return logp, -(jnp.exp(logp_all) * safe).sum(-1)


def lm_response_logprobs(backbone, tokens_BxT, mask_BxT, n: int, temperature: float = 1.0,
                         banned_ids: tuple[int, ...] = ()):
    """[B, N] log-probs of the response tokens under a bare Transformer (the reference)."""
    h = backbone(tokens_BxT, mask_BxT, logits=False).hidden
    return response_logprobs_from_hidden(backbone, h, tokens_BxT, n, temperature, banned_ids)[0]


def policy_outputs(model, tokens_BxT, mask_BxT, n: int, temperature: float = 1.0, banned_ids=(),
                   entropy: bool = False):
    """(log-probs, entropies or None, values), each [B, N], of an `ActorCritic` on a rollout batch."""
    h, v_BxT = model(tokens_BxT, mask_BxT)
    logp, ent = response_logprobs_from_hidden(model.backbone, h, tokens_BxT, n, temperature, banned_ids, entropy)
    return logp, ent, response_slice(v_BxT, n)


def make_ppo_loss(cfg: PpoConfig, *, temperature: float, banned_ids: tuple[int, ...] = ()):
    """`loss_fn(model, batch, rng, frozen)` over a minibatch of the rollout (`RolloutSource`):
    token-mean clipped policy loss + vf_coef x token-mean clipped value loss - entropy_coef x entropy.

    Batch keys: tokens_BxT, mask_BxT, response_mask_BxN, old_logp_BxN, old_values_BxN,
    advantages_BxN, returns_BxN.
    """
    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        m = batch["response_mask_BxN"].astype(bool)
        n = m.shape[1]
        logp, ent, values = policy_outputs(model, batch["tokens_BxT"], batch["mask_BxT"], n, temperature,
                                           banned_ids, entropy=True)
        pg, approx_kl, clipped = policy_loss(logp, batch["old_logp_BxN"], batch["advantages_BxN"], m, cfg.clip_eps)
        vf, v_clipped = value_loss(values, batch["old_values_BxN"], batch["returns_BxN"], m, cfg.value_clip)
        ent = jnp.where(m, ent, 0.0)
        per_token = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
        count = jnp.sum(m, dtype=jnp.float32)
        total = jnp.sum(per_token)
        metrics = {"loss": (total, count), "loss/policy": (jnp.sum(pg), count), "loss/value": (jnp.sum(vf), count),
                   "policy/approxkl": (jnp.sum(approx_kl), count), "policy/clipfrac": (jnp.sum(clipped), count),
                   "policy/entropy": (jnp.sum(ent), count), "value/clipfrac": (jnp.sum(v_clipped), count),
                   "ratio": (jnp.sum(jnp.where(m, jnp.exp(logp - batch["old_logp_BxN"]), 0.0)), count)}
        return total / jnp.maximum(count, 1.0), metrics
    return loss_fn
