"""Per-token reward means (and sigmas) of a trained model, for plots and the ground-truth diagnostics.

`reader` is an objective's per-transition reward reader (`objectives.get(name).reward_reader(cfg)`):
`reader(model, side) -> (mu_BxN, sigma_BxN, mask_BxN)`, transition t's action being token t+1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import eval_batches


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


def token_columns(reader, model, side):
    """mu [B, 1 + N] of one side, traced inside a jitted function: transition t's mean at column t + 1,
    the column of its action token (column 0, the first token, has none and holds 0)."""
    mu_BxN = reader(model, side)[0]
    return jnp.pad(mu_BxN, ((0, 0), (1, 0)))


def make_token_reward_reader(reader, graphdef):
    """The jitted `(params, side) -> mu [B, 1 + N]` (`token_columns`); build it once per run, as
    `reward.make_pair_scorer`, so every split and side reuses the compiled program."""
    @xla.jit
    def one(params, side):
        return token_columns(reader, nnx.merge(graphdef, params), side)
    return one


def place_token_means(mu_BxM, n: int, length: int) -> np.ndarray:
    """The first n rows of a batch's `token_columns` as float32 [n, length]: cut to `length` columns,
    or zero-filled up to it (a batch is padded to its length bucket, not to the data's length)."""
    mu = np.asarray(mu_BxM)[:n, :length]
    full = np.zeros((n, length), np.float32)
    full[:, : mu.shape[1]] = mu
    return full


def token_reward_means(token_reader, params, arrays, length: int, *, pad_id: int, batch_size: int,
                       pad_to_multiple: int | None):
    """mu[n, t] = the model's reward mean for the transition whose action is token t ([N, length]),
    aligned with the ground-truth tasks' `true_reward[n, t]` (0 off the response).

    token_reader: `make_token_reward_reader`'s function. The rows go in `data.eval_batches`, as the
    pairwise evaluation's do, so a split compiles one program per length bucket, not one per batch
    (the causal model's values at real positions do not depend on the padding after them). For both
    sides of a pair split in the pass that scores them, see `reward.make_pair_scorer`'s `reader`.
    """
    rows = [place_token_means(jax.device_get(token_reader(params, batch)), n, length)
            for batch, n in eval_batches(arrays, batch_size, pad_id=pad_id, pad_to_multiple=pad_to_multiple)]
    return np.concatenate(rows)
