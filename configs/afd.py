"""DPO w/ AfD or AVA-p w/ AfD (paper Table 5), pipeline `direct`: the objective on Init-SFT pairs built
from demonstrations (chosen = a sample of the SFT policy at data.afd_policy, rejected = a sample of the
initial policy, same prompt).

  python -m ava_jax.main --config=configs/sft.py --config.workdir=runs/sft            # the SFT policy first
  python -m ava_jax.main --config=configs/afd.py:dpo --config.data.afd_policy=runs/sft/policy
  python -m ava_jax.main --config=configs/afd.py:ava_p --config.data.afd_policy=runs/sft/policy
  python -m ava_jax.main --config=configs/afd.py:dpo,synthetic --config.data.afd_policy=runs/sft_syn/policy
"""
from ava_jax.pipelines.direct import default_config


def get_config(arg=None):
    objective, _, variant = (arg or "dpo").partition(",")
    if objective not in ("dpo", "ava_p"):
        raise ValueError(f"configs/afd.py: objective {objective!r} is not one of ('dpo', 'ava_p')")
    c = default_config(objective, variant)
    c.data.source = "afd"
    c.workdir = f"runs/afd_{objective}" if variant in ("", "synthetic") else ""
    return c
