"""Bytes per device at scale, from abstract arrays (nothing is allocated): parameters and optimizer
state placed by `sharding.PARAM_RULES` on an fsdp mesh, and the train step's compiled temporary
memory (XLA's memory analysis of the step lowered on abstract inputs). Runs on fake CPU devices.

For the GPT-2-small, SmolLM2-135M and Llama-7B shapes: parameters and AdamW state per device against
1/n of the total (the check: within 5%), and the step's temporaries (activations, gradients) for a
global batch of B x T tokens, with and without rematerialisation. The fp32 master parameters and
Adam moments are what this codebase trains with (param_dtype float32; compute dtype bfloat16 here).

  python bench/memory.py                         # fsdp 8: parameters and AdamW state, all three shapes
  python bench/memory.py --shapes gpt2-small --compile --batch 8 --seq 1024   # + the step's temporaries
  python bench/memory.py --single-gpu --lora-rank 16   # full against LoRA fine-tuning on one device

`--single-gpu` answers "what fits one 80 GB GPU": for each shape the bytes of the base weights, the
trained parameters, AdamW's moments, the gradients and a reference policy (DPO, PPO) for full
fine-tuning (fp32 master weights, the reference a second bf16 copy) and for LoRA (the adapted model
built abstractly through qwix, `models.lora`; the base fp32 or bf16, fixed, the reference the same
arrays). Activations come on top: `--compile` on an accelerator host.
"""
from __future__ import annotations

import argparse
import os
import sys

if "--devices" in sys.argv:
    _n = sys.argv[sys.argv.index("--devices") + 1]
else:
    _n = "8"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ava_jax import sharding as shd  # noqa: E402
from ava_jax.losses.lm import masked_nll  # noqa: E402
from ava_jax.models import ModelConfig, TQR  # noqa: E402
from ava_jax.train.step import StepOptions, make_train_step, TrainState  # noqa: E402

SHAPES = {
    "gpt2-small": dict(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536),
    "llama-7b": dict(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     d_ff=11008, tie_embeddings=False),
}


def per_device_bytes(tree) -> tuple[int, int]:
    """(bytes on device 0, total bytes) of a tree of ShapeDtypeStructs with shardings."""
    dev, total = 0, 0
    for x in jax.tree.leaves(tree):
        n = np.dtype(x.dtype).itemsize
        total += int(np.prod(x.shape)) * n
        dev += int(np.prod(x.sharding.shard_shape(x.shape))) * n
    return dev, total


def lm_loss(model, batch, rng, frozen):
    del rng, frozen
    h = model.backbone(batch["tokens_BxT"], batch["mask_BxT"], logits=False).hidden
    return masked_nll(model.backbone.token_logprobs(h, batch["tokens_BxT"]), batch["mask_BxT"])


def report(name, mesh, batch, seq, compile_step: bool, remat: bool):
    cfg = ModelConfig(max_seq_len=max(seq, 1024), dtype="bfloat16", remat=remat, **SHAPES[name])
    abstract = nnx.eval_shape(lambda: TQR(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    p_sh = shd.param_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
    tx = optax.adamw(1e-5)
    opt = jax.eval_shape(tx.init, params)
    o_sh = shd.state_shardings(opt, p_sh, mesh)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, o_sh)
    n = mesh.devices.size
    (pd, pt), (od, ot) = per_device_bytes(params), per_device_bytes(opt)
    row = {"model": name, "params_total_gib": pt / 2**30, "params_per_device_gib": pd / 2**30,
           "params_vs_1/n": pd / (pt / n), "opt_per_device_gib": od / 2**30, "opt_vs_1/n": od / (ot / n)}
    if compile_step:
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        scalar = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
        state = TrainState(step=scalar, params=params, opt_state=opt, bad_steps=scalar)
        bsh = shd.batch_sharding(mesh, 2)
        example = {"tokens_BxT": jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=bsh),
                   "mask_BxT": jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=bsh)}
        with jax.set_mesh(mesh):
            step = make_train_step(graphdef, lm_loss, tx, mesh, state, example, StepOptions())
            compiled = step.lower(state, example, jax.random.key(0)).compile()
        mem = compiled.memory_analysis()
        row["temp_per_device_gib"] = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30
    return row


def lora_rows(name: str, rank: int) -> list[dict]:
    """GiB of each part of single-device fine-tuning, full and LoRA (abstract arrays only)."""
    from ava_jax.models import lora
    gib = 2.0 ** -30
    rows = []
    for param_dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(max_seq_len=1024, dtype="bfloat16", param_dtype=param_dtype, **SHAPES[name])

        def build():
            model = TQR(cfg, rngs=nnx.Rngs(0))
            model.backbone, _ = lora.apply(model.backbone, lora.LoraConfig(rank=rank))
            return model

        abstract = nnx.eval_shape(build)
        size = lambda f: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                             for x in jax.tree.leaves(nnx.state(abstract, f)))
        # The base: the backbone's weights; trained: the adapters and the heads (lora.trainable).
        base_filter = nnx.All(lora.is_base, nnx.Not(lora.trainable))
        base, adapters = size(base_filter), size(lora.trainable)
        n_adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, lora.trainable)))
        n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, base_filter)))
        if param_dtype == "float32":  # full fine-tuning: fp32 master weights, moments and gradients
            parts = dict(base=0, trained=4 * n_base, adam=8 * n_base, grads=4 * n_base, reference=2 * n_base)
            rows.append({"model": name, "mode": "full (fp32 master, bf16 reference)", **parts})
        parts = dict(base=base, trained=adapters, adam=8 * n_adapters, grads=4 * n_adapters, reference=0)
        rows.append({"model": name, "mode": f"LoRA r={rank}, base {param_dtype} (the reference)", **parts})
    for r in rows:
        r.update({k: r[k] * gib for k in ("base", "trained", "adam", "grads", "reference")})
        r["total"] = sum(r[k] for k in ("base", "trained", "adam", "grads", "reference"))
    return rows


def single_gpu(shapes, rank: int):
    print("one device, AdamW; GiB without activations (80 GB = 74.5 GiB); moments and gradients counted in fp32 "
          "(an upper bound where the trained part is bf16)")
    print("| model | fine-tuning | base weights | trained | AdamW moments | gradients | reference | total | "
          "fits 80 GB (before activations) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in shapes:
        for r in lora_rows(name, rank):
            print(f"| {r['model']} | {r['mode']} | {r['base']:.2f} | {r['trained']:.3f} | {r['adam']:.3f} | "
                  f"{r['grads']:.3f} | {r['reference']:.2f} | {r['total']:.2f} | "
                  f"{'yes' if r['total'] < 80e9 / 2**30 else 'no'} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--devices", default="8")
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--compile", action="store_true",
                   help="also compile the train step for its temporaries (slow on fake CPU devices: the "
                        "GPT-2-small step did not finish in 15 min on 2 cores; use an accelerator host)")
    p.add_argument("--single-gpu", action="store_true", help="full against LoRA fine-tuning on one device")
    p.add_argument("--lora-rank", type=int, default=16)
    args = p.parse_args()
    if args.single_gpu:
        return single_gpu(args.shapes.split(","), args.lora_rank)
    mesh = shd.make_mesh(data=-1, fsdp=args.fsdp)
    print(f"mesh: {shd.describe(mesh)}; global batch {args.batch} x {args.seq}; bf16 compute, fp32 parameters "
          "and AdamW moments")
    print("| model | params total GiB | params / device GiB (vs 1/n) | AdamW state / device GiB (vs 1/n) | "
          "step temporaries / device GiB, remat off / on |")
    print("|---|---|---|---|---|")
    for name in args.shapes.split(","):
        rows = [report(name, mesh, args.batch, args.seq, args.compile, remat) for remat in (False, True)] \
            if args.compile else [report(name, mesh, args.batch, args.seq, False, False)]
        r = rows[0]
        temp = " / ".join(f"{x['temp_per_device_gib']:.2f}" for x in rows) if args.compile else "-"
        ok = "ok" if abs(r["params_vs_1/n"] - 1) <= 0.05 and abs(r["opt_vs_1/n"] - 1) <= 0.05 else "NOT within 5%"
        print(f"| {name} | {r['params_total_gib']:.2f} | {r['params_per_device_gib']:.3f} ({r['params_vs_1/n']:.3f}x, "
              f"{ok}) | {r['opt_per_device_gib']:.3f} ({r['opt_vs_1/n']:.3f}x) | {temp} |", flush=True)


if __name__ == "__main__":
    main()
