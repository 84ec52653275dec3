"""The bundled TinyStories-260K model decodes greedily from BOS to the story llama2.c documents."""
import jax

from ava_jax.checkpoints.load import load_pretrained
from ava_jax.config import BUNDLED
from ava_jax.sampling import SamplingConfig, generate

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


def test_greedy_story_from_bos():
    model, tok = load_pretrained(BUNDLED["tinystories-260k"])
    assert tok.encode("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    out = generate(model.backbone, [[tok.bos_id]], jax.random.key(0),
                   SamplingConfig(max_new_tokens=64, temperature=0.0, eos_id=tok.eos_id, prompt_bucket=1,
                                  new_bucket=16))
    text = tok.decode([int(t) for t, m in zip(out.tokens[0], out.mask[0]) if m])
    assert text.startswith(STORY), text
