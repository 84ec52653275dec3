"""Generate text from a checkpoint (default: the bundled TinyStories-260K).

  python -m ava_jax.main --config=configs/generate.py
  python -m ava_jax.main --config=configs/generate.py:tiny
  python -m ava_jax.main --config=configs/generate.py --config.model.path=/path/to/hf_dir \
      --config.sampling.temperature=0.8 --config.sampling.top_p=0.9
"""
from ava_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.pipeline = "generate"
    c.prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park"]
    c.sampling.max_new_tokens = 80
    if arg == "tiny":
        c.prompts = ["Once upon a time"]
        c.sampling.max_new_tokens = 16
    elif arg not in (None, ""):
        raise ValueError(f"configs/generate.py: unknown variant {arg!r} (known: tiny)")
    return c
