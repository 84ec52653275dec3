"""Policy objectives on sequence log-probabilities: SFT and the DPO family (method.md section 4;
policy.md "DPO and its variants").

Inputs are per-sequence sums of response-token log-probs (`sequence_logprobs`: prompt and padding
excluded), in float32. Every loss returns (loss, metrics) with (sum, count) float32 metrics and
metrics["loss"] = (loss_sum, count), count being the number of valid pairs (SFT: response tokens).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from ava_jax.losses.lm import nll_loss

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """SFT: the response tokens' negative log-likelihood (no switches)."""


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """DPO and its variants (Rafailov et al. 2023; IPO, Azar et al. 2023; conservative DPO).

    Attributes:
      beta: the KL temperature; > 0 (default 0.1, as Tunix, TRL and EasyDeL). Not AVA's beta.
      loss_type: "sigmoid" (DPO, -log sigmoid(beta delta)), "ipo" ((delta - 1/(2 beta))^2) or
        "hinge" (relu(1 - beta delta), SLiC).
      label_smoothing: eps in [0, 0.5): conservative DPO, -[(1-eps) log sigmoid(beta delta) +
        eps log sigmoid(-beta delta)] (Tunix's form; TRL's "robust" variant also divides by 1 - 2 eps,
        which is not done here). "sigmoid" only.
      reference_free: drop the reference log-probs (delta = log pi(y+) - log pi(y-)).
      ipo_length_norm: IPO on per-token mean log-probs (each sequence's log-ratio divided by its
        response length, as TRL does) when True; on summed log-probs (OpenRLHF) when False.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    ipo_length_norm: bool = True

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DpoConfig.loss_type must be one of {DPO_LOSSES}, got {self.loss_type!r}")
        for name in ("reference_free", "ipo_length_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DpoConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name, ok, what in (("beta", lambda v: v > 0, "> 0"), ("label_smoothing", lambda v: 0 <= v < 0.5,
                                                                  "in [0, 0.5)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not ok(float(value)):
                raise ValueError(f"DpoConfig.{name} must be a finite number {what}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"DpoConfig.label_smoothing applies to loss_type='sigmoid' only, not "
                             f"{self.loss_type!r}")


def response_transitions(response_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """bool [B, T-1]: transition t counts iff its action, token t+1, is a real response token."""
    real = mask_BxT.astype(bool)
    return real[:, :-1] & real[:, 1:] & response_BxT[:, 1:].astype(bool)


def sequence_logprobs(logp_BxN: jax.Array, response_BxT: jax.Array, mask_BxT: jax.Array):
    """([B] sum of response-token log-probs, [B] number of response tokens).

    Args:
      logp_BxN: log pi(token t+1 | tokens <= t), [B, T-1] (`losses.lm.token_logprobs` or the
        chunked `Transformer.token_logprobs`).
      response_BxT: 1 = real response token (`models.positions.token_positions`).
      mask_BxT: 1 = real token (left or right padding; pad may equal EOS).
    """
    m = response_transitions(response_BxT, mask_BxT)
    return (jnp.sum(jnp.where(m, logp_BxN.astype(jnp.float32), 0.0), axis=1),
            jnp.sum(m, axis=1, dtype=jnp.float32))


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def sft_loss(logp_BxN: jax.Array, response_BxT: jax.Array, mask_BxT: jax.Array):
    """SFT: mean negative log-likelihood over response tokens (normaliser: their number)."""
    total_B, count_B = sequence_logprobs(logp_BxN, response_BxT, mask_BxT)
    return sft_loss_terms(-jnp.sum(total_B), jnp.sum(count_B))


def sft_loss_terms(nll: jax.Array, count: jax.Array):
    """SFT's (loss, metrics) from the summed response-token NLL and the number of those tokens (what
    `Transformer.token_nll` gives with `response_transitions` as the weights)."""
    loss, metrics = nll_loss(_f32(nll), _f32(count))
    return loss, {**metrics, "logps/response": (-metrics["loss"][0], metrics["loss"][1])}


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, cfg: DpoConfig, *,
             len_chosen_B=None, len_rejected_B=None, valid_B=None):
    """The DPO-family loss over pairs.

    Args:
      policy_chosen_B, policy_rejected_B: the policy's summed response log-probs.
      ref_chosen_B, ref_rejected_B: the reference's (ignored when cfg.reference_free; may be None then).
      cfg: DpoConfig.
      len_chosen_B, len_rejected_B: response lengths (IPO with ipo_length_norm).
      valid_B: optional bool mask of pairs that count (e.g. padding rows of a last batch).

    Returns:
      (loss, metrics): metrics as TRL and Tunix log them, each a (sum, count) over valid pairs:
      rewards/{chosen, rejected, margin, accuracy} (implicit rewards beta * log-ratio; accuracy =
      chosen reward > rejected reward) and logps/{chosen, rejected} (the policy's summed log-probs).
    """
    pc, pr = _f32(policy_chosen_B), _f32(policy_rejected_B)
    if cfg.reference_free:
        rc = rr = jnp.zeros_like(pc)
    else:
        rc, rr = _f32(ref_chosen_B), _f32(ref_rejected_B)
    ratio_c, ratio_r = pc - rc, pr - rr
    if cfg.loss_type == "ipo" and cfg.ipo_length_norm:
        if len_chosen_B is None or len_rejected_B is None:
            raise ValueError("IPO with ipo_length_norm needs len_chosen_B and len_rejected_B")
        ratio_c = ratio_c / jnp.maximum(_f32(len_chosen_B), 1.0)
        ratio_r = ratio_r / jnp.maximum(_f32(len_rejected_B), 1.0)
    delta = ratio_c - ratio_r
    b = cfg.beta
    if cfg.loss_type == "sigmoid":
        eps = cfg.label_smoothing
        loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(b * delta) - eps * jax.nn.log_sigmoid(-b * delta)
    elif cfg.loss_type == "ipo":
        loss_B = jnp.square(delta - 1.0 / (2.0 * b))
    else:  # hinge
        loss_B = jax.nn.relu(1.0 - b * delta)
    valid = jnp.ones(pc.shape, bool) if valid_B is None else jnp.asarray(valid_B).astype(bool)
    n = jnp.sum(valid, dtype=jnp.float32)

    def total(x):
        return _f32(jnp.sum(jnp.where(valid, x, 0.0))), n

    reward_c, reward_r = b * ratio_c, b * ratio_r
    loss_sum = jnp.sum(jnp.where(valid, loss_B, 0.0))
    metrics = {"loss": (_f32(loss_sum), n), "rewards/chosen": total(reward_c), "rewards/rejected": total(reward_r),
               "rewards/margin": total(reward_c - reward_r),
               "rewards/accuracy": total((reward_c > reward_r).astype(jnp.float32)),
               "logps/chosen": total(pc), "logps/rejected": total(pr)}
    return loss_sum / jnp.maximum(n, 1.0), metrics
