"""Preference Transformer reward model, pipeline `reward_model`.

  python -m ava_jax.main --config=configs/pt.py                 # stories task (gold per-token rewards) + TinyStories-260K
  python -m ava_jax.main --config=configs/pt.py:tiny            # a few steps (the tests run this)
  python -m ava_jax.main --config=configs/pt.py:hh              # bundled HH-RLHF harmless + TinyStories-260K
  python -m ava_jax.main --config=configs/pt.py:synthetic       # ground-truth token MDP
  python -m ava_jax.main --config=configs/pt.py:paper --config.model.path=/path/to/gpt2 --config.workdir=runs/pt
Any field can be overridden, e.g. --config.train.steps=1000 --config.workdir=runs/pt (resumes if it exists).
"""
from ava_jax.pipelines.reward_model import default_config


def get_config(arg=None):
    return default_config("pt", arg)
