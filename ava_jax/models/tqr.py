"""TQR: a Transformer with a Q-value head and a reward head (AVA section 3, method.md section 1)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig, QHead, RewardHead, RewardWeighting
from ava_jax.models.transformer import Transformer


@flax.struct.dataclass
class TQROutput:
    """Per-position outputs; field meanings are in docs/design.md."""

    logits: jax.Array  # [B, T, V] LM logits
    hidden: jax.Array  # [B, T, D] last hidden states
    q_values: jax.Array  # [B, T, V] Q(s_t, .) from h_t, times w_t unless weight_heads="reward"
    reward_mean: jax.Array  # [B, T] from h_t, times w_t
    reward_sigma: jax.Array  # [B, T] from h_t, times w_t
    weights: jax.Array  # [B, T] w_t (ones where reward_weighting="none"; zero on padding)


class TQR(nnx.Module):
    """Backbone + Q head + Gaussian reward head (+ reward-weighting attention).

    Call on int32 tokens [B, T] with an optional padding mask [B, T]. `backbone` alone is what
    generation uses (it carries the KV cache).
    """

    def __init__(self, cfg: ModelConfig, heads: HeadConfig | None = None, *, rngs: nnx.Rngs):
        heads = heads or HeadConfig()
        self.cfg, self.heads = cfg, heads
        self.backbone = Transformer(cfg, rngs)
        self.q_head = QHead(heads, cfg.d_model, cfg.vocab_size, rngs)
        self.reward_head = RewardHead(heads, cfg.d_model, rngs)
        self.weighting = (RewardWeighting(cfg.d_model, heads.weight_dim or cfg.d_model, rngs, heads.weight_norm)
                          if heads.reward_weighting == "attention" else None)

    def __call__(self, tokens_BxT=None, mask_BxT=None, *, embeds_BxTxD=None) -> TQROutput:
        out = self.backbone(tokens_BxT, mask_BxT, embeds_BxTxD=embeds_BxTxD)
        h_BxTxD = out.hidden
        B, T = h_BxTxD.shape[:2]
        mask_BxT = jnp.ones((B, T), bool) if mask_BxT is None else mask_BxT.astype(bool)
        q_BxTxV = self.q_head(h_BxTxD, out.logits)
        mu_BxT, sigma_BxT = self.reward_head(h_BxTxD)
        if self.weighting is None:
            w_BxT = mask_BxT.astype(jnp.float32)
            return TQROutput(out.logits, h_BxTxD, q_BxTxV, mu_BxT, sigma_BxT, w_BxT)
        # The heads' outputs at position t are scaled by w_t (AVA Eq. 11): both heads as printed, or
        # the reward head only (`weight_heads="reward"`), which keeps Q causal.
        w_BxT = self.weighting(h_BxTxD, mask_BxT)
        if self.heads.weight_heads == "both":
            q_BxTxV = q_BxTxV * w_BxT[..., None]
        return TQROutput(out.logits, h_BxTxD, q_BxTxV, mu_BxT * w_BxT, sigma_BxT * w_BxT, w_BxT)
