"""Regenerates paper Table 5, AVA-d against SFT and AfD (see ava_jax/pipelines/table5.py for the options)."""
from ava_jax.pipelines.table5 import main

if __name__ == "__main__":
    main()
