"""Reference log-probs for DPO-style objectives, computed once per dataset and cached on disk.

The reference policy is frozen, so its summed response log-probs of every training pair are
constants: `ReferenceCache.load_or_compute` computes them in one pass (jitted, batched) and stores
them as `<cache_dir>/<key>.npz`, the key a SHA-256 of the data (every token, prompt length and the
max length), the reference's parameters, the tokenizer's fingerprint and the length settings. A later
run, or a resumed one, with the same inputs reads the file and does no reference forward; any changed
input gives another key, so a stale cache is never read. `attach` puts each batch's rows into
`batch["reference"]` by the batch's `index_B`, which is where the DPO loss reads them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import jax
import numpy as np
from flax import nnx

from ava_jax import xla
from ava_jax.data import eval_batches
from ava_jax.objectives.policy import pair_logprobs, response_logprobs

log = logging.getLogger(__name__)


def data_fingerprint(arrays) -> str:
    """SHA-256 over a PairArrays' tokens and prompt lengths (both sides, in row order) and its max_len."""
    h = hashlib.sha256(f"max_len={arrays.max_len};n={len(arrays)}".encode())
    for side in (arrays.chosen, arrays.rejected):
        h.update(np.asarray(side.prompt_len_N, np.int64).tobytes())
        for t in side.tokens:
            h.update(np.int64(len(t)).tobytes())
            h.update(np.asarray(t, np.int64).tobytes())
    return h.hexdigest()


def params_fingerprint(params) -> str:
    """SHA-256 over every parameter's path, dtype, shape and bytes (the reference checkpoint)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: str(kv[0])):
        x = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


PROBES = ("Once upon a time, the quick brown fox said: 'hello, world!' 123",
          "  Tabs\tand\nnewlines, UNICODE: café, naïve, 東京, 🙂 <s></s> end.")


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers give the same ids: vocabulary size, special ids and the encodings of
    probe strings (so two vocabularies of one size differ), not the class that reads the files (a
    llama2.c tok512 and its exported tokenizer.json agree). "" for None."""
    if tokenizer is None:
        return ""
    return json.dumps({"vocab": tokenizer.vocab_size, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
                       "pad": tokenizer.pad_id, "probes": [list(map(int, tokenizer.encode(p))) for p in PROBES]})


@dataclasses.dataclass(frozen=True)
class ReferenceLogprobs:
    chosen_N: np.ndarray  # float32 [N]: summed response log-probs of each pair's chosen side
    rejected_N: np.ndarray
    key: str
    computed: bool  # False: read from the cache

    def attach(self, batch: dict) -> dict:
        """The batch with `reference = {"chosen_B", "rejected_B"}` for its rows (by `index_B`)."""
        idx = np.asarray(batch["index_B"])
        return {**batch, "reference": {"chosen_B": self.chosen_N[idx], "rejected_B": self.rejected_N[idx]}}


class ReferenceCache:
    """Summed response log-probs of a frozen reference over a dataset, cached under `cache_dir`.

    Args:
      cache_dir: where `<key>.npz` files live ("" disables the disk cache: always computed).
      batch_size, pad_id, pad_to_multiple: batching of the reference's forward passes.
    """

    def __init__(self, cache_dir: str, *, batch_size: int, pad_id: int, pad_to_multiple: int | None):
        self.cache_dir, self.batch_size, self.pad_id, self.pad_to_multiple = cache_dir, batch_size, pad_id, \
            pad_to_multiple
        self.forward_passes = 0  # batches the reference ran in this process (0 after a cache hit)

    def key(self, arrays, params, tokenizer=None, settings: dict | None = None) -> str:
        parts = {"data": data_fingerprint(arrays), "reference": params_fingerprint(params),
                 "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings or {}}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def load_or_compute(self, graphdef, params, arrays, tokenizer=None, settings: dict | None = None):
        """The reference's log-probs of every pair of `arrays` (a PairArrays), from disk when cached."""
        key = self.key(arrays, params, tokenizer, settings)
        path = os.path.join(self.cache_dir, f"{key}.npz") if self.cache_dir else ""
        if path and os.path.exists(path):
            with np.load(path) as f:
                chosen, rejected = f["chosen_N"], f["rejected_N"]
            if chosen.shape == (len(arrays),) and rejected.shape == (len(arrays),):
                log.info("reference log-probs: read %s (%d pairs)", path, len(arrays))
                return ReferenceLogprobs(chosen, rejected, key, computed=False)
            log.warning("reference cache %s holds %s values for %d pairs; recomputing", path, chosen.shape,
                        len(arrays))
        chosen, rejected = self._compute(graphdef, params, arrays)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{path}.tmp.npz"
            np.savez(tmp, chosen_N=chosen, rejected_N=rejected)
            os.replace(tmp, path)  # a killed write never leaves a readable partial file
            log.info("reference log-probs: computed %d pairs, cached at %s", len(arrays), path)
        return ReferenceLogprobs(chosen, rejected, key, computed=True)

    def _compute(self, graphdef, params, arrays):
        chosen, rejected, batches = pair_sequence_logprobs(graphdef, params, arrays, batch_size=self.batch_size,
                                                           pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple)
        self.forward_passes += batches
        return chosen, rejected


# One compiled program per model graph: evaluations along training reuse it (closures would retrace).
@functools.cache
def _sequence_fn(graphdef):
    @xla.jit
    def one(params, batch):
        model = nnx.merge(graphdef, params)
        return response_logprobs(model, batch["tokens_BxT"], batch["mask_BxT"], batch["prompt_len_B"])[0]
    return one


@functools.cache
def _pair_fn(graphdef):
    @xla.jit
    def one(params, batch):
        (c, r), _ = pair_logprobs(nnx.merge(graphdef, params), batch)
        return c, r
    return one


def sequence_logprobs_of(graphdef, params, arrays, *, batch_size: int, pad_id: int, pad_to_multiple: int | None):
    """[N] each row's summed response log-probs under the model's LM, for SeqArrays (demonstrations)."""
    one = _sequence_fn(graphdef)

    out = np.zeros(len(arrays), np.float32)
    for batch, n in eval_batches(arrays, batch_size, pad_id=pad_id, pad_to_multiple=pad_to_multiple):
        out[batch["index_B"][:n]] = np.asarray(one(params, {k: v for k, v in batch.items() if k != "index_B"}))[:n]
    return out


def pair_sequence_logprobs(graphdef, params, arrays, *, batch_size: int, pad_id: int, pad_to_multiple: int | None):
    """(chosen_N, rejected_N, number of batches): each pair's summed response log-probs under the model's
    LM, in row order (jitted; the last short batch padded with repeats of its first row)."""
    one = _pair_fn(graphdef)

    chosen, rejected, batches = np.zeros(len(arrays), np.float32), np.zeros(len(arrays), np.float32), 0
    for batch, n in eval_batches(arrays, batch_size, pad_id=pad_id, pad_to_multiple=pad_to_multiple):
        c, r = jax.device_get(one(params, {"chosen": batch["chosen"], "rejected": batch["rejected"]}))
        idx = batch["index_B"][:n]
        chosen[idx], rejected[idx] = c[:n], r[:n]
        batches += 1
    return chosen, rejected, batches
