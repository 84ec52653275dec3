"""Padding, length buckets and the checkpointable grain iterator.

A pair batch is a dict of NumPy arrays:
  {"chosen":   {"tokens_BxT": int32, "mask_BxT": int32 (1 = real token), "prompt_len_B": int32},
   "rejected": {... same ...},
   "index_B": int32 (row index into the PairArrays, for tracing a batch back to its rows)}
chosen and rejected share T. A demonstration batch is the inner dict plus "index_B".
Masks come from the sequence lengths, never from token ids (pad may equal eos).
prompt_len_B counts real prompt tokens; with padding_side="left" the prompt starts at
T - len, not at 0, so positions must be derived from the mask.

Length buckets: T = the batch's longest sequence rounded up to a multiple of
`pad_to_multiple` and capped at max_len (or the batch max when pad_to_multiple is None), so a
jitted step compiles once per bucket (at most ceil(max_len / pad_to_multiple) shapes).

Iteration: MapDataset.source -> shuffle(seed) -> repeat(num_epochs) -> batch. grain combines
the seed with the epoch number, so each epoch has a new, deterministic order; batches run
across epoch boundaries (no rows are lost per epoch) and `drop_remainder` only applies to the
end of a finite run. The iterator's `get_state()` / `set_state()` save and restore its
position exactly (a small dict, e.g. {"next_index": 12}).
"""

from __future__ import annotations

import functools
from typing import Sequence

import grain
import jax
import numpy as np

from ava_jax.data.tokenization import PairArrays, SeqArrays

PADDING_SIDES = ("right", "left")


def bucket_length(longest: int, *, pad_to_multiple: int | None, max_len: int) -> int:
    """The padded length T for a batch whose longest sequence has `longest` tokens."""
    if longest > max_len:
        raise ValueError(f"a sequence of {longest} tokens is longer than max_len={max_len}")
    if pad_to_multiple is None:
        return longest
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1 or None, got {pad_to_multiple}")
    return min(-(-longest // pad_to_multiple) * pad_to_multiple, max_len)


def pad_sequences(seqs: Sequence[np.ndarray], prompt_len: Sequence[int], *, length: int,
                  pad_id: int, padding_side: str = "right") -> dict[str, np.ndarray]:
    """Pads ragged int sequences to [B, length]; returns tokens_BxT, mask_BxT, prompt_len_B."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    tokens_BxT = np.full((len(seqs), length), pad_id, np.int32)
    mask_BxT = np.zeros((len(seqs), length), np.int32)
    for b, ids in enumerate(seqs):
        n = len(ids)
        if n > length:
            raise ValueError(f"sequence {b} has {n} tokens, more than the padded length {length}")
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        tokens_BxT[b, sl] = ids
        mask_BxT[b, sl] = 1
    return {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT,
            "prompt_len_B": np.asarray(prompt_len, np.int32).reshape(len(seqs))}


def collate_pairs(examples: Sequence[dict], *, pad_id: int, padding_side: str = "right",
                  pad_to_multiple: int | None = 64, max_len: int, pad_to: int | None = None) -> dict:
    """Examples from the pair source -> one padded pair batch (see the module docstring); `pad_to`
    fixes the padded length (e.g. a global batch's, when this is one process's share)."""
    longest = max(max(len(e["chosen"]), len(e["rejected"])) for e in examples)
    length = pad_to or bucket_length(longest, pad_to_multiple=pad_to_multiple, max_len=max_len)
    pad = functools.partial(pad_sequences, length=length, pad_id=pad_id,
                            padding_side=padding_side)
    return {
        "chosen": pad([e["chosen"] for e in examples],
                      [e["chosen_prompt_len"] for e in examples]),
        "rejected": pad([e["rejected"] for e in examples],
                        [e["rejected_prompt_len"] for e in examples]),
        "index_B": np.asarray([e["index"] for e in examples], np.int32),
    }


def collate_sequences(examples: Sequence[dict], *, pad_id: int, padding_side: str = "right",
                      pad_to_multiple: int | None = 64, max_len: int, pad_to: int | None = None) -> dict:
    """Examples from the sequence source -> one padded demonstration batch (`pad_to` as in collate_pairs)."""
    longest = max(len(e["tokens"]) for e in examples)
    length = pad_to or bucket_length(longest, pad_to_multiple=pad_to_multiple, max_len=max_len)
    batch = pad_sequences([e["tokens"] for e in examples], [e["prompt_len"] for e in examples],
                          length=length, pad_id=pad_id, padding_side=padding_side)
    batch["index_B"] = np.asarray([e["index"] for e in examples], np.int32)
    return batch


class PairSource:
    """Random-access view of PairArrays for grain (one example per row)."""

    def __init__(self, arrays: PairArrays):
        self._a = arrays

    def __len__(self) -> int:
        return len(self._a)

    def __getitem__(self, i: int) -> dict:
        c, r = self._a.chosen, self._a.rejected
        return {"chosen": c.tokens[i], "chosen_prompt_len": int(c.prompt_len_N[i]),
                "rejected": r.tokens[i], "rejected_prompt_len": int(r.prompt_len_N[i]),
                "index": int(i)}


class SeqSource:
    """Random-access view of SeqArrays for grain."""

    def __init__(self, arrays: SeqArrays):
        self._a = arrays

    def __len__(self) -> int:
        return len(self._a)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self._a.tokens[i], "prompt_len": int(self._a.prompt_len_N[i]),
                "index": int(i)}


def _longest(arrays, idx) -> int:
    if isinstance(arrays, PairArrays):
        return int(max(arrays.chosen.len_N[idx].max(), arrays.rejected.len_N[idx].max()))
    return int(arrays.len_N[idx].max())


def _collate_share(idx, *, arrays, source, collate, shard, pad_to_multiple, **kw):
    """The global batch of row indices `idx` -> this process's contiguous share of it, collated to
    the padded length of the whole global batch (every process gets the same T)."""
    idx = np.asarray(idx)
    index, count = shard
    length = bucket_length(_longest(arrays, idx), pad_to_multiple=pad_to_multiple, max_len=arrays.max_len)
    local = len(idx) // count
    return collate([source[int(i)] for i in idx[index * local:(index + 1) * local]], pad_to_multiple=None,
                   pad_to=length, **kw)


def make_dataset(arrays: PairArrays | SeqArrays, batch_size: int, seed: int, *, pad_id: int,
                 padding_side: str = "right", pad_to_multiple: int | None = 64,
                 shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """The batched grain MapDataset behind `make_iterator` (same arguments).

    shard: (process index, process count). Every process walks the same global order of row
    indices in global batches of `batch_size`; process i collates (reads) only rows
    [i * b, (i + 1) * b) of each, b = batch_size / count, padded to the global batch's length, so
    the union of the processes' batches is the global batch, with no row read twice or skipped.
    """
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard={shard}: expected (process index, process count) with 0 <= index < count")
    if batch_size % count:
        raise ValueError(f"the global batch of {batch_size} rows does not divide over {count} processes")
    if len(arrays) == 0:
        raise ValueError("no rows to iterate over")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if isinstance(arrays, PairArrays):
        source, collate = PairSource(arrays), collate_pairs
    elif isinstance(arrays, SeqArrays):
        source, collate = SeqSource(arrays), collate_sequences
    else:
        raise TypeError(f"expected PairArrays or SeqArrays, got {type(arrays).__name__}")
    # Row indices are shuffled and batched; each batch is then read (collated) by its process share.
    ds = grain.MapDataset.range(len(arrays))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the shuffle each epoch
    batch_fn = functools.partial(_collate_share, arrays=arrays, source=source, collate=collate, shard=shard,
                                 pad_to_multiple=pad_to_multiple, pad_id=pad_id, padding_side=padding_side,
                                 max_len=arrays.max_len)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)


def make_iterator(arrays: PairArrays | SeqArrays, batch_size: int, seed: int, *, pad_id: int,
                  padding_side: str = "right", pad_to_multiple: int | None = 64,
                  shuffle: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool = True,
                  read_options: grain.ReadOptions | None = None,
                  shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
    """A deterministic, checkpointable iterator of padded batches.

    Args:
      arrays: PairArrays (pair batches) or SeqArrays (demonstration batches).
      batch_size: rows per batch.
      seed: shuffle seed (0 .. 2**32 - 1); each epoch gets a new order derived from it.
      pad_id: the token id written into padding (may equal eos; masks come from lengths).
      padding_side: "right" (training) or "left" (generation).
      pad_to_multiple: T is rounded up to a multiple of this, capped at max_len; None: batch max.
      shuffle: False keeps row order (evaluation).
      num_epochs: None repeats forever.
      drop_remainder: drop a final short batch (only reachable when num_epochs is finite).
      read_options: grain threads/prefetch; default 2 threads, 8 batches ahead.
      shard: (process index, process count): this process's share of every global batch
        (`make_dataset`); `sharding.process_shard()` gives the running process's.

    Returns:
      A grain DatasetIterator; `it.get_state()` / `it.set_state(state)` save and restore its
      position for checkpoints.
    """
    ds = make_dataset(arrays, batch_size, seed, pad_id=pad_id, padding_side=padding_side,
                      pad_to_multiple=pad_to_multiple, shuffle=shuffle, num_epochs=num_epochs,
                      drop_remainder=drop_remainder, shard=shard)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return iter(ds.to_iter_dataset(read_options))


def fill_rows(batch, batch_size: int):
    """A batch (a pytree of arrays, rows first) of fewer than `batch_size` rows padded to `batch_size`
    with repeats of its first row, so an evaluation's last short batch compiles no extra shape; keep
    only the real rows of what the model returns. A full batch is returned as it is."""
    n = len(jax.tree.leaves(batch)[0])
    if n >= batch_size:
        return batch
    return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], batch_size - n, axis=0)]), batch)


def eval_batches(arrays: PairArrays | SeqArrays, batch_size: int, *, pad_id: int, pad_to_multiple: int | None):
    """Yields (batch, n): every row once, in row order, in batches of exactly `batch_size` rows padded
    to the length buckets of `pad_to_multiple`; the last batch is filled by `fill_rows` and only its
    first n rows are real (`batch["index_B"][:n]` names them)."""
    ds = make_dataset(arrays, batch_size, 0, pad_id=pad_id, pad_to_multiple=pad_to_multiple, shuffle=False,
                      num_epochs=1, drop_remainder=False)
    for batch in ds:
        yield fill_rows(batch, batch_size), batch["index_B"].shape[0]
