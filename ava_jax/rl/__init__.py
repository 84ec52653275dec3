"""RL fine-tuning (paper Table 3): rollouts from the current policy, AVA's dense or a sparse reward
tensor, and the PPO update. The pure PPO losses are in `ava_jax.losses.ppo`; the pipeline that runs
them is `ava_jax.pipelines.ppo`."""
