"""Real-text ground truth: TinyStories-260K continuations scored by a shipped word rule (docs/stories.md).

Responses are sampled from the bundled TinyStories-260K model after short templated story openings.
A fixed gold rule on the decoded text gives every response a per-token reward, so true intermediate
rewards exist on real text, and preference pairs labelled by Bradley-Terry on the gold returns have
an exactly known Bayes-optimal accuracy.

Gold rule: `ava_jax.data.gold` (a lexicon of joyful and sad words, negation flipping the next one,
each scored word's reward at the token completing it). Whether a word has ended is only known from the
next character, so the reward at token t can depend on whether token t+1 continues the word ("fun" +
"ny"); text ends a word, also at the end of a truncated response.
Only the response is scored; prompts end a sentence, so no word or negation crosses into it.

Token stream (right padding, pad == EOS id 2; masks, not ids, mark padding):
    [BOS, p_1 .. p_P, y_1 .. y_H, pad ...]   prompt_len_N = 1 + P,  T = PROMPT_BUCKET + H
Every response has exactly H = response_len tokens: BOS and EOS are banned while sampling, so neither
length nor EOS can decide a label. true_reward_NxT[n, t] is the gold reward of the action token t.

Splits: `StoriesConfig.split` picks train/validation/test prompts by `splits.hash_unit(prompt,
SPLIT_SALT)` over DEFAULT_FRACTIONS, so the three splits never share a prompt, whatever the seeds.
`seed` draws the prompts, `data_seed` the sampled responses and labels.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import tempfile

import numpy as np

from ava_jax.data import splits
from ava_jax.paths import cache_root as default_cache_dir
from ava_jax.data.gold import (LEXICON_PATH, NEGATIONS_PATH, WORD, gold_token_rewards, load_lexicon, scored_words,
                               token_pieces_cached)
from ava_jax.data.synthetic import BTPairs, bradley_terry_label, pairwise_accuracy

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
MODEL_DIR = os.path.join(ASSETS, "tinystories-260k")
BOS_ID, EOS_ID = 1, 2  # llama2.c tok512; EOS is also the pad id
PROMPT_BUCKET = 32  # prompt tokens including BOS: one compiled sampling shape, one layout width
SPLIT_SALT = "stories"
# Bump when a change alters generated data or the cache file: part of the cache key. 2: the KV cache
# laid out heads-major and the prompt's prefill through the uncached kernels (docs/performance.md,
# changes 22 and 24) round sampling's logits differently, which moves a sampled token wherever two
# candidates nearly tie (change 22 alone moved one of the 1,024 validation demonstrations).
FORMAT_VERSION = 2

# ------------------------------------------------------------------------------------------------ prompts

# Words of at most 4 tok512 tokens, so every prompt fits PROMPT_BUCKET.
NAMES = ("Lily", "Tim", "Ben", "Sue", "Max", "Mia", "Tom", "Ted", "Sam", "Lucy", "Jack", "Amy", "Bob", "Kate",
         "Leo", "Zoe", "Joe", "Ella", "Dan", "Molly", "Sara", "Jake", "Jen", "Mike", "Rose", "Fred", "Kim",
         "Pip", "Jill", "Spot")
ANIMALS = ("cat", "dog", "bird", "bunny", "bear", "fox", "frog", "duck", "mouse", "fish", "lion", "puppy",
           "kitten", "owl", "pig", "cow", "horse", "goat", "bee", "sheep")
PLACES = ("park", "forest", "garden", "house", "town", "farm", "beach", "river", "lake", "school", "woods",
          "meadow", "zoo", "sea", "hill")
# A few emotional adjectives make the return's distribution depend on the prompt.
ADJECTIVES = ("little", "big", "small", "tiny", "brave", "kind", "shy", "silly", "funny", "old", "smart",
              "cute", "happy", "sad", "scared", "proud")
OBJECTS = ("ball", "kite", "toy", "box", "hat", "book", "cake", "flower", "boat", "car", "doll", "balloon",
           "apple", "stick", "shell")
TEMPLATES = (
    "Once upon a time, there was {adj_a} {animal} named {name}.",
    "Once upon a time, {adj_a} {animal} lived in the {place}.",
    "One day, {name} went to the {place} to find {object_a}.",
    "{name} had {adj_a} {animal} that liked to play in the {place}.",
    "{name} and {name2} found {adj_a} {object} in the {place}.",
    "{name} the {animal} woke up in the {place}.",
)


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _draw_prompt(rng: np.random.Generator) -> str:
    def pick(words):
        return words[rng.integers(len(words))]

    name, adj, obj = pick(NAMES), pick(ADJECTIVES), pick(OBJECTS)
    return pick(TEMPLATES).format(
        name=name, name2=pick(tuple(n for n in NAMES if n != name)), animal=pick(ANIMALS), place=pick(PLACES),
        adj_a=_with_article(adj), object=obj, object_a=_with_article(obj))


def prompt_split(prompt: str) -> str:
    """The split ("train", "validation" or "test") that `prompt` belongs to, by its hash."""
    u, edge = splits.hash_unit(prompt, SPLIT_SALT), 0.0
    for name, fraction in zip(splits.SPLIT_NAMES, splits.DEFAULT_FRACTIONS):
        edge += fraction
        if u < edge:
            return name
    return splits.SPLIT_NAMES[-1]  # float sums may fall short of 1


def draw_prompts(rng: np.random.Generator, n: int, split: str) -> list[str]:
    """`n` templated story openings of `split` (draws from other splits are rejected)."""
    out = []
    while len(out) < n:
        prompt = _draw_prompt(rng)
        if prompt_split(prompt) == split:
            out.append(prompt)
    return out


# ----------------------------------------------------------------------------------------- config, sampling


@dataclasses.dataclass(frozen=True)
class StoriesConfig:
    """The stories datasets. Every field is part of the sample identity (and of the cache key)."""

    num_pairs: int = 4096  # preference pairs kept after dropping exact ties
    num_demos: int = 1024
    num_demo_candidates: int = 4  # K: a demonstration is the gold-best of K samples for its prompt
    response_len: int = 48  # H, tokens in every response
    temperature: float = 1.0  # sampling temperature of the bundled model
    bt_temperature: float = 0.375  # Bradley-Terry temperature of the labels (docs/stories.md: ceiling ~0.79)
    split: str = "train"  # which prompts: train, validation or test (by prompt hash)
    seed: int = 0  # the prompts
    data_seed: int = 0  # the sampled responses and labels
    batch_size: int = 512  # rows per `generate` call (one compiled shape)

    def __post_init__(self):
        checks = {
            "num_pairs": self.num_pairs >= 1, "num_demos": self.num_demos >= 1,
            "num_demo_candidates": 1 <= self.num_demo_candidates <= self.batch_size,
            "response_len": 1 <= self.response_len <= 512 - PROMPT_BUCKET, "temperature": self.temperature > 0,
            "bt_temperature": self.bt_temperature > 0, "split": self.split in splits.SPLIT_NAMES,
            # Pairs are two rows of a batch, demonstration candidates K rows.
            "batch_size": self.batch_size >= 2 and self.batch_size % 2 == 0
            and self.batch_size % self.num_demo_candidates == 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"StoriesConfig.{key}={getattr(self, key)!r} is out of range")

    @property
    def seq_len(self) -> int:
        return PROMPT_BUCKET + self.response_len


@functools.lru_cache(maxsize=1)
def _bundled_model():
    from ava_jax.checkpoints.load import load_pretrained  # JAX and Flax only when sampling
    model, tokenizer = load_pretrained(MODEL_DIR)
    return model.backbone, tokenizer


def _key(cfg: StoriesConfig, purpose: int):
    import jax
    key = jax.random.key(cfg.seed)
    for x in (cfg.data_seed, splits.SPLIT_NAMES.index(cfg.split), purpose):
        key = jax.random.fold_in(key, x)
    return key


def _sample(cfg: StoriesConfig, prompt_ids: list[list[int]], key) -> np.ndarray:
    """[B, H] response tokens: temperature sampling with BOS and EOS banned (so no early end)."""
    from ava_jax.sampling import SamplingConfig, generate, pad_prompts
    backbone, _ = _bundled_model()
    if max(map(len, prompt_ids)) > PROMPT_BUCKET:
        raise ValueError(f"a prompt has {max(map(len, prompt_ids))} tokens, more than PROMPT_BUCKET={PROMPT_BUCKET}")
    scfg = SamplingConfig(max_new_tokens=cfg.response_len, temperature=cfg.temperature, eos_id=None,
                          pad_id=EOS_ID, prompt_bucket=PROMPT_BUCKET, new_bucket=cfg.response_len,
                          banned_ids=(BOS_ID, EOS_ID))
    out = generate(backbone, pad_prompts(prompt_ids, EOS_ID, PROMPT_BUCKET), key, scfg)
    return np.asarray(out.tokens)


def _assemble(cfg: StoriesConfig, prompt_ids: list[list[int]], resp_BxH: np.ndarray, cache: dict) -> dict:
    """Lays out [BOS, prompt, response] with right padding and scores each response."""
    tokenizer = _bundled_model()[1]
    b, h = resp_BxH.shape
    tokens_BxT = np.full((b, cfg.seq_len), EOS_ID, np.int32)
    mask_BxT = np.zeros((b, cfg.seq_len), bool)
    reward_BxT = np.zeros((b, cfg.seq_len))
    plen_B = np.array([len(p) for p in prompt_ids], np.int32)
    texts = []
    for r, (prompt, plen) in enumerate(zip(prompt_ids, plen_B)):
        seq = prompt + resp_BxH[r].tolist()
        tokens_BxT[r, :len(seq)], mask_BxT[r, :len(seq)] = seq, True
        # Pieces of the whole stream, so the response's first piece keeps its leading space as decode has it.
        resp_pieces = token_pieces_cached(tokenizer, seq, cache)[plen:]
        reward_BxT[r, plen:plen + h] = gold_token_rewards(resp_pieces)
        texts.append("".join(resp_pieces))
    return dict(tokens=tokens_BxT, mask=mask_BxT, prompt_len=plen_B, reward=reward_BxT,
                ret=reward_BxT.sum(1), text=texts)


def _concat(chunks: list[dict]) -> dict:
    return {k: (sum((c[k] for c in chunks), []) if k in ("text", "prompt") else np.concatenate([c[k] for c in chunks]))
            for k in chunks[0]}


def _take(seq: dict, rows: np.ndarray) -> dict:
    return {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in seq.items()}


# ------------------------------------------------------------------------------------------------ datasets


@dataclasses.dataclass(frozen=True)
class StoriesPreferences(BTPairs):
    """Two sampled responses per prompt; chosen = the Bradley-Terry winner on the gold returns.

    The array fields (`synthetic.BTPairs`) are those the pipelines and diagnostics read.
    """

    cfg: StoriesConfig
    prompts: tuple[str, ...]
    chosen_text: tuple[str, ...]  # decoded responses; prompt + text == decode(tokens)
    rejected_text: tuple[str, ...]
    num_candidate_pairs: int  # pairs sampled to keep num_pairs
    num_ties_dropped: int  # of those, pairs with exactly equal gold returns (no signal): dropped

    @property
    def response_len(self) -> int:
        return self.cfg.response_len

    @property
    def bt_temperature(self) -> float:
        return self.cfg.bt_temperature


def make_stories_preferences(cfg: StoriesConfig) -> StoriesPreferences:
    """cfg.num_pairs pairs of the cfg.split prompts, labelled by Bradley-Terry on the gold returns.

    Pairs whose two gold returns are exactly equal (mostly two responses without a lexicon word) carry
    no label signal and are dropped; sampling goes on in whole batches until num_pairs remain.
    """
    import jax
    tokenizer = _bundled_model()[1]
    prompt_rng = np.random.default_rng([cfg.seed, splits.SPLIT_NAMES.index(cfg.split), 1])
    key, cache, chunks, kept = _key(cfg, 1), {}, [], 0
    while kept < cfg.num_pairs:
        prompts = draw_prompts(prompt_rng, cfg.batch_size // 2, cfg.split)
        prompt_ids = [[BOS_ID] + tokenizer.encode(p) for p in prompts for _ in range(2)]
        seq = _assemble(cfg, prompt_ids, _sample(cfg, prompt_ids, jax.random.fold_in(key, len(chunks))), cache)
        chunks.append(dict(seq, prompt=[p for p in prompts for _ in range(2)]))
        kept += int(np.sum(seq["ret"][0::2] != seq["ret"][1::2]))
    seq = _concat(chunks)
    rows = np.arange(len(seq["text"]))
    first, second = _take(seq, rows[0::2]), _take(seq, rows[1::2])
    keep_M = first["ret"] != second["ret"]  # weights are multiples of 1/16: float sums are exact
    candidates = int(np.flatnonzero(keep_M)[cfg.num_pairs - 1]) + 1
    rows = np.flatnonzero(keep_M[:candidates])
    first, second = _take(first, rows), _take(second, rows)

    label_rng = np.random.default_rng([cfg.seed, cfg.data_seed, splits.SPLIT_NAMES.index(cfg.split), 1])
    sides = bradley_terry_label(first, second, cfg.bt_temperature, label_rng)
    first_won_N = sides["first_won_N"]
    for side, won_N in (("chosen", first_won_N), ("rejected", ~first_won_N)):
        sides[f"{side}_text"] = tuple(a if w else b for a, b, w in zip(first["text"], second["text"], won_N))
    return StoriesPreferences(
        cfg=cfg, **sides, prompts=tuple(first["prompt"]),
        num_candidate_pairs=candidates, num_ties_dropped=candidates - cfg.num_pairs)


@dataclasses.dataclass(frozen=True)
class StoriesDemonstrations:
    """Gold-best of K sampled responses per prompt (fields as `synthetic.SyntheticDemonstrations`)."""

    cfg: StoriesConfig
    tokens_NxT: np.ndarray  # int32
    mask_NxT: np.ndarray  # bool
    prompt_len_N: np.ndarray  # int32, includes BOS
    true_reward_NxT: np.ndarray  # float32
    return_N: np.ndarray  # float64
    candidate_return_NxK: np.ndarray  # float64, gold returns of all K candidates (the best is return_N)
    prompts: tuple[str, ...]
    text: tuple[str, ...]

    @property
    def response_len(self) -> int:
        return self.cfg.response_len


def make_stories_demonstrations(cfg: StoriesConfig) -> StoriesDemonstrations:
    """cfg.num_demos demonstrations: for each prompt the first of its K samples with the highest gold return."""
    import jax
    tokenizer = _bundled_model()[1]
    k = cfg.num_demo_candidates
    prompt_rng = np.random.default_rng([cfg.seed, splits.SPLIT_NAMES.index(cfg.split), 2])
    key, cache, chunks = _key(cfg, 2), {}, []
    while len(chunks) * (cfg.batch_size // k) < cfg.num_demos:
        prompts = draw_prompts(prompt_rng, cfg.batch_size // k, cfg.split)
        prompt_ids = [[BOS_ID] + tokenizer.encode(p) for p in prompts for _ in range(k)]
        seq = _assemble(cfg, prompt_ids, _sample(cfg, prompt_ids, jax.random.fold_in(key, len(chunks))), cache)
        chunks.append(dict(seq, prompt=[p for p in prompts for _ in range(k)]))
    seq = _concat(chunks)
    ret_NxK = seq["ret"].reshape(-1, k)[:cfg.num_demos]
    best = _take(seq, np.arange(cfg.num_demos) * k + np.argmax(ret_NxK, axis=1))
    return StoriesDemonstrations(
        cfg=cfg, tokens_NxT=best["tokens"], mask_NxT=best["mask"], prompt_len_N=best["prompt_len"],
        true_reward_NxT=best["reward"].astype(np.float32), return_N=best["ret"], candidate_return_NxK=ret_NxK,
        prompts=tuple(best["prompt"]), text=tuple(best["text"]))


# ------------------------------------------------------------------------------------------------- caching


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# Config fields a dataset kind does not read: left out of its cache key, so e.g. the number of
# demonstrations does not invalidate cached preference pairs.
_UNUSED_FIELDS = {"preferences": ("num_demos", "num_demo_candidates"), "demonstrations": ("num_pairs",)}


def cache_key(cfg: StoriesConfig, kind: str) -> str:
    """sha256 over the config fields the kind reads, the bundled model and tokenizer files, the gold
    rule, the prompt words, FORMAT_VERSION and the JAX version and backend (random streams may differ
    across them)."""
    import jax
    files = [os.path.join(MODEL_DIR, n) for n in ("stories260K.bin", "tok512.bin")] + [LEXICON_PATH, NEGATIONS_PATH]
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _UNUSED_FIELDS.get(kind, ())}
    blob = dict(kind=kind, cfg=fields, format=FORMAT_VERSION, jax=jax.__version__,
                backend=jax.default_backend(), files=[_file_sha256(f) for f in files],
                prompts=[NAMES, ANIMALS, PLACES, ADJECTIVES, OBJECTS, TEMPLATES, PROMPT_BUCKET, SPLIT_SALT])
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _load_or_make(cls, make, kind: str, cfg: StoriesConfig, cache_dir: str | None):
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"stories_{kind}_{cache_key(cfg, kind)[:20]}.npz")
    fields = [f for f in dataclasses.fields(cls) if f.name != "cfg"]
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            values = {f.name: z[f.name] for f in fields}
        for f in fields:  # texts back to tuples of str, counts back to int
            if f.type.startswith("tuple"):
                values[f.name] = tuple(json.loads(str(values[f.name])))
            elif f.type == "int":
                values[f.name] = int(values[f.name])
        return cls(cfg=cfg, **values)
    data = make(cfg)
    os.makedirs(cache_dir, exist_ok=True)
    # Each tuple of texts as one JSON string: NumPy string arrays drop a trailing "\x00" (a byte token).
    arrays = {f.name: np.asarray(json.dumps(getattr(data, f.name)) if f.type.startswith("tuple")
                                 else getattr(data, f.name)) for f in fields}
    # Written to a temporary file and renamed: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return data


def load_or_make_preferences(cfg: StoriesConfig, cache_dir: str | None = None) -> StoriesPreferences:
    """`make_stories_preferences(cfg)`, generated once and cached as an .npz under `cache_dir`.

    Args:
      cfg: the dataset. cache_dir: default env AVA_JAX_CACHE, else ~/.cache/ava_jax.

    Returns:
      StoriesPreferences equal to a fresh `make_stories_preferences(cfg)` (the key is `cache_key`).
    """
    return _load_or_make(StoriesPreferences, make_stories_preferences, "preferences", cfg, cache_dir)


def load_or_make_demonstrations(cfg: StoriesConfig, cache_dir: str | None = None) -> StoriesDemonstrations:
    """`make_stories_demonstrations(cfg)`, cached like `load_or_make_preferences`."""
    return _load_or_make(StoriesDemonstrations, make_stories_demonstrations, "demonstrations", cfg, cache_dir)


# --------------------------------------------------------------------------------------------------- stats


def _lexicon_sign_count(text: str) -> int:
    """Positive minus negative lexicon words, ignoring weights and negation: a lexicon-aware shortcut."""
    return sum(1 if w.reward * (-1 if w.negated else 1) > 0 else -1 for w in scored_words(text))


def describe(prefs: StoriesPreferences) -> dict:
    """Statistics of a preference set: sizes, gold-return distribution, ties, ceiling, shortcut baselines.

    Returns:
      A flat-ish dict of Python numbers (json-serialisable). `heuristics` maps a rule "score(chosen) >
      score(rejected)" to its accuracy on the sampled labels (ties count one half).
    """
    texts = prefs.chosen_text + prefs.rejected_text
    words = [scored_words(t) for t in texts]
    ret_R = np.concatenate([prefs.chosen_return_N, prefs.rejected_return_N])
    rewards = np.concatenate([prefs.chosen_true_reward_NxT, prefs.rejected_true_reward_NxT])
    nonzero = rewards[rewards != 0]
    n = len(prefs.prompts)
    counts = collections.Counter(w.word for ws in words for w in ws)

    def acc(score):
        scores = np.array([score(t) for t in texts], np.float64)
        return pairwise_accuracy(scores[:n], scores[n:])

    return {
        "pairs": n, "distinct_prompts": len(set(prefs.prompts)), "response_len": prefs.response_len,
        "response_tokens": int(prefs.chosen_mask_NxT.sum() + prefs.rejected_mask_NxT.sum()
                               - prefs.chosen_prompt_len_N.sum() - prefs.rejected_prompt_len_N.sum()),
        "candidate_pairs": prefs.num_candidate_pairs, "ties_dropped": prefs.num_ties_dropped,
        "tie_fraction": prefs.num_ties_dropped / prefs.num_candidate_pairs,
        "return_mean": float(ret_R.mean()), "return_std": float(ret_R.std()),
        "return_quantiles": {q: float(np.quantile(ret_R, q / 100)) for q in (5, 25, 50, 75, 95)},
        "return_sign": {"negative": float(np.mean(ret_R < 0)), "zero": float(np.mean(ret_R == 0)),
                        "positive": float(np.mean(ret_R > 0))},
        "share_with_scored_word": float(np.mean([bool(ws) for ws in words])),
        "scored_words_per_response": float(np.mean([len(ws) for ws in words])),
        "negated_share": float(np.mean([w.negated for ws in words for w in ws])) if counts else 0.0,
        "nonzero_token_rewards_per_response": float(nonzero.size / len(texts)),
        "token_reward_mean_nonzero": float(nonzero.mean()) if nonzero.size else 0.0,
        "top_words": dict(counts.most_common(12)),
        "abs_return_gap_mean": float(np.mean(np.abs(prefs.chosen_return_N - prefs.rejected_return_N))),
        "bayes_optimal_accuracy": prefs.bayes_optimal_accuracy,
        "true_ranking_accuracy": prefs.true_ranking_accuracy,
        "heuristics": {
            "longer_text": acc(len),
            "more_exclamation_marks": acc(lambda t: t.count("!")),
            "more_words": acc(lambda t: len(WORD.findall(t))),
            "fewer_negation_words": acc(lambda t: -sum(w.lower() in load_lexicon().negations
                                                       for w in WORD.findall(t))),
            "lexicon_sign_count_ignoring_negation": acc(_lexicon_sign_count),
            "first_drawn": float(np.mean(prefs.first_won_N)),
        },
    }
