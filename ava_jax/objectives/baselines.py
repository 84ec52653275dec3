"""The reward-model baselines: Bradley-Terry and the Preference Transformer (method.md section 3)."""
from __future__ import annotations

import jax.numpy as jnp

from ava_jax.losses import (BradleyTerryConfig, PreferenceTransformerConfig, bradley_terry_loss,
                            preference_transformer_loss)
from ava_jax.models.positions import token_positions
from ava_jax.objectives.forward import forward_pair, last_reward
from ava_jax.objectives.registry import Objective, register


def _no_lm(side):
    """(sigma_B, lm_B) of a baseline: no uncertainty, and the LM head is neither trained nor computed."""
    zeros = jnp.zeros(side["tokens_BxT"].shape[:1], jnp.float32)
    return zeros, zeros + jnp.nan


def make_bt_loss(cfg: BradleyTerryConfig):
    del cfg

    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        out_c, out_r = forward_pair(model, batch)
        return bradley_terry_loss(last_reward(out_c, batch["chosen"]), last_reward(out_r, batch["rejected"]))
    return loss_fn


def make_bt_score(cfg: BradleyTerryConfig, score: str = "last"):
    del cfg, score

    def score_fn(model, side):
        return (last_reward(model(side["tokens_BxT"], side["mask_BxT"]), side), *_no_lm(side))
    return score_fn


def make_pt_loss(cfg: PreferenceTransformerConfig):
    del cfg

    def loss_fn(model, batch, rng, frozen):
        del rng, frozen
        # reward_mean already carries w_t (TQR multiplies the head by the weighting), so the score
        # sum_t w_t r_t is the plain sum of reward_mean over real positions.
        out_c, out_r = forward_pair(model, batch)
        c, r = batch["chosen"], batch["rejected"]
        ones_c, ones_r = jnp.ones_like(out_c.reward_mean), jnp.ones_like(out_r.reward_mean)
        return preference_transformer_loss(out_c.reward_mean, ones_c, out_r.reward_mean, ones_r,
                                           c["mask_BxT"], r["mask_BxT"])
    return loss_fn


def make_pt_score(cfg: PreferenceTransformerConfig, score: str = "last"):
    del cfg, score

    def score_fn(model, side):
        out = model(side["tokens_BxT"], side["mask_BxT"])
        return (jnp.sum(jnp.where(side["mask_BxT"].astype(bool), out.reward_mean, 0.0), axis=1), *_no_lm(side))
    return score_fn


def make_scalar_reward_reader(cfg):
    """The scalar head at position t+1 as the reward of token t+1 (it has seen that token), sigma 0."""
    del cfg

    def reader(model, side):
        out = model(side["tokens_BxT"], side["mask_BxT"])
        response_BxT, _ = token_positions(side["tokens_BxT"], side["mask_BxT"], side["prompt_len_B"])
        mask_BxN = response_BxT[:, 1:]
        mu_BxN = jnp.where(mask_BxN, out.reward_mean[:, 1:], 0.0)
        return mu_BxN, jnp.zeros_like(mu_BxN), mask_BxN
    return reader


BT = register(Objective(
    name="bt", title="BT", equation="method.md section 3 (Bradley-Terry on the reward at the last token)",
    kinds=("reward_model",), data="pairs", config_cls=BradleyTerryConfig, make_loss=make_bt_loss,
    make_score=make_bt_score, make_reward_reader=make_scalar_reward_reader,
    # A scalar reward at the last token: no weighting over positions (method.md section 1).
    defaults={"reward_model": {"model": {"reward_weighting": "none"}}}))

PT = register(Objective(
    name="pt", title="PT", equation="method.md section 3 (Preference Transformer: sum_t w_t r_t)",
    kinds=("reward_model",), data="pairs", config_cls=PreferenceTransformerConfig, make_loss=make_pt_loss,
    make_score=make_pt_score, make_reward_reader=make_scalar_reward_reader))
