"""DPO (sigmoid, beta 0.1; loss.loss_type=ipo|hinge, loss.label_smoothing, loss.reference_free), pipeline `direct`: trains the policy.

  python -m ava_jax.main --config=configs/dpo.py                  # stories task (gold rewards) + TinyStories-260K
  python -m ava_jax.main --config=configs/dpo.py:tiny             # a few steps (the tests run this)
  python -m ava_jax.main --config=configs/dpo.py:synthetic        # the synthetic MDP, a scratch policy
Writes <workdir>/summary.json and the policy as a Hugging Face directory at <workdir>/policy.
"""
from ava_jax.pipelines.direct import default_config


def get_config(arg=None):
    return default_config("dpo", arg)
