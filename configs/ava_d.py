"""AVA-d (demonstrations: the chosen halves), pipeline `reward_model`.

  python -m ava_jax.main --config=configs/ava_d.py                 # stories task (gold per-token rewards) + TinyStories-260K
  python -m ava_jax.main --config=configs/ava_d.py:tiny            # a few steps (the tests run this)
  python -m ava_jax.main --config=configs/ava_d.py:hh              # bundled HH-RLHF harmless + TinyStories-260K
  python -m ava_jax.main --config=configs/ava_d.py:synthetic       # ground-truth token MDP
  python -m ava_jax.main --config=configs/ava_d.py:paper --config.model.path=/path/to/gpt2 --config.workdir=runs/ava_d
Any field can be overridden, e.g. --config.train.steps=1000 --config.workdir=runs/ava_d (resumes if it exists).
"""
from ava_jax.pipelines.reward_model import default_config


def get_config(arg=None):
    return default_config("ava_d", arg)
