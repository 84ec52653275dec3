"""TQR: a Transformer with a Q-value head and a reward head (AVA section 3, method.md section 1)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ava_jax.losses.vocab import DEFAULT_CHUNK, chunked_logit_stats
from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig, QHead, RewardHead, RewardWeighting
from ava_jax.models.transformer import Transformer


@flax.struct.dataclass
class TQROutput:
    """Per-position outputs; field meanings are in docs/design.md."""

    logits: jax.Array | None  # [B, T, V] LM logits (None when called with vocab=False)
    hidden: jax.Array  # [B, T, D] last hidden states
    q_values: jax.Array | None  # [B, T, V] Q(s_t, .) from h_t, times w_t unless weight_heads="reward"
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

    def __call__(self, tokens_BxT=None, mask_BxT=None, *, embeds_BxTxD=None, vocab: bool = True) -> TQROutput:
        """`vocab=False` computes no [B, T, V] array (logits and q_values are None); read what the
        AVRIL terms need with `q_summary`."""
        out = self.backbone(tokens_BxT, mask_BxT, embeds_BxTxD=embeds_BxTxD, logits=vocab)
        h_BxTxD = out.hidden
        B, T = h_BxTxD.shape[:2]
        mask_BxT = jnp.ones((B, T), bool) if mask_BxT is None else mask_BxT.astype(bool)
        q_BxTxV = self.q_head(h_BxTxD, out.logits) if vocab else None
        mu_BxT, sigma_BxT = self.reward_head(h_BxTxD)
        if self.weighting is None:
            w_BxT = mask_BxT.astype(jnp.float32)
            return TQROutput(out.logits, h_BxTxD, q_BxTxV, mu_BxT, sigma_BxT, w_BxT)
        # The heads' outputs at position t are scaled by w_t (AVA Eq. 11): both heads as printed, or
        # the reward head only (`weight_heads="reward"`), which keeps Q causal.
        w_BxT = self.weighting(h_BxTxD, mask_BxT)
        if self.heads.weight_heads == "both" and q_BxTxV is not None:
            q_BxTxV = q_BxTxV * w_BxT[..., None]
        return TQROutput(out.logits, h_BxTxD, q_BxTxV, mu_BxT * w_BxT, sigma_BxT * w_BxT, w_BxT)

    def q_summary(self, out: TQROutput, tokens_BxT, beta: float, chunk: int = DEFAULT_CHUNK):
        """What the AVRIL terms and the LM-likelihood metric read from Q, in vocabulary chunks.

        With Q_v(t) = c_t (alpha z_v - L_t), L_t = lse(alpha z(t)) and c_t = w_t when the weighting
        scales Q (weight_heads="both"), else 1:
          Q_a(t) = c_t (alpha z_a - L_t),  lse(beta Q(t)) = lse(beta c_t alpha z(t)) - beta c_t L_t,
        and the LM's own log p(a) = z_a - lse(z). All are per-position functions of z_a and three
        scaled log-sum-exps (`losses.vocab.chunked_logit_stats`), so no [B, T, V] array is formed.
        Only for q_param="lm_logprobs" (the other Q parameterisations need the full rows).

        Args:
          out: this model's output (any `vocab` setting); tokens_BxT: the ids it was run on (the
            action at transition t is y_{t+1}; out-of-range pad ids are clipped, their rows are
            masked by the loss).
          beta: the Boltzmann inverse temperature of the loss (AvaConfig.beta).

        Returns:
          (q_a_BxN, beta_lse_BxN, lm_logp_BxN), N = T - 1: Q(s_t, y_{t+1}), logsumexp(beta Q(s_t, .))
          and the backbone LM's log p(y_{t+1} | y_<=t), all float32.
        """
        if self.heads.q_param != "lm_logprobs":
            raise ValueError(f"q_summary needs model.q_param='lm_logprobs', not {self.heads.q_param!r}")
        bb, alpha = self.backbone, float(self.heads.alpha)
        V = self.cfg.vocab_size
        actions_BxN = jnp.clip(tokens_BxT[:, 1:], 0, V - 1).astype(jnp.int32)
        c_BxN = (out.weights[:, :-1].astype(jnp.float32)
                 if self.weighting is not None and self.heads.weight_heads == "both"
                 else jnp.ones(actions_BxN.shape, jnp.float32))
        ones_BxN = jnp.ones_like(c_BxN)
        columns = [alpha * ones_BxN, beta * alpha * c_BxN] + ([] if alpha == 1.0 else [ones_BxN])
        scales_BxNxK = jnp.stack(columns, axis=-1)
        w, vocab_major = bb.output_matrix()
        z_a_BxN, lse_BxNxK = chunked_logit_stats(out.hidden[:, :-1].astype(self.cfg.jnp_dtype), w, actions_BxN,
                                                 scales_BxNxK, vocab_major=vocab_major, chunk=chunk)
        L_BxN = lse_BxNxK[..., 0]
        q_a_BxN = c_BxN * (alpha * z_a_BxN - L_BxN)
        beta_lse_BxN = lse_BxNxK[..., 1] - beta * c_BxN * L_BxN
        return q_a_BxN, beta_lse_BxN, z_a_BxN - lse_BxNxK[..., -1 if alpha != 1.0 else 0]
