"""token_positions: response mask and last real token under left/right padding and pad == eos."""
import jax.numpy as jnp
import numpy as np

from ava_jax.models.positions import gather_last, token_positions

EOS = PAD = 2  # pad == eos, as in GPT-2 and many Llama checkpoints


def test_right_padding_with_pad_equal_eos():
    # prompt [1 5 6], response [7 EOS]; then padding that is also token 2.
    tokens = jnp.array([[1, 5, 6, 7, EOS, PAD, PAD], [1, 5, 8, 9, 4, EOS, PAD]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    resp, last = token_positions(tokens, mask, jnp.array([3, 2]))
    assert resp.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]]
    # The last real token is the EOS at index 4 / 5, not the first "2" seen or the final column.
    assert last.tolist() == [4, 5]
    assert gather_last(tokens * 10 + jnp.arange(7), last).tolist() == [EOS * 10 + 4, EOS * 10 + 5]


def test_left_padding():
    tokens = jnp.array([[PAD, PAD, 1, 5, 7, EOS], [1, 5, 6, 9, 7, EOS]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    resp, last = token_positions(tokens, mask, jnp.array([2, 4]))
    assert resp.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert last.tolist() == [5, 5]


def test_eos_inside_response_is_kept_and_empty_rows_are_safe():
    # An EOS token id in the middle of a response is a real token when the mask says so.
    tokens = jnp.array([[1, EOS, 5, EOS], [PAD, PAD, PAD, PAD]])
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    resp, last = token_positions(tokens, mask, jnp.array([1, 0]))
    assert resp.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    assert last.tolist() == [3, 0]


def test_random_against_python_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        B, T = 4, 9
        lens = rng.integers(1, T + 1, B)
        plen = np.array([rng.integers(0, n + 1) for n in lens])
        left = rng.random(B) < 0.5
        mask = np.zeros((B, T), int)
        for b in range(B):
            if left[b]:
                mask[b, T - lens[b]:] = 1
            else:
                mask[b, :lens[b]] = 1
        resp, last = token_positions(jnp.zeros((B, T), int), jnp.asarray(mask), jnp.asarray(plen))
        for b in range(B):
            idx = np.flatnonzero(mask[b])
            want = np.zeros(T, bool)
            want[idx[plen[b]:]] = True
            assert np.asarray(resp[b]).tolist() == want.tolist()
            assert int(last[b]) == idx[-1]
