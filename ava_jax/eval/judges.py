"""Gold judges: the true return of a (prompt, response) on a task whose reward is known.

A judge maps prompts and responses (token-id lists; the prompt starts with BOS as the task lays it
out) to float64 gold returns. `SyntheticJudge` is the synthetic MDP's hidden reward, `StoriesJudge`
the stories task's word rule on the decoded text. For user data a trained reward model given by path
is the judge (in the manner of Gao et al. 2022); that one lives with Best-of-N.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ava_jax.data import gold
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
