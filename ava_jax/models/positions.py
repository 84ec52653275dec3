"""Where the response is, and where each sequence ends.

Reading a reward at a PAD position instead of the last real token, or treating an EOS as padding
when pad == eos, is the classic bug of reward models and PPO stacks. Everything here is derived from
the explicit padding mask and prompt lengths; token ids are never compared with a pad id.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_positions(tokens_BxT: jax.Array, mask_BxT: jax.Array, prompt_len_B: jax.Array):
    """Maps a padded batch to its per-token response mask and the index of each last real token.

    Args:
      tokens_BxT: token ids (only their shape is used: pad may equal eos).
      mask_BxT: 1 where the token is real (prompt or response), 0 on padding, on either side.
      prompt_len_B: number of real prompt tokens in each row.

    Returns:
      (response_mask_BxT, last_idx_B): response_mask is True on the real tokens after the prompt;
      last_idx is the index of the last real token (0 for a row with no real token).
    """
    if tokens_BxT.shape != mask_BxT.shape:
        raise ValueError(f"tokens shape {tokens_BxT.shape} != mask shape {mask_BxT.shape}")
    valid_BxT = mask_BxT.astype(bool)
    # Rank of each real token among the real tokens of its row: 0 for the first real token.
    rank_BxT = jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1
    response_BxT = valid_BxT & (rank_BxT >= jnp.asarray(prompt_len_B, jnp.int32)[:, None])
    T = mask_BxT.shape[1]
    idx_T = jnp.arange(T, dtype=jnp.int32)
    last_idx_B = jnp.max(jnp.where(valid_BxT, idx_T[None, :], 0), axis=1)
    return response_BxT, last_idx_B


def gather_last(x_BxT: jax.Array, last_idx_B: jax.Array) -> jax.Array:
    """x[b, last_idx[b]] for every row."""
    return jnp.take_along_axis(x_BxT, last_idx_B[:, None].astype(jnp.int32), axis=1)[:, 0]
