"""PPO against a learned reward model (paper Table 3), pipeline `ppo`: AVA's dense per-token rewards
(reward.mode=dense) or one sparse sequence score (reward.mode=sparse: BT, PT, or AVA's own score).

  python -m ava_jax.main --config=configs/ppo.py                  # stories task: SFT'd TinyStories-260K, AVA-p RM
  python -m ava_jax.main --config=configs/ppo.py --config.reward.path=runs/ava_p    # a reward model you trained
  python -m ava_jax.main --config=configs/ppo.py --config.reward.mode=sparse --config.reward.path=runs/bt
  python -m ava_jax.main --config=configs/ppo.py:synthetic        # the synthetic MDP
  python -m ava_jax.main --config=configs/ppo.py:tiny             # a few iterations (the tests run this)
Without reward.path the AVA-p reward model is trained first (and reused) under the run directory.
Writes <workdir>/summary.json, rollouts.jsonl, metrics, checkpoints, and the policy at <workdir>/policy.
"""
from ava_jax.pipelines.ppo import default_config


def get_config(arg=None):
    return default_config(arg)
