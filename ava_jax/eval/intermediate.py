"""Per-token reward means of a trained model, aligned with the synthetic task's true rewards."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.data import make_dataset
from ava_jax.losses import LossConfig, avril_terms
from ava_jax.objectives import avril_inputs


def token_reward_means(graphdef, params, cfg: LossConfig, arrays, length: int, pad_id: int, batch_size: int):
    """mu[n, t] = the model's reward mean for the transition whose action is token t ([N, length]).

    AVA objectives read it through `avril_terms`, so `reward_align` is respected; the baselines'
    scalar head at position t is taken as the reward of token t (it has seen that token).
    """
    @jax.jit
    def one(params, side):
        model = nnx.merge(graphdef, params)
        out = model(side["tokens_BxT"], side["mask_BxT"])
        if cfg.objective in ("ava_p", "ava_d"):
            terms = avril_terms(*avril_inputs(out, side), cfg)
            mu_BxN = jnp.where(terms["mask_BxN"], terms["mu_BxN"], 0.0)
            return jnp.pad(mu_BxN, ((0, 0), (1, 0)))
        return jnp.where(side["mask_BxT"].astype(bool), out.reward_mean, 0.0)

    ds = make_dataset(arrays, batch_size, 0, pad_id=pad_id, pad_to_multiple=None, shuffle=False, num_epochs=1,
                      drop_remainder=False)
    rows = []
    for batch in ds:
        side = batch
        mu = np.asarray(jax.device_get(one(params, side)))
        full = np.zeros((mu.shape[0], length), np.float32)
        full[:, : min(length, mu.shape[1])] = mu[:, :length]
        rows.append(full)
    return np.concatenate(rows)


def response_rewards(graphdef, params, cfg: LossConfig, side: dict):
    """Per-transition reward means and sigmas of one batch side, for plots.

    Args:
      side: {"tokens_BxT", "mask_BxT", "prompt_len_B"} arrays (one side of a pair batch).

    Returns:
      (mu_BxN, sigma_BxN, mask_BxN) as NumPy: transition t's action is token t+1; mask marks the
      response transitions. For the baselines sigma is 0.
    """
    model = nnx.merge(graphdef, params)
    out = model(jnp.asarray(side["tokens_BxT"]), jnp.asarray(side["mask_BxT"]))
    side = {k: jnp.asarray(v) for k, v in side.items()}
    if cfg.objective in ("ava_p", "ava_d"):
        terms = avril_terms(*avril_inputs(out, side), cfg)
        return tuple(np.asarray(terms[k]) for k in ("mu_BxN", "sigma_BxN", "mask_BxN"))
    from ava_jax.models.positions import token_positions
    response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
    mu = np.asarray(out.reward_mean[:, 1:])
    return mu, np.zeros_like(mu), np.asarray(response_BxT[:, 1:])
