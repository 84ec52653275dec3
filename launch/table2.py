"""Regenerates paper Table 2, Best-of-N with AVA-p, BT and PT reward models (see ava_jax/pipelines/table2.py)."""
from ava_jax.pipelines.table2 import main

if __name__ == "__main__":
    main()
