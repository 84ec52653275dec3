"""Entry point: `python -m ava_jax.main --config=configs/<x>.py[:variant] --config.key=value`.

Parses flags (the config is locked, so a misspelt key is an error), initialises `jax.distributed`
on multi-host runs, logs the devices and dispatches on `config.pipeline`.
"""
from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from ava_jax import pipelines

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).",
                                          lock_config=True)
_MULTIHOST = flags.DEFINE_bool("multihost", bool(os.environ.get("AVA_MULTIHOST")),
                               "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")


def main(argv):
    del argv
    if _MULTIHOST.value:
        jax.distributed.initialize()
    logging.getLogger().setLevel(logging.INFO)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(),
                 jax.devices())
    pipelines.get(config.pipeline).run(config)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
