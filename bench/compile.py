"""Compile time and run time of the package's programs at XLA's default LLVM level (-O3) and with the
package's options (`ava_jax.xla.compiler_options()`: -O2 on CPU), side by side in one process.

For the TinyStories-260K model: the rollout's response log-probs (64 x 80, padding-masked forward),
the LM train step (8 x 256, AdamW; the step `make_train_step` builds) and the KV-cache decode loop
(64 prompts of 32, 48 new tokens; the one program the package leaves at XLA's defaults). The first compile
of the process is a warm-up, `jax.clear_caches()` precedes every compile so none is served from
memory, and run times alternate between the two executables.

  python bench/compile.py                 # 3 compiles and 3 x 10 runs of each program per option set
  python bench/compile.py --rounds 1 --reps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as bench_model  # noqa: E402  (bench/model.py: the LM loss the train-step figures use)

from ava_jax import sharding as shd, xla  # noqa: E402
from ava_jax.checkpoints.load import load_pretrained  # noqa: E402
from ava_jax.config import BUNDLED  # noqa: E402
from ava_jax.rl.ppo import lm_response_logprobs  # noqa: E402
from ava_jax.sampling import SamplingConfig, _generate  # noqa: E402
from ava_jax.train.step import init_train_state, make_train_step  # noqa: E402


def programs(tqr):
    """name -> (lower() -> Lowered, args of the compiled call, donates its first argument)."""
    rng = np.random.default_rng(0)
    graphdef, params = nnx.split(tqr.backbone)
    tokens = jnp.asarray(rng.integers(3, 512, (64, 80)), jnp.int32)
    mask = jnp.asarray(np.arange(80)[None, :] >= rng.integers(0, 24, (64, 1)))  # left-padded prompts

    def logprobs():
        def f(p, t, m):
            return lm_response_logprobs(nnx.merge(graphdef, p), t, m, 48, 1.0, ())
        return jax.jit(f).lower(params, tokens, mask)

    batch = {"tokens": jnp.asarray(rng.integers(3, 512, (8, 256)), jnp.int32), "mask": jnp.ones((8, 256), bool)}
    mesh, opt = shd.make_mesh(), optax.adamw(1e-5)
    built = {}

    def train():
        g, state = init_train_state(tqr, opt, mesh)
        step = make_train_step(g, bench_model.lm_loss_fn, opt, mesh, state, batch)
        built["train"] = (state, batch, jax.random.key(0), step.frozen.params, step.fixed)
        return step.jitted.lower(*built["train"])

    prompts = jnp.asarray(rng.integers(3, 512, (64, 32)), jnp.int32)
    scfg = SamplingConfig(max_new_tokens=48, temperature=1.0, eos_id=None, prompt_bucket=32, new_bucket=48)

    def decode():
        return _generate.lower(graphdef, params, prompts, jnp.ones((64, 32), bool), jax.random.key(0),
                               cfg=scfg, n_new=48)

    return {
        "rollout log-probs 64x80": (logprobs, lambda: (params, tokens, mask), False),
        "LM train step 8x256": (train, lambda: built["train"], True),
        "KV decode 64x(32+48)": (decode, lambda: (params, prompts, jnp.ones((64, 32), bool), jax.random.key(0)),
                                 False),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="compiles of each program per option set")
    p.add_argument("--reps", type=int, default=10, help="timed runs per round")
    a = p.parse_args()
    ours = xla.compiler_options()
    if ours is None:
        raise SystemExit(f"the package compiles with XLA's defaults here (backend {jax.default_backend()}, or "
                         "XLA_FLAGS sets the level): nothing to compare")
    tqr = load_pretrained(BUNDLED["tinystories-260k"])[0]
    jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((8, 8))).compile()  # the process's first compile
    # Given explicitly: options passed to compile() override those a jit (xla.jit) was built with.
    options = {"default": {"xla_backend_optimization_level": 3}, "package": ours}
    print(f"jax {jax.__version__} on {jax.default_backend()}; TinyStories-260K; {a.rounds} compiles, "
          f"{a.rounds} x {a.reps} alternated runs per program and option set; default = "
          f"{options['default']} (XLA's), package = {ours}")
    print("| program | compile s: default / package | ratio | run ms: default / package | ratio |")
    print("|---|---|---|---|---|")
    for name, (lower, args, donates) in programs(tqr).items():
        compile_s = {k: [] for k in options}
        run_s = {k: [] for k in options}
        for _ in range(a.rounds):
            compiled = {}
            for k, o in options.items():
                jax.clear_caches()
                low = lower()
                t = time.perf_counter()
                compiled[k] = low.compile(o)
                compile_s[k].append(time.perf_counter() - t)
            for _ in range(a.reps):
                for k, c in compiled.items():
                    call = args()
                    if donates:  # a fresh copy of the train state for every call
                        call = (jax.tree.map(jnp.copy, call[0]), *call[1:])
                    jax.block_until_ready(call)
                    t = time.perf_counter()
                    jax.block_until_ready(c(*call))
                    run_s[k].append(time.perf_counter() - t)
        (cd, cp), (rd, rp) = ([statistics.median(x[k]) for k in options] for x in (compile_s, run_s))
        print(f"| {name} | {cd:.2f} / {cp:.2f} | {cp / cd:.2f}x | {1e3 * rd:.1f} / {1e3 * rp:.1f} | {rp / rd:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
