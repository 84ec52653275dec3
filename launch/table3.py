"""Regenerates paper Table 3, PPO with AVA-p's dense rewards against sparse rewards (see ava_jax/pipelines/table3.py)."""
from ava_jax.pipelines.table3 import main

if __name__ == "__main__":
    main()
