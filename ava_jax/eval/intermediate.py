"""Per-token reward means (and sigmas) of a trained model, for plots and the ground-truth diagnostics.

`reader` is an objective's per-transition reward reader (`objectives.get(name).reward_reader(cfg)`):
`reader(model, side) -> (mu_BxN, sigma_BxN, mask_BxN)`, transition t's action being token t+1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.data import make_dataset


def response_rewards(graphdef, params, reader, side: dict):
    """Per-transition reward means and sigmas of one batch side, for plots.

    Args:
      reader: the objective's reward reader.
      side: {"tokens_BxT", "mask_BxT", "prompt_len_B"} arrays (one side of a pair batch).

    Returns:
      (mu_BxN, sigma_BxN, mask_BxN) as NumPy: transition t's action is token t+1; mask marks the
      response transitions. For the baselines sigma is 0.
    """
    side = {k: jnp.asarray(v) for k, v in side.items()}
    return tuple(np.asarray(x) for x in reader(nnx.merge(graphdef, params), side))


def token_reward_means(graphdef, params, reader, arrays, length: int, pad_id: int, batch_size: int):
    """mu[n, t] = the model's reward mean for the transition whose action is token t ([N, length]),
    aligned with the ground-truth tasks' `true_reward[n, t]` (0 off the response)."""
    @jax.jit
    def one(params, side):
        mu_BxN = reader(nnx.merge(graphdef, params), side)[0]
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
