"""Regenerates paper Table 1 (see ava_jax/pipelines/table1.py for the options)."""
from ava_jax.pipelines.table1 import main

if __name__ == "__main__":
    main()
