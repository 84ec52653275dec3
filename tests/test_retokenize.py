"""A reward model with another tokenizer than the policy: re-encoding, the last-character mapping of
dense rewards (each sequence's summed reward preserved) and the sparse score on the last token."""
import types

import numpy as np
import pytest
from flax import nnx

from ava_jax import config as cfglib
from ava_jax import objectives
from ava_jax.models.config import ModelConfig
from ava_jax.models.heads import HeadConfig
from ava_jax.models.tqr import TQR
from ava_jax.rl.retokenize import Retokenizer, char_ends, map_to_policy, retokenized_rewards
from ava_jax.rl.rewards import RewardConfig
from ava_jax.tokenizers import load_tokenizer

POLICY = load_tokenizer(cfglib.BUNDLED["tinystories-260k"])
RM = load_tokenizer(cfglib.BUNDLED["gpt2-bpe"])
TEXTS = [("Once upon a time, there was a little dog.", " He was very happy. He played with a ball all day!"),
         ("Lily went to the park.", " She saw a big, red balloon and laughed."),
         ("Tom had a toy.", " It broke")]


def _rows():
    out = []
    for prompt, response in TEXTS:
        p = POLICY.encode(prompt, add_bos=True)
        out.append((p, POLICY.encode_continuation(response)))
    return out


def test_each_reward_model_token_goes_to_the_policy_token_holding_its_last_character():
    retok = Retokenizer(POLICY, RM)
    rng = np.random.default_rng(0)
    for (p, r), (_, text) in zip(_rows(), TEXTS):
        rm_p, rm_r, pe, re_ = retok.convert(p, r)
        assert RM.decode(rm_r) == text and pe[-1] == re_[-1] == len(text)
        assert len(rm_r) != len(r) or not np.array_equal(pe, re_)  # really another tokenisation
        values = rng.normal(size=len(rm_r))
        mapped = map_to_policy(values, re_, pe)
        np.testing.assert_allclose(mapped.sum(), values.sum(), rtol=1e-12)
        starts = np.concatenate([[0], pe[:-1]])
        for k, end in enumerate(re_):  # char end-1 lies in the assigned policy token's span
            j = int(np.searchsorted(pe, end))
            assert starts[j] <= end - 1 < pe[j] or (end == 0 and j == 0)


def test_char_ends_count_the_leading_space_of_a_continuation():
    p, r = _rows()[0]
    ends = char_ends(POLICY, p, r)
    assert ends[0] == len(POLICY.decode(p + r[:1])) - len(POLICY.decode(p)) and np.all(np.diff(ends) >= 0)
    assert ends[-1] == len(TEXTS[0][1])


@pytest.fixture(scope="module")
def gpt2_vocab_rm():
    """A random tiny TQR on the GPT-2 vocabulary, as `reward_model.load_trained` returns one."""
    cfg = ModelConfig(arch="gpt2", vocab_size=RM.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                      d_ff=32, max_seq_len=128)
    model = TQR(cfg, HeadConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    # Scale the reward head up so the rewards are far from zero.
    kernel = params["reward_head"]["kernel"]
    kernel[...] = kernel[...] * 50
    obj = objectives.get("ava_p")
    return types.SimpleNamespace(objective=obj, loss_config=obj.config(), graphdef=graphdef, params=params,
                                 tokenizer=RM, config=types.SimpleNamespace(eval=types.SimpleNamespace(score="sum")),
                                 run_dir="gpt2-rm")


def test_dense_retokenized_rewards_keep_each_sequences_sum_and_sparse_lands_last(gpt2_vocab_rm):
    rm, retok = gpt2_vocab_rm, Retokenizer(POLICY, RM)
    rows = _rows()
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    n = max(map(len, responses)) + 2
    dense, mu, _ = retokenized_rewards(rm, RewardConfig(mode="dense"), retok, prompts, responses, n)
    sparse, _, _ = retokenized_rewards(rm, RewardConfig(mode="sparse"), retok, prompts, responses, n)
    assert dense.dtype == np.float32 and dense.shape == (3, n)
    # AVA-p's "sum" score is the reward model's own sum of its response rewards: the dense mapping
    # onto the policy's tokens keeps it, and sparse puts exactly it on the last policy token.
    for i, r in enumerate(responses):
        assert np.all(dense[i, len(r):] == 0) and np.count_nonzero(sparse[i]) == 1
        np.testing.assert_allclose(dense[i].sum(), sparse[i, len(r) - 1], rtol=1e-4, atol=1e-4)
    assert np.abs(dense).max() > 1e-3
