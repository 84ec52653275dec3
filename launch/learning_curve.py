"""Test accuracy against training pairs on the synthetic task (see ava_jax/pipelines/learning_curve.py)."""
from ava_jax.pipelines.learning_curve import main

if __name__ == "__main__":
    main()
