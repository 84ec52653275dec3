"""Gold judges: the true return of a (prompt, response) on a task whose reward is known.

A judge maps prompts and responses (token-id lists; the prompt starts with BOS as the task lays it
out) to float64 gold returns. `SyntheticJudge` is the synthetic MDP's hidden reward, `StoriesJudge`
the stories task's word rule on the decoded text, `RewardModelJudge` a trained reward model given by
its run directory: for user data without a gold reward, one trained on more data than the policies
saw stands in for it (in the manner of Gao et al. 2022).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import fill_rows, gold
from ava_jax.data import synthetic as syn


class SyntheticJudge:
    """sum_t r*(prev token, token t) + target bonus over the response (invalid tokens penalised,
    `synthetic.true_token_rewards`), for responses of any length."""

    name = "synthetic true reward"

    def __init__(self, task: syn.SyntheticTask):
        self.task = task

    def __call__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> np.ndarray:
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        width = max(map(len, rows))
        tokens = np.full((len(rows), width), syn.EOS_ID, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], mask[i, :len(row)] = row, True
        plen = np.asarray([len(p) for p in prompts])
        return syn.true_token_rewards(self.task, tokens, mask, plen).sum(axis=1)


class StoriesJudge:
    """The stories gold rule (`data.gold`) on each response's pieces, as the task scores its data."""

    name = "stories gold reward"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict = {}

    def __call__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> np.ndarray:
        out = np.zeros(len(prompts))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            # Pieces of the whole stream, so the response's first piece keeps its leading space.
            pieces = gold.token_pieces_cached(self.tokenizer, list(p) + list(r), self._cache)[len(p):]
            out[i] = gold.gold_token_rewards(pieces).sum()
        return out


@functools.cache
def _score_fn(graphdef, objective: str, loss_config, score: str):
    """The jitted sequence scorer of one reward model, compiled once however often it judges."""
    from ava_jax import objectives
    score_fn = objectives.get(objective).score_fn(loss_config, score)

    @xla.jit
    def one(params, tokens, mask, plen):
        side = {"tokens_BxT": tokens, "mask_BxT": mask, "prompt_len_B": plen}
        return score_fn(nnx.merge(graphdef, params), side)[0]
    return one


def score_sequences(rm, prompts, responses, *, pad_id: int, batch_size: int) -> np.ndarray:
    """[N] a trained reward model's (`reward_model.load_trained`) score of each (prompt, response), as
    its run scored pairs (its eval.score)."""
    one = _score_fn(rm.graphdef, rm.objective.name, rm.loss_config, rm.config.eval.score)

    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = -(-max(map(len, rows)) // 16) * 16
    tokens, mask = np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    plen = np.asarray([len(p) for p in prompts], np.int32)
    out = []
    for i in range(0, len(rows), batch_size):
        sl = slice(i, i + batch_size)
        n = len(tokens[sl])
        batch = fill_rows((tokens[sl], mask[sl], plen[sl]), batch_size)
        out.append(np.asarray(one(rm.params, *map(jnp.asarray, batch)))[:n])
    return np.concatenate(out).astype(np.float64)


class RewardModelJudge:
    """A finished reward-model run as the gold judge (`eval.judge=RUN_DIR` in the direct pipeline)."""

    BATCH_SIZE = 64

    def __init__(self, trained, *, pad_id: int, batch_size: int = BATCH_SIZE):
        self.trained, self.pad_id, self.batch_size = trained, pad_id, batch_size
        self.name = f"reward model {trained.run_dir}"

    def __call__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> np.ndarray:
        return score_sequences(self.trained, prompts, responses, pad_id=self.pad_id, batch_size=self.batch_size)
