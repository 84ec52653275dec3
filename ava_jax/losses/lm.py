"""Next-token cross-entropy (SFT / language-model loss), normalised by the true token count."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """log p(y_{t+1} | y_<=t) for t = 0..T-2, shape [B, T-1]."""
    logits = logits_BxTxV[:, :-1].astype(jnp.float32)
    target_BxT1 = tokens_BxT[:, 1:]
    picked = jnp.take_along_axis(logits, target_BxT1[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def lm_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, loss_mask_BxT: jax.Array):
    """Mean negative log-likelihood of the tokens where `loss_mask` is 1 (the first token is never a target).

    Returns:
      (loss, metrics) with metrics["loss"] = (sum of NLL, number of target tokens).
    """
    return masked_nll(token_logprobs(logits_BxTxV, tokens_BxT), loss_mask_BxT)


def masked_nll(logp_BxT1: jax.Array, loss_mask_BxT: jax.Array):
    """(loss, metrics) of next-token log-probs [B, T-1] (from `token_logprobs` or the chunked
    `Transformer.token_logprobs`) where `loss_mask` [B, T] is 1; the first token is never a target."""
    m_BxT1 = loss_mask_BxT[:, 1:].astype(bool)
    return nll_loss(-jnp.sum(jnp.where(m_BxT1, logp_BxT1, 0.0)), jnp.sum(m_BxT1).astype(jnp.float32))


def nll_loss(nll_sum: jax.Array, count: jax.Array):
    """(loss, metrics) from the summed NLL of the target tokens and their number (`masked_nll`, or
    `Transformer.token_nll` with the shifted loss mask as weights, which skips a recompute)."""
    return nll_sum / jnp.maximum(count, 1.0), {"loss": (nll_sum, count)}
