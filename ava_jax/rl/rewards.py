"""PPO's reward tensor from a trained reward model: one float32 [B, N] array over response tokens.

`dense` puts AVA's per-token reward mean mu_t on every response token (AVA Eq. 19: the return is
their undiscounted sum); `sparse` puts one sequence score (the reward model's own score: BT's or
PT's, or AVA's `eval.score`, e.g. the summed mu; `reward.score` overrides it, e.g. "last" for
AVA's mu_last) on the last real response token. `reward.pessimism = k` uses mu - k sigma, AVA's own
uncertainty, per token (dense) or on the sequence score (sparse, sigma of the sum).

The rollout layout (`rl.rollout`): tokens [B, P + N], a left-padded prompt of width P then N
generated tokens, right-padded after EOS; `mask` marks real tokens. Response token j sits at column
P + j; its reward is transition P + j - 1 of the reward reader (whose transition t has token t + 1
as its action, with the reading's `reward_align`), and a sequence score lands on the last real
response token found from the mask (`last_index`), never from token ids (pad may equal EOS).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.errors import ConfigError

MODES = ("dense", "sparse")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """`config.reward`: mode, pessimism (k >= 0), score ("" = the reward model's own eval.score)."""

    mode: str = "dense"
    pessimism: float = 0.0
    score: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"reward.mode={self.mode!r} is not one of {MODES}")
        if self.pessimism < 0:
            raise ConfigError(f"reward.pessimism={self.pessimism} must be >= 0")


def last_index(mask_BxN):
    """[B] index of each row's last real token (-1 for a row without one)."""
    n = mask_BxN.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)
    return jnp.max(jnp.where(mask_BxN.astype(bool), idx[None, :], -1), axis=1)


def place_sparse(score_B, mask_BxN):
    """float32 [B, N]: `score_B` at each row's last real token, zero elsewhere."""
    last_B = last_index(mask_BxN)
    hit = jnp.arange(mask_BxN.shape[1])[None, :] == last_B[:, None]
    return jnp.where(hit, jnp.asarray(score_B, jnp.float32)[:, None], 0.0).astype(jnp.float32)


def response_transitions(x_BxN1, prompt_width: int, n: int):
    """The reader's per-transition array [B, T - 1] -> [B, N] over response tokens: transition
    P + j - 1 (state s_{P+j-1}, action token P + j) for response token j."""
    return x_BxN1[:, prompt_width - 1:prompt_width - 1 + n]


def check_reward_model(rm, cfg: RewardConfig) -> None:
    """A ConfigError naming the key when the reward model cannot give what `cfg` asks."""
    obj = rm.objective
    if cfg.mode == "dense" and not obj.uncertainty:
        raise ConfigError(f"reward.mode='dense' needs a reward model with per-token reward means (AVA); "
                          f"{rm.run_dir!r} is {obj.title}, whose per-position outputs are not rewards: use "
                          "reward.mode='sparse'")
    if cfg.pessimism and not obj.uncertainty:
        raise ConfigError(f"reward.pessimism={cfg.pessimism} needs a reward model with an uncertainty (AVA's "
                          f"sigma); {rm.run_dir!r} is {obj.title}")
    if cfg.score and cfg.score not in obj.score_keys:
        raise ConfigError(f"reward.score={cfg.score!r} is not one of {obj.score_keys} for {obj.title}")


@functools.cache
def _reward_fn(graphdef, objective: str, loss_config, score: str, mode: str, pessimism: float):
    from ava_jax import objectives
    obj = objectives.get(objective)
    reader = obj.reward_reader(loss_config) if mode == "dense" else None
    score_fn = obj.score_fn(loss_config, score) if mode == "sparse" else None

    @xla.jit
    def one(params, tokens_BxT, mask_BxT, prompt_len_B, response_mask_BxN):
        model = nnx.merge(graphdef, params)
        side = {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "prompt_len_B": prompt_len_B}
        n = response_mask_BxN.shape[1]
        p = tokens_BxT.shape[1] - n
        m = response_mask_BxN.astype(bool)
        if mode == "dense":
            mu, sigma, _ = reader(model, side)
            mu_BxN = response_transitions(mu, p, n).astype(jnp.float32)
            sigma_BxN = response_transitions(sigma, p, n).astype(jnp.float32)
            r = jnp.where(m, mu_BxN - pessimism * sigma_BxN, 0.0)
            return r, jnp.where(m, mu_BxN, 0.0), jnp.where(m, sigma_BxN, 0.0)
        score_B, sigma_B, _ = score_fn(model, side)
        r = place_sparse(score_B - pessimism * sigma_B, m)
        return r, place_sparse(score_B, m), place_sparse(sigma_B, m)
    return one


def reward_tensor(rm, cfg: RewardConfig, tokens_BxT, mask_BxT, prompt_len_B, response_mask_BxN):
    """(rewards, mu, sigma), each float32 [B, N]: the reward PPO adds to (pessimism applied), and
    the reward model's mean and uncertainty placed the same way (for the logs).

    rm: a `reward_model.TrainedRewardModel` sharing the policy's tokenizer.
    """
    score = cfg.score or rm.config.eval.score
    one = _reward_fn(rm.graphdef, rm.objective.name, rm.loss_config, score, cfg.mode, float(cfg.pessimism))
    return one(rm.params, tokens_BxT, mask_BxT, prompt_len_B, response_mask_BxN)


def dense_stats(mu_BxN, mask_BxN) -> dict:
    """What a length hack looks like (policy.md "Dense per-token rewards"): mean and sd of mu_t over
    response tokens, and the share of each row's reward in the first and the second half of it."""
    m = mask_BxN.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    mean = (mu_BxN * m).sum() / count
    sd = jnp.sqrt((jnp.square(mu_BxN - mean) * m).sum() / count)
    length_B = m.sum(1)
    first = (jnp.arange(mu_BxN.shape[1])[None, :] < (length_B[:, None] / 2)).astype(jnp.float32) * m
    total = jnp.sum(jnp.abs(mu_BxN) * m, 1)
    share_first = jnp.sum(jnp.abs(mu_BxN) * first, 1) / jnp.maximum(total, 1e-12)
    return {"mu_mean": mean, "mu_sd": sd, "abs_share_first_half": share_first.mean(),
            "abs_share_second_half": 1.0 - share_first.mean()}


def per_token_rewards(rm, prompts, responses, *, pad_id: int = 0, prompt_bucket: int = 16) -> list[np.ndarray]:
    """AVA's mu_t for each response token of each (prompt, response) (token lists on the reward
    model's tokenizer), laid out as the rollouts are: for pictures of where the reward goes."""
    from ava_jax.rl.rollout import left_pad
    width = -(-max(map(len, prompts)) // prompt_bucket) * prompt_bucket
    n = max(max(map(len, responses)), 1)
    ptok, pmask = left_pad(prompts, pad_id, width)
    rtok, rmask = np.full((len(responses), n), pad_id, np.int32), np.zeros((len(responses), n), bool)
    for i, r in enumerate(responses):
        rtok[i, :len(r)], rmask[i, :len(r)] = r, True
    tokens, mask = np.concatenate([ptok, rtok], 1), np.concatenate([pmask, rmask], 1)
    _, mu, _ = reward_tensor(rm, RewardConfig(mode="dense"), jnp.asarray(tokens), jnp.asarray(mask),
                             jnp.asarray(pmask.sum(1), jnp.int32), jnp.asarray(rmask))
    mu = np.asarray(mu)
    return [mu[i, :len(r)] for i, r in enumerate(responses)]
