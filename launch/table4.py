"""Regenerates paper Table 4, AVA-p against DPO (see ava_jax/pipelines/table4.py for the options)."""
from ava_jax.pipelines.table4 import main

if __name__ == "__main__":
    main()
