"""The PPO model: the policy's Transformer plus a value head, on the policy's own trunk or on a
separate critic Transformer (`ppo.separate_critic`).

`backbone` is the policy that generates (the name every exporter and evaluator reads, as on a TQR);
`critic_backbone` is None when the value head shares the policy's trunk. The value head is a
zero-initialised linear map of the last hidden state, so every value starts at 0 and the first
value loss does not disturb the policy through a shared trunk.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ava_jax.models.transformer import Transformer


class ValueHead(nnx.Module):
    def __init__(self, d_model: int):
        self.kernel = nnx.Param(jnp.zeros((d_model, 1), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, h_BxTxD):
        return (h_BxTxD.astype(jnp.float32) @ self.kernel[...])[..., 0] + self.bias[...]


class ActorCritic(nnx.Module):
    def __init__(self, policy: Transformer, *, separate_critic: bool = False):
        self.cfg = policy.cfg
        self.backbone = policy
        # A copy of the initial policy as the critic's trunk (OpenRLHF starts it from the reward
        # model; the policy's copy needs no second architecture and no second tokenizer).
        self.critic_backbone = nnx.clone(policy) if separate_critic else None
        self.value_head = ValueHead(policy.cfg.d_model)

    def __call__(self, tokens_BxT, mask_BxT):
        """(policy hidden [B, T, D], values [B, T]): V(s_t) read at position t."""
        h = self.backbone(tokens_BxT, mask_BxT, logits=False).hidden
        hc = h if self.critic_backbone is None else self.critic_backbone(tokens_BxT, mask_BxT, logits=False).hidden
        return h, self.value_head(hc)
