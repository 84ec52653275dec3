"""One module per pipeline; each exposes `run(config)`. `main` dispatches on `config.pipeline`."""
import importlib

from ava_jax.errors import ConfigError

PIPELINES = {
    "best_of_n": "ava_jax.pipelines.best_of_n",
    "direct": "ava_jax.pipelines.direct",
    "generate": "ava_jax.pipelines.generate",
    "ppo": "ava_jax.pipelines.ppo",
    "reward_model": "ava_jax.pipelines.reward_model",
}


def get(name: str):
    if name not in PIPELINES:
        raise ConfigError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}")
    return importlib.import_module(PIPELINES[name])
