"""Best-of-N with reward models (paper Table 2), pipeline `best_of_n`: K samples per held-out prompt
from the policy, the whole curve N = 1..K from that pool, judged by the task's gold reward.

  python -m ava_jax.main --config=configs/ava_p.py --config.workdir=runs/ava_p      # train the reward models first
  python -m ava_jax.main --config=configs/bt.py --config.workdir=runs/bt
  python -m ava_jax.main --config=configs/best_of_n.py --config.best_of_n.reward_models=runs/ava_p,runs/bt
  python -m ava_jax.main --config=configs/best_of_n.py:tiny --config.best_of_n.reward_models=...   # the tests
Writes <workdir>/best_of_n.{json,png} and summary.json.
"""
from ava_jax.pipelines.best_of_n import default_config


def get_config(arg=None):
    return default_config(arg)
