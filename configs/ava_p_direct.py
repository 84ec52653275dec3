"""AVA-p as a policy objective, pipeline `direct`: the TQR sits on the policy, its LM head gives Q,
a fresh reward head is trained jointly, and the fine-tuned LM is the policy that generates.

  python -m ava_jax.main --config=configs/ava_p_direct.py              # stories task + TinyStories-260K
  python -m ava_jax.main --config=configs/ava_p_direct.py:synthetic    # the synthetic MDP, a scratch policy
  python -m ava_jax.main --config=configs/ava_p_direct.py:tiny         # a few steps
Writes <workdir>/summary.json and the policy as a Hugging Face directory at <workdir>/policy.
"""
from ava_jax.pipelines.direct import default_config


def get_config(arg=None):
    return default_config("ava_p", arg)
