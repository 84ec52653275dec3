"""Baseline reward-model objectives: Bradley-Terry and Preference Transformer (method.md section 3).

Both are sequence-level: the normaliser is the number of (valid) pairs. Metrics are (sum, count)
float32 pairs with metrics["loss"] = (loss_sum, count), loss == loss_sum / count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ava_jax.models.positions import gather_last  # noqa: F401  re-exported: r at the last real token


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _pair_mask(pair_mask_B, r_B):
    if pair_mask_B is None:
        return jnp.ones(r_B.shape, bool)
    return jnp.asarray(pair_mask_B).astype(bool)


def _pair_metrics(loss_B, margin_B, valid_B):
    n_pairs = jnp.sum(valid_B, dtype=loss_B.dtype)
    loss_sum = jnp.sum(loss_B)
    metrics = {
        "loss": (_f32(loss_sum), _f32(n_pairs)),
        "accuracy": (_f32(jnp.sum(valid_B & (margin_B > 0))), _f32(n_pairs)),
        "margin": (_f32(jnp.sum(margin_B)), _f32(n_pairs)),
    }
    return loss_sum / jnp.maximum(n_pairs, 1.0), metrics


def bradley_terry_loss(r_chosen_B, r_rejected_B, pair_mask_B=None):
    """Bradley-Terry reward-model loss: mean over pairs of -log sigmoid(r(y+) - r(y-)).

    Args:
      r_chosen_B: scalar reward of y+ (e.g. `gather_last` at its last real token).
      r_rejected_B: scalar reward of y-.
      pair_mask_B: optional, 1 = real pair (batch filler pairs 0; their values may be anything).

    Returns:
      (loss, metrics): "loss", "accuracy" (r(y+) > r(y-)), "margin" (r(y+) - r(y-)), per pair.
    """
    valid_B = _pair_mask(pair_mask_B, r_chosen_B)
    dtype = jnp.promote_types(jnp.result_type(r_chosen_B, r_rejected_B), jnp.float32)
    margin_B = jnp.where(valid_B, r_chosen_B.astype(dtype) - r_rejected_B.astype(dtype), 0.0)
    # log_sigmoid is the stable softplus form; it stays finite for large negative margins.
    loss_B = jnp.where(valid_B, -jax.nn.log_sigmoid(margin_B), 0.0)
    return _pair_metrics(loss_B, margin_B, valid_B)


def preference_transformer_loss(r_chosen_BxT, w_chosen_BxT, r_rejected_BxT, w_rejected_BxT,
                                mask_chosen_BxT, mask_rejected_BxT, label_B=1.0,
                                pair_mask_B=None):
    """Preference Transformer loss (Kim et al. 2023; AVA Eq. 11 weighting, method.md section 3).

    score(y) = sum_t w_t r_t over real positions; the loss is the 2-way softmax cross-entropy
    between softmax([score(y+), score(y-)]) and the soft label [label, 1 - label]:
      -( label * log sigmoid(d) + (1 - label) * log sigmoid(-d) ),  d = score(y+) - score(y-).

    Args:
      r_chosen_BxT, w_chosen_BxT: per-position rewards and weights of y+.
      r_rejected_BxT, w_rejected_BxT: same for y- (T may differ).
      mask_chosen_BxT, mask_rejected_BxT: 1 = position enters the score.
      label_B: P(y+ preferred), scalar or [B], in [0, 1]; 1.0 = hard label, 0.5 = tie.
      pair_mask_B: optional, 1 = real pair.

    Returns:
      (loss, metrics): "loss", "accuracy" (score(y+) > score(y-)), "margin" (score difference),
      per pair.
    """
    valid_B = _pair_mask(pair_mask_B, r_chosen_BxT[:, 0])
    dtype = jnp.promote_types(
        jnp.result_type(r_chosen_BxT, w_chosen_BxT, r_rejected_BxT, w_rejected_BxT), jnp.float32)

    def score(r_BxT, w_BxT, mask_BxT):
        keep_BxT = mask_BxT.astype(bool) & valid_B[:, None]
        # Mask both factors before the product: where(mask, w * r, 0) would still send 0 * NaN
        # into the gradient of w and r at padded positions.
        r_BxT = jnp.where(keep_BxT, r_BxT.astype(dtype), 0.0)
        w_BxT = jnp.where(keep_BxT, w_BxT.astype(dtype), 0.0)
        return jnp.sum(w_BxT * r_BxT, axis=1)

    margin_B = (score(r_chosen_BxT, w_chosen_BxT, mask_chosen_BxT)
                - score(r_rejected_BxT, w_rejected_BxT, mask_rejected_BxT))
    label_B = jnp.broadcast_to(jnp.asarray(label_B, dtype), margin_B.shape)
    # A filler pair's label may be anything; keep it out of the product's gradient too.
    label_B = jnp.where(valid_B, label_B, 1.0)
    # Cross-entropy of the two-class softmax, written with log_sigmoid for stability.
    loss_B = -(label_B * jax.nn.log_sigmoid(margin_B)
               + (1.0 - label_B) * jax.nn.log_sigmoid(-margin_B))
    loss_B = jnp.where(valid_B, loss_B, 0.0)
    return _pair_metrics(loss_B, margin_B, valid_B)
