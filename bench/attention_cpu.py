"""The compiled CPU attention kernel against the same attention in XLA's ops, side by side in one process.

`model.attention="cpu_kernel"` (`ava_jax/kernels/cpu_attention.cc`) and `"blocked"` (the query-blocked
kernel in XLA's ops) compute the same thing; "auto" takes the kernel on CPU at the head dims of
`models.attention.CPU_KERNEL_AUTO_HEAD_DIMS`. This prints what that choice rests on: one attention
layer's forward and forward + backward at several head dims (float32, no padding), and the
TinyStories-260K LM train step and forward (batch 8 x 256, the codebase's jitted AdamW step). Each
timing is the median of `--reps` calls, the two implementations alternated call by call.

  python bench/attention_cpu.py
  python bench/attention_cpu.py --shapes 8x256:8/8:8,8x256:12/12:64 --reps 20 --no-model
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as bench_model  # noqa: E402  (bench/model.py: the model builder and the LM train step)

from ava_jax.kernels import cpu_attention  # noqa: E402
from ava_jax.models.attention import blocked_causal_attention  # noqa: E402

IMPLS = ("blocked", "cpu_kernel")
# BxT:N/K:H (query heads / key-value heads : head dim): TinyStories-260K, the same with grouped heads,
# head dims 16 and 32, GPT-2 small, SmolLM2-135M, and TinyStories at 4 x 1024.
SHAPES = "8x256:8/8:8,8x256:8/2:8,8x256:8/8:16,8x256:8/8:32,8x256:12/12:64,8x256:9/3:64,4x1024:8/8:8"


def layer(spec: str, reps: int) -> str:
    bt, heads, H = spec.split(":")
    B, T = (int(x) for x in bt.split("x"))
    N, K = (int(x) for x in heads.split("/"))
    H = int(H)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    valid = jnp.ones((B, T), bool)
    fns = {}
    for impl in IMPLS:
        def f(q, k, v, compiled=impl == "cpu_kernel"):
            return blocked_causal_attention(q, k, v, valid, H ** -0.5, compiled=compiled)
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
        fns[(impl, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(q, k, v))
        fns[(impl, "grad")] = lambda grad=grad: jax.block_until_ready(grad(q, k, v))
    m = {key: 1e3 * s for key, s in bench_model.alternated(fns, reps).items()}
    return (f"| {B}x{T}, {N}/{K} heads of {H} | {m[('blocked', 'fwd')]:.2f} / {m[('cpu_kernel', 'fwd')]:.2f} | "
            f"{m[('blocked', 'fwd')] / m[('cpu_kernel', 'fwd')]:.2f}x | {m[('blocked', 'grad')]:.2f} / "
            f"{m[('cpu_kernel', 'grad')]:.2f} | {m[('blocked', 'grad')] / m[('cpu_kernel', 'grad')]:.2f}x |")


def tiny_model(reps: int) -> str:
    B, T = 8, 256
    fns, temps = {}, {}
    for impl in IMPLS:
        tqr = bench_model.build("tiny", jnp.float32, attention=impl)
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, tqr.cfg.vocab_size, (B, T)), jnp.int32)
        batch = {"tokens": tokens, "mask": jnp.ones((B, T), bool)}
        step, state = bench_model.lm_train_step(tqr, batch)
        temps[impl] = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes
        box = [state]

        def train(step=step, box=box, batch=batch):
            box[0], metrics = step(box[0], batch, jax.random.key(0))
            jax.block_until_ready(metrics)

        graphdef, params = nnx.split(tqr.backbone)
        fwd = jax.jit(lambda p, t, graphdef=graphdef: nnx.merge(graphdef, p)(t).logits)
        fns[(impl, "train")] = train
        fns[(impl, "fwd")] = lambda fwd=fwd, p=params, t=tokens: jax.block_until_ready(fwd(p, t))
    m = {key: 1e3 * s for key, s in bench_model.alternated(fns, reps).items()}
    (tb, tk), (fb, fk) = ((m[("blocked", x)], m[("cpu_kernel", x)]) for x in ("train", "fwd"))
    return (f"| TinyStories-260K 8x256: LM train step ms | {tb:.1f} / {tk:.1f} | {tb / tk:.2f}x | "
            f"forward {fb:.1f} / {fk:.1f} ms | {fb / fk:.2f}x |\n(train step temporaries: "
            f"{temps['blocked'] / 2 ** 20:.1f} / {temps['cpu_kernel'] / 2 ** 20:.1f} MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated BxT:N/K:H")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--no-model", action="store_true", help="skip the TinyStories-260K train step")
    a = p.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit(f"the kernel is for the CPU backend; this process computes on {jax.default_backend()}")
    reason = cpu_attention.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the compiled kernel is unavailable: {reason}")
    print(f"jax {jax.__version__} on cpu ({os.cpu_count()} cores); float32; median of {a.reps}, alternated; "
          "blocked = XLA's ops, cpu_kernel = the compiled kernel; ratio = blocked / cpu_kernel time")
    print("| one layer | forward ms: blocked / cpu_kernel | ratio | forward + backward ms | ratio |")
    print("|---|---|---|---|---|")
    for spec in a.shapes.split(","):
        print(layer(spec, a.reps), flush=True)
    if not a.no_model:
        print(tiny_model(a.reps))


if __name__ == "__main__":
    main()
