"""Preference and demonstration data: read + validate -> split -> tokenise -> batch.

    rows, read_report = read_preferences(path, "hh", on_bad_row="skip")
    splits, read_report = split_hh()                      # bundled HH harmless-base file
    arrays, tok_report = tokenize_pairs(splits["train"], tokenizer, max_len=512)
    it = make_iterator(arrays, batch_size=16, seed=0, pad_id=tokenizer.pad_id)
    batch = next(it); state = it.get_state()               # save with the checkpoint

`ava_jax.data.tfds_builder` (needs tensorflow-datasets, not imported here) prepares a JSONL
file as an array_record TFDS dataset that grain reads. `ava_jax.data.synthetic` holds the
ground-truth synthetic MDP.
"""

from ava_jax.data.batching import (bucket_length, collate_pairs, collate_sequences, eval_batches, fill_rows,
                                   make_dataset, make_iterator, pad_sequences)
from ava_jax.data.readers import (DemonstrationRow, PreferenceRow, ReadReport, read_demonstrations,
                                  read_preferences)
from ava_jax.data.splits import (HH_HARMLESS_BAD_COUNTS, HH_HARMLESS_BASE_TEST,
                                 HH_HARMLESS_SPLIT_SIZES, SPLIT_BY, hash_unit, split_hh,
                                 split_preferences, split_rows)
from ava_jax.data.tokenization import (PairArrays, SeqArrays, TokenizeReport, build_sequence,
                                       tokenize_demonstrations, tokenize_pairs)
from ava_jax.data.validate import BAD_ROW_REASONS, DataError

__all__ = [
    "BAD_ROW_REASONS", "DataError", "DemonstrationRow", "HH_HARMLESS_BAD_COUNTS",
    "HH_HARMLESS_BASE_TEST", "HH_HARMLESS_SPLIT_SIZES", "PairArrays", "PreferenceRow",
    "ReadReport", "SPLIT_BY", "SeqArrays", "TokenizeReport", "build_sequence", "bucket_length",
    "collate_pairs", "collate_sequences", "hash_unit", "make_dataset", "make_iterator",
    "pad_sequences", "read_demonstrations", "read_preferences", "split_hh", "split_preferences",
    "split_rows", "tokenize_demonstrations", "tokenize_pairs",
]
