"""Ground-truth preference sets (the synthetic token MDP, the stories task) as the pipeline's PairArrays.

Both tasks return preferences with the same fields (`chosen_tokens_NxT`, `chosen_mask_NxT`,
`chosen_prompt_len_N`, ...), so one conversion and one set of diagnostics serve both.
"""
from __future__ import annotations

import numpy as np

from ava_jax.data.tokenization import PairArrays, SeqArrays


def pair_arrays(prefs) -> PairArrays:
    """The real tokens of every chosen and rejected row, as the tokenised-data layout."""
    def side(prefix):
        tokens, mask, plen = (getattr(prefs, f"{prefix}_{k}") for k in ("tokens_NxT", "mask_NxT", "prompt_len_N"))
        seqs = tuple(np.asarray(t[m.astype(bool)], np.int32) for t, m in zip(tokens, mask))
        return SeqArrays(tokens=seqs, prompt_len_N=np.asarray(plen, np.int32),
                         line_N=np.arange(1, len(seqs) + 1, dtype=np.int32), max_len=tokens.shape[1])
    return PairArrays(chosen=side("chosen"), rejected=side("rejected"))
