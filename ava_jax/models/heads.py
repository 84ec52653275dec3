"""The TQR heads on top of the backbone's last hidden states (method.md section 1)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

Q_PARAMS = ("lm_logprobs", "lm_probs", "fresh")
SIGMA_TRANSFORMS = ("softplus", "exp")
REWARD_WEIGHTINGS = ("attention", "none")
WEIGHT_NORMS = ("mean", "sum")
WEIGHT_HEADS = ("both", "reward")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """TQR head options; field names are the `model.*` config keys of method.md."""

    q_param: str = "lm_logprobs"
    alpha: float = 1.0  # Q = log_softmax(alpha * z): softmax(Q) is the LM policy at temperature 1/alpha
    sigma_transform: str = "softplus"
    sigma_floor: float = 1e-4
    reward_weighting: str = "attention"
    weight_dim: int | None = None  # width of the weighting attention; default d_model
    # How w_t is scaled before it multiplies the heads (a reading the paper leaves open):
    # "sum": w sums to 1 over a sequence's real tokens, as printed; then Q is about logpi / T and the
    #   pretrained Boltzmann policy is flattened to near uniform (measured on HH + TinyStories: the
    #   chosen log-likelihood sat at -6.22 = -log 512 from the first step).
    # "mean" (default): w times the number of real tokens, so the average weight is 1 and uniform
    #   attention leaves the heads unchanged.
    weight_norm: str = "mean"
    # Which heads w_t multiplies. "both" (AVA Eq. 11 as printed): Q and the reward. Because w_t comes
    # from bidirectional attention, Q(s_t, .) * w_t then depends on tokens after t, the action
    # included: a non-causal "policy" that cannot be sampled. "reward": only the reward head, so Q
    # stays causal (needed wherever Q acts as a policy; method.md section 6).
    weight_heads: str = "both"
    # Starting sigma of the reward head (its bias is set so sigma = sigma_init at h = 0); None keeps
    # a zero bias (softplus(0) = 0.69). A start near the rms TD error keeps TD from dominating early.
    sigma_init: float | None = None

    def __post_init__(self):
        for field, value, allowed in (("model.q_param", self.q_param, Q_PARAMS),
                                      ("model.sigma_transform", self.sigma_transform, SIGMA_TRANSFORMS),
                                      ("model.reward_weighting", self.reward_weighting, REWARD_WEIGHTINGS),
                                      ("model.weight_norm", self.weight_norm, WEIGHT_NORMS),
                                      ("model.weight_heads", self.weight_heads, WEIGHT_HEADS)):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")
        if self.sigma_init is not None and not self.sigma_init > self.sigma_floor:
            raise ValueError(f"model.sigma_init={self.sigma_init!r} must be > the sigma floor {self.sigma_floor}")


class QHead(nnx.Module):
    """Q(s_t, .) over the vocabulary.

    "lm_logprobs": Q = log_softmax(alpha * z_t) (invariant to a per-state shift of the logits, so TD
    errors are well defined); "lm_probs": the paper's literal Eq. 12, Q = log_softmax(alpha *
    softmax(z_t)); "fresh": a new randomly initialised linear head on h_t (the "w/o ptq" ablation).
    """

    def __init__(self, cfg: HeadConfig, d_model: int, vocab_size: int, rngs: nnx.Rngs):
        self.q_param, self.alpha = cfg.q_param, cfg.alpha
        self.kernel = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_model, vocab_size)))
                       if cfg.q_param == "fresh" else None)

    def __call__(self, h_BxTxD, logits_BxTxV):
        if self.q_param == "fresh":
            return (h_BxTxD.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32))
        z = logits_BxTxV.astype(jnp.float32)
        if self.q_param == "lm_probs":
            z = jax.nn.softmax(z, axis=-1)
        return jax.nn.log_softmax(self.alpha * z, axis=-1)


def _raw_sigma(cfg: HeadConfig) -> float:
    """The raw output whose sigma transform gives cfg.sigma_init (0.0 when it is None)."""
    if cfg.sigma_init is None:
        return 0.0
    if cfg.sigma_transform == "exp":
        return math.log(cfg.sigma_init)
    y = cfg.sigma_init - cfg.sigma_floor  # softplus^-1(y) = y + log(1 - exp(-y))
    return y + math.log(-math.expm1(-y))


class RewardHead(nnx.Module):
    """Gaussian reward per position: [mu_t, raw_t] = Linear(h_t), sigma_t = softplus(raw_t) + floor."""

    def __init__(self, cfg: HeadConfig, d_model: int, rngs: nnx.Rngs):
        self.sigma_transform, self.sigma_floor = cfg.sigma_transform, cfg.sigma_floor
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_model, 2)))
        self.bias = nnx.Param(jnp.asarray([0.0, _raw_sigma(cfg)], jnp.float32))

    def __call__(self, h_BxTxD):
        out_BxTx2 = h_BxTxD.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
        mu_BxT, raw_BxT = out_BxTx2[..., 0], out_BxTx2[..., 1]
        if self.sigma_transform == "softplus":
            sigma_BxT = jax.nn.softplus(raw_BxT) + self.sigma_floor
        else:  # AVRIL's reference code parameterises log sigma
            sigma_BxT = jnp.exp(raw_BxT)
        return mu_BxT, sigma_BxT


class RewardWeighting(nnx.Module):
    """Single-head bidirectional attention giving w_t = mean_i softmax_t(q_i . k_t / sqrt(d)).

    The Preference Transformer's weighting (AVA Eq. 11). Padding keys get no weight and padding
    queries do not vote, so w sums to 1 over the real tokens of each row ("sum"), or averages 1
    ("mean", the default; see HeadConfig.weight_norm).
    """

    def __init__(self, d_model: int, weight_dim: int, rngs: nnx.Rngs, weight_norm: str = "mean"):
        self.weight_norm = weight_norm
        self.wq = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_model, weight_dim)))
        self.wk = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_model, weight_dim)))

    def __call__(self, h_BxTxD, mask_BxT):
        h = h_BxTxD.astype(jnp.float32)
        q_BxTxW, k_BxTxW = h @ self.wq[...], h @ self.wk[...]
        scores_BxTxT = jnp.einsum("biw,btw->bit", q_BxTxW, k_BxTxW) / jnp.sqrt(q_BxTxW.shape[-1])
        valid_BxT = mask_BxT.astype(bool)
        scores_BxTxT = jnp.where(valid_BxT[:, None, :], scores_BxTxT, -jnp.inf)
        # A row with no real token would be all -inf; give it uniform scores (its weights are masked anyway).
        scores_BxTxT = jnp.where(valid_BxT.any(axis=1)[:, None, None], scores_BxTxT, 0.0)
        attn_BxTxT = jax.nn.softmax(scores_BxTxT, axis=-1)
        n_queries_B = jnp.maximum(valid_BxT.sum(axis=1), 1)
        w_BxT = jnp.sum(jnp.where(valid_BxT[:, :, None], attn_BxTxT, 0.0), axis=1) / n_queries_B[:, None]
        if self.weight_norm == "mean":
            w_BxT = w_BxT * n_queries_B[:, None]
        return jnp.where(valid_BxT, w_BxT, 0.0)
