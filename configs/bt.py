"""Bradley-Terry reward model, pipeline `reward_model`.

  python -m ava_jax.main --config=configs/bt.py                 # stories task (gold per-token rewards) + TinyStories-260K
  python -m ava_jax.main --config=configs/bt.py:tiny            # a few steps (the tests run this)
  python -m ava_jax.main --config=configs/bt.py:hh              # bundled HH-RLHF harmless + TinyStories-260K
  python -m ava_jax.main --config=configs/bt.py:synthetic       # ground-truth token MDP
  python -m ava_jax.main --config=configs/bt.py:paper --config.model.path=/path/to/gpt2 --config.workdir=runs/bt
Any field can be overridden, e.g. --config.train.steps=1000 --config.workdir=runs/bt (resumes if it exists).
"""
from ava_jax.pipelines.reward_model import default_config


def get_config(arg=None):
    return default_config("bt", arg)
