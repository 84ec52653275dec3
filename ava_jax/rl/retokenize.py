"""Rewards from a reward model with another tokenizer than the policy (the paper pairs a GPT-2
reward model with a Llama policy; TRL issue 1979).

The policy's prompt and response are decoded to text and re-encoded with the reward model's
tokenizer (the prompt with its BOS, the response as a continuation), and the reward model scores
its own tokens. `sparse`: its sequence score lands on the policy's last real response token.
`dense`: each reward-model response token's mu goes to the policy token that holds its last
character, found from the end offsets of both tokenisations of the same continuation text, so each
sequence's summed reward is preserved exactly (a reward-model token past the policy's text, from a
decoding mismatch, goes to the last policy token).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla


def char_ends(tokenizer, prefix_ids, ids) -> np.ndarray:
    """[len(ids)] end offset of each token of `ids` in the text it continues after `prefix_ids`
    (cumulative decoding, so a tokenizer that drops a leading space at the start of a text, like
    SentencePiece, still counts it here)."""
    base = len(tokenizer.decode(list(prefix_ids)))
    return np.asarray([len(tokenizer.decode(list(prefix_ids) + list(ids[:j + 1]))) - base for j in range(len(ids))],
                      np.int64)


def map_to_policy(values_K, rm_ends_K, policy_ends_J) -> np.ndarray:
    """[J] float64: each reward-model token's value added to the first policy token whose text ends
    at or after the reward-model token's end (the one holding its last character)."""
    policy_ends_J = np.asarray(policy_ends_J)
    out = np.zeros(len(policy_ends_J), np.float64)
    if len(policy_ends_J) == 0:
        return out
    j = np.searchsorted(policy_ends_J, np.asarray(rm_ends_K), side="left")
    np.add.at(out, np.minimum(j, len(policy_ends_J) - 1), np.asarray(values_K, np.float64))
    return out


class Retokenizer:
    """Policy token ids -> the reward model's token ids of the same text, with both end offsets."""

    def __init__(self, policy_tokenizer, rm_tokenizer):
        self.policy, self.rm = policy_tokenizer, rm_tokenizer

    def convert(self, prompt, response):
        """(rm_prompt ids, rm_response ids, policy end offsets [len(response)], rm end offsets)."""
        prompt_text = self.policy.decode(list(prompt))
        full = self.policy.decode(list(prompt) + list(response))
        continuation = full[len(prompt_text):] if full.startswith(prompt_text) else self.policy.decode(list(response))
        rm_prompt = self.rm.encode(prompt_text, add_bos=self.rm.bos_id is not None)
        rm_response = self.rm.encode_continuation(continuation) if continuation else []
        return (rm_prompt, rm_response, char_ends(self.policy, prompt, response),
                char_ends(self.rm, rm_prompt, rm_response))


@functools.cache
def _rm_rows_fn(graphdef, objective: str, loss_config, score: str, mode: str):
    from ava_jax import objectives
    obj = objectives.get(objective)
    reader = obj.reward_reader(loss_config) if mode == "dense" else None
    score_fn = obj.score_fn(loss_config, score) if mode == "sparse" else None

    @xla.jit
    def one(params, tokens, mask, plen):
        model = nnx.merge(graphdef, params)
        side = {"tokens_BxT": tokens, "mask_BxT": mask, "prompt_len_B": plen}
        if mode == "dense":
            mu, sigma, _ = reader(model, side)
            return mu, sigma
        s, sg, _ = score_fn(model, side)
        return s, sg
    return one


def retokenized_rewards(rm, cfg, retok: Retokenizer, prompts, responses, n: int, *, pad_id: int = 0):
    """(rewards, mu, sigma), float32 [B, n] over the policy's response tokens (see the module docstring)."""
    rows = [retok.convert(p, r) for p, r in zip(prompts, responses)]
    score = cfg.score or rm.config.eval.score
    one = _rm_rows_fn(rm.graphdef, rm.objective.name, rm.loss_config, score, cfg.mode)
    width = -(-max(len(a) + len(b) for a, b, _, _ in rows) // 16) * 16
    b = len(rows)
    tokens, mask = np.full((b, width), pad_id, np.int32), np.zeros((b, width), bool)
    for i, (rp, rr, _, _) in enumerate(rows):
        tokens[i, :len(rp) + len(rr)], mask[i, :len(rp) + len(rr)] = rp + rr, True
    plen = np.asarray([len(rp) for rp, _, _, _ in rows], np.int32)
    a, s = (np.asarray(x, np.float64) for x in one(rm.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(plen)))
    rewards, mu, sigma = (np.zeros((b, n), np.float32) for _ in range(3))
    k = float(cfg.pessimism)
    for i, (rp, rr, pe, re_) in enumerate(rows):
        j = len(responses[i])
        if j == 0:
            continue
        if cfg.mode == "dense":  # rm response token t at position len(rp) + t: transition len(rp) + t - 1
            sl = slice(len(rp) - 1, len(rp) - 1 + len(rr))
            mu_i = map_to_policy(a[i, sl], re_, pe)
            var_i = map_to_policy(np.square(s[i, sl]), re_, pe)  # variances add within a policy token
            mu[i, :j], sigma[i, :j] = mu_i[:j], np.sqrt(var_i[:j])
            rewards[i, :j] = mu_i[:j] - k * np.sqrt(var_i[:j])
        else:
            mu[i, j - 1], sigma[i, j - 1] = a[i], s[i]
            rewards[i, j - 1] = a[i] - k * s[i]
    return rewards, mu, sigma
