"""Train-step time of each reward-model objective on the same backbone and batch, side by side.

Prints the AVA-p (and AVA-d, PT) step time over the Bradley-Terry step time; the project's target is
AVA-p at most 1.2x BT. AVA reads Q in vocabulary chunks (`TQR.q_summary`); one column times AVA-p
with full [B, T, V] Q rows instead, and the last gives each step's compiled temporary memory.
BT and PT never use the LM head (XLA drops it), so on a large vocabulary AVA-p carries the LM head's
forward and backward on top of BT's step: for GPT-2 small that is 39M of 124M parameters.
The six steps are compiled first and then taken in turn, one call each per round, so the host's
drift (a quarter between processes here) reaches all of them alike.

  python bench/reward_step.py                         # TinyStories-260K and a GPT-2-small-shaped model
  python bench/reward_step.py --models tiny --pairs 16 --seq 256
  python bench/reward_step.py --models wide-vocab --pairs 4 --seq 128   # where the vocabulary dominates
"""
from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx

from ava_jax import objectives
from ava_jax import sharding as shd
from ava_jax.checkpoints.load import load_pretrained
from ava_jax.config import BUNDLED
from ava_jax.models import HeadConfig, ModelConfig, TQR
from ava_jax.models.config import ATTENTION_IMPLS
from ava_jax.train.step import init_train_state, make_train_step
from model import add_malloc_flag, alternated, host_allocator  # bench/model.py


def make_model(name, heads, dtype, attention="auto"):
    if name == "tiny":
        return load_pretrained(BUNDLED["tinystories-260k"], heads=heads, dtype=dtype, attention=attention)[0]
    if name == "gpt2-small":
        cfg = ModelConfig(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                          d_ff=3072, max_seq_len=1024, dtype=dtype, attention=attention)
        return TQR(cfg, heads, rngs=nnx.Rngs(0))
    if name == "wide-vocab":  # GPT-2's vocabulary on a narrow 2-layer trunk: the LM head dominates
        cfg = ModelConfig(arch="gpt2", vocab_size=50257, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                          d_ff=1024, max_seq_len=256, dtype=dtype, attention=attention)
        return TQR(cfg, heads, rngs=nnx.Rngs(0))
    raise SystemExit(f"unknown model {name!r}")


def pair_batch(B, T, V, seed=0):
    rng = np.random.default_rng(seed)

    def side():
        lens = rng.integers(T // 2, T + 1, B)
        return {"tokens_BxT": rng.integers(3, V, (B, T)).astype(np.int32),
                "mask_BxT": (np.arange(T)[None] < lens[:, None]).astype(np.int32),
                "prompt_len_B": (lens // 3).astype(np.int32)}
    return {"chosen": side(), "rejected": side()}


def build_step(name, objective, weighting, batch, dtype, chunks=True, attention="auto"):
    """(run, compiled temporary MiB): `run()` takes one train step of the objective and waits for it."""
    model = make_model(name, HeadConfig(reward_weighting=weighting), dtype, attention)
    mesh = shd.make_mesh()
    opt = optax.adamw(1e-5)
    with jax.set_mesh(mesh):
        g, state = init_train_state(model, opt, mesh)
        options = {"vocab_chunks": chunks} if objective in ("ava_p", "ava_d") else {}  # how AVA reads Q
        loss_fn = objectives.get(objective).loss_fn(**options)
        step = make_train_step(g, loss_fn, opt, mesh, state, batch)
        mem = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else float("nan")
    box = [state]

    def run():
        with jax.set_mesh(mesh):
            box[0], m = step(box[0], batch, jax.random.key(0))
        jax.block_until_ready(m)

    return run, temp_mib  # `alternated` calls each once before timing: that call compiles


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,gpt2-small")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto", help="ModelConfig.attention")
    add_malloc_flag(p)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.pairs} pairs x {args.seq} tokens, "
          f"median of {args.reps} steps, the six steps taken in turn; attention {args.attention}; "
          f"{host_allocator(args)}")
    print("| model | BT step s | PT step s | AVA-p step s | AVA-d step s | AVA-p / BT | AVA-p (rwt off) / BT "
          "| AVA-p full Q rows / BT | temp MiB: BT / AVA-p / AVA-p full rows |")
    print("|---" * 9 + "|")
    for name in args.models.split(","):
        V = 512 if name == "tiny" else 50257  # gpt2-small, wide-vocab
        batch = pair_batch(args.pairs, args.seq, V)
        reps = args.reps if name == "tiny" else max(2, args.reps // 2)
        built = {(o, w, c): build_step(name, o, w, batch, args.dtype, chunks=c, attention=args.attention)
                 for o, w, c in (("bt", "none", True), ("pt", "attention", True), ("ava_p", "attention", True),
                                 ("ava_p", "none", True), ("ava_d", "attention", True), ("ava_p", "attention", False))}
        t = alternated({k: v[0] for k, v in built.items()}, reps)
        mem = {k: v[1] for k, v in built.items()}
        bt = t[("bt", "none", True)]
        ava = ("ava_p", "attention", True)
        full = ("ava_p", "attention", False)
        print(f"| {name} | {bt:.4f} | {t[('pt', 'attention', True)]:.4f} | {t[ava]:.4f} | "
              f"{t[('ava_d', 'attention', True)]:.4f} | {t[ava] / bt:.2f}x | "
              f"{t[('ava_p', 'none', True)] / bt:.2f}x | {t[full] / bt:.2f}x | "
              f"{mem[('bt', 'none', True)]:.0f} / {mem[ava]:.0f} / {mem[full]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
