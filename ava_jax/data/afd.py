"""AfD pairs from demonstrations (Sun and van der Schaar 2024, the "Init-SFT" reading of method.md):
for each demonstration prompt, chosen = a sample of the SFT policy, rejected = a sample of the initial
policy. "DPO w/ AfD" and "AVA-p w/ AfD" (paper Table 5) are those objectives on these pairs.
"""
from __future__ import annotations

import numpy as np

from ava_jax.data.tokenization import PairArrays, SeqArrays


def _prompts(arrays: SeqArrays) -> list[list[int]]:
    return [[int(t) for t in tokens[:plen]] for tokens, plen in zip(arrays.tokens, arrays.prompt_len_N)]


def afd_pairs(demos: SeqArrays, sft_backbone, initial_backbone, sampling, key, *, batch_size: int) -> PairArrays:
    """One Init-SFT pair per demonstration prompt (the demonstration itself is not used).

    Args:
      demos: the demonstrations whose prompts are answered.
      sft_backbone, initial_backbone: the two policies' LMs (`Transformer`s).
      sampling: the task's SamplingConfig (both policies sample alike).
      key: PRNG key; the two policies use fold_in(key, 0) and fold_in(key, 1).
      batch_size: rows per sampling call.
    """
    import jax

    from ava_jax.eval.policy import sample_responses
    prompts = _prompts(demos)
    chosen = sample_responses(sft_backbone, prompts, jax.random.fold_in(key, 0), sampling, 1, batch_size)
    rejected = sample_responses(initial_backbone, prompts, jax.random.fold_in(key, 1), sampling, 1, batch_size)

    def side(samples):
        seqs = tuple(np.asarray(p + r, np.int32) for p, r in zip(prompts, samples.responses))
        return SeqArrays(tokens=seqs, prompt_len_N=np.asarray([len(p) for p in prompts], np.int32),
                         line_N=np.asarray(demos.line_N, np.int32),
                         max_len=max(demos.max_len, max(len(s) for s in seqs)))
    c, r = side(chosen), side(rejected)
    width = max(c.max_len, r.max_len)
    return PairArrays(chosen=SeqArrays(c.tokens, c.prompt_len_N, c.line_N, width),
                      rejected=SeqArrays(r.tokens, r.prompt_len_N, r.line_N, width))
