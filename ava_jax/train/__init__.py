"""Train step builder, loop, checkpoints and metrics."""
