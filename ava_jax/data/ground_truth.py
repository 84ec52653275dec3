"""Ground-truth preference sets (the synthetic token MDP, the stories task) as the pipeline's PairArrays.

Both tasks return preferences with the same fields (`chosen_tokens_NxT`, `chosen_mask_NxT`,
`chosen_prompt_len_N`, ...), so one conversion and one set of diagnostics serve both.
"""
from __future__ import annotations

import numpy as np

from ava_jax.data.tokenization import PairArrays, SeqArrays


def seq_arrays(tokens_NxT, mask_NxT, prompt_len_N) -> SeqArrays:
    """Right-padded rows -> the ragged tokenised layout (real tokens only)."""
    tokens_NxT, mask_NxT = np.asarray(tokens_NxT), np.asarray(mask_NxT)
    seqs = tuple(np.asarray(t[m.astype(bool)], np.int32) for t, m in zip(tokens_NxT, mask_NxT))
    return SeqArrays(tokens=seqs, prompt_len_N=np.asarray(prompt_len_N, np.int32),
                     line_N=np.arange(1, len(seqs) + 1, dtype=np.int32), max_len=tokens_NxT.shape[1])


def demonstration_arrays(demos) -> SeqArrays:
    """A ground-truth task's demonstrations (`SyntheticDemonstrations`, `StoriesDemonstrations`)."""
    return seq_arrays(demos.tokens_NxT, demos.mask_NxT, demos.prompt_len_N)


def pair_arrays(prefs) -> PairArrays:
    """The real tokens of every chosen and rejected row, as the tokenised-data layout."""
    def side(prefix):
        return seq_arrays(*(getattr(prefs, f"{prefix}_{k}") for k in ("tokens_NxT", "mask_NxT", "prompt_len_N")))
    return PairArrays(chosen=side("chosen"), rejected=side("rejected"))
