"""Per-token reward means (and sigmas) of a trained model, for plots and the synthetic diagnostics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.data import make_dataset
from ava_jax.losses import LossConfig, avril_terms
from ava_jax.models.positions import token_positions
from ava_jax.objectives import avril_inputs


def _transition_rewards(model, cfg: LossConfig, side):
    """(mu_BxN, sigma_BxN, mask_BxN): the reward of transition t, whose action is token t+1.

    AVA objectives read it through `avril_terms`, so `reward_align` is respected; the baselines'
    scalar head at position t+1 is taken as the reward of token t+1 (it has seen that token), with
    sigma 0. mu is zero outside the response transitions.
    """
    out = model(side["tokens_BxT"], side["mask_BxT"])
    if cfg.objective in ("ava_p", "ava_d"):
        terms = avril_terms(*avril_inputs(out, side), cfg)
        mask_BxN = terms["mask_BxN"]
        return jnp.where(mask_BxN, terms["mu_BxN"], 0.0), terms["sigma_BxN"], mask_BxN
    response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    mask_BxN = response_BxT[:, 1:]
    mu_BxN = jnp.where(mask_BxN, out.reward_mean[:, 1:], 0.0)
    return mu_BxN, jnp.zeros_like(mu_BxN), mask_BxN


def response_rewards(graphdef, params, cfg: LossConfig, side: dict):
    """Per-transition reward means and sigmas of one batch side, for plots.

    Args:
      side: {"tokens_BxT", "mask_BxT", "prompt_len_B"} arrays (one side of a pair batch).

    Returns:
      (mu_BxN, sigma_BxN, mask_BxN) as NumPy: transition t's action is token t+1; mask marks the
      response transitions. For the baselines sigma is 0.
    """
    side = {k: jnp.asarray(v) for k, v in side.items()}
    return tuple(np.asarray(x) for x in _transition_rewards(nnx.merge(graphdef, params), cfg, side))


def token_reward_means(graphdef, params, cfg: LossConfig, arrays, length: int, pad_id: int, batch_size: int):
    """mu[n, t] = the model's reward mean for the transition whose action is token t ([N, length]),
    aligned with the synthetic task's `true_reward[n, t]` (0 off the response)."""
    @jax.jit
    def one(params, side):
        mu_BxN = _transition_rewards(nnx.merge(graphdef, params), cfg, side)[0]
        return jnp.pad(mu_BxN, ((0, 0), (1, 0)))

    ds = make_dataset(arrays, batch_size, 0, pad_id=pad_id, pad_to_multiple=None, shuffle=False, num_epochs=1,
                      drop_remainder=False)
    rows = []
    for batch in ds:
        mu = np.asarray(jax.device_get(one(params, batch)))
        full = np.zeros((mu.shape[0], length), np.float32)
        full[:, : min(length, mu.shape[1])] = mu[:, :length]
        rows.append(full)
    return np.concatenate(rows)
