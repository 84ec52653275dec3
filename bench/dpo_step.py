"""The DPO train step against a TRL-style PyTorch DPO step on the same shapes, side by side, and the
AVA-p direct step over the DPO step with a cached reference.

The PyTorch step is the one of ../shared/bench/anchor_quick.py (TRL's computation: policy forward +
backward on chosen and rejected, the reference forward online or precomputed as TRL's
precompute_ref_log_probs does), on a randomly initialised transformers Llama of the same shape.
Targets (docs/performance.md): the DPO step at least 2x PyTorch on the tiny shape and 1.0x on the
135M shape, each against the matching (online / cached) column; AVA-p direct at most 1.1x cached DPO.
Compare only on an idle machine: PyTorch's threads suffer more from contention than XLA's.

  python bench/dpo_step.py                               # TinyStories-260K shape, 8 pairs x 256
  python bench/dpo_step.py --models tiny,smollm2-shape --reps 3
  python bench/dpo_step.py --reps 10 --rounds 5          # JAX and PyTorch in turn, ratios per round
"""
from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np
import optax
from flax import nnx

from ava_jax import objectives
from ava_jax import sharding as shd
from ava_jax.losses import DpoConfig
from ava_jax.models import HeadConfig, ModelConfig, TQR
from ava_jax.train.step import freeze, init_train_state, make_train_step
# bench/model.py: PyTorch in its own process, a median after a warm-up, 'median (min-max)' of rounds
from model import add_malloc_flag, host_allocator, in_fresh_process, spread, timed

SHAPES = {
    "tiny": dict(d_model=64, d_ff=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512),
    "smollm2-shape": dict(d_model=576, d_ff=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152),
}


def pair_batch(B, T, V, seed=0):
    """Full-length rows, prompt = first token (the PyTorch step sums every next-token log-prob)."""
    rng = np.random.default_rng(seed)

    def side():
        return {"tokens_BxT": rng.integers(3, V, (B, T)).astype(np.int32), "mask_BxT": np.ones((B, T), np.int32),
                "prompt_len_B": np.ones((B,), np.int32)}
    return {"chosen": side(), "rejected": side()}


def jax_steps(shape, batch, reps):
    """Compiles the three steps once; returns `measure()`, which times them again:
    {"dpo online", "dpo cached", "ava_p"}: median step seconds."""
    cfg = ModelConfig(arch="llama", max_seq_len=1024, tie_embeddings=True, **SHAPES[shape])
    mesh = shd.make_mesh()
    runs = {}
    with jax.set_mesh(mesh):
        for name in ("dpo online", "dpo cached", "ava_p"):
            heads = HeadConfig(weight_heads="reward")
            model = TQR(cfg, heads, rngs=nnx.Rngs(0))
            opt = optax.adamw(1e-5)
            graphdef, state = init_train_state(model, opt, mesh)
            b, frozen = dict(batch), None
            if name == "dpo online":
                frozen = freeze({"reference": TQR(cfg, heads, rngs=nnx.Rngs(1))}, mesh)
            if name == "dpo cached":
                b["reference"] = {"chosen_B": np.full((len(batch["chosen"]["tokens_BxT"]),), -100.0, np.float32),
                                  "rejected_B": np.full((len(batch["chosen"]["tokens_BxT"]),), -100.0, np.float32)}
            if name == "ava_p":
                objective, lcfg = objectives.get("ava_p"), objectives.get("ava_p").config(
                    normalize="sequence", cer="logsigmoid", cer_score="sum", td_terminal="zero")
            else:
                objective, lcfg = objectives.get("dpo"), DpoConfig()
            kwargs = {"frozen": frozen} if frozen is not None else {}
            step = make_train_step(graphdef, objective.loss_fn(lcfg), opt, mesh, state, b, **kwargs)
            box = [state]

            def run(step=step, box=box, b=b):
                box[0], m = step(box[0], b, jax.random.key(0))
                jax.block_until_ready(m)

            runs[name] = run  # timed() calls it once before timing: the first round's call compiles

    def measure():
        with jax.set_mesh(mesh):
            return {name: timed(run, reps) for name, run in runs.items()}
    return measure


def torch_steps(shape, pairs, seq, reps):
    """{"dpo online", "dpo cached"}: the TRL-style PyTorch step's median seconds (on `pair_batch`;
    call it through `in_fresh_process`)."""
    import torch
    import transformers
    s = SHAPES[shape]
    batch = pair_batch(pairs, seq, s["vocab_size"])
    cfg = transformers.LlamaConfig(hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                                   num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                                   num_key_value_heads=s["n_kv_heads"], vocab_size=s["vocab_size"],
                                   tie_word_embeddings=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    model, ref = transformers.LlamaForCausalLM(cfg).float().train(), transformers.LlamaForCausalLM(cfg).float().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    xc = torch.tensor(batch["chosen"]["tokens_BxT"], dtype=torch.long)
    xr = torch.tensor(batch["rejected"]["tokens_BxT"], dtype=torch.long)

    def logp(m, ids):
        lp = torch.log_softmax(m(ids).logits[:, :-1].float(), -1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    def step(rc, rr):
        opt.zero_grad()
        pc, pr = logp(model, xc), logp(model, xr)
        loss = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        opt.step()

    def online():
        with torch.no_grad():
            rc, rr = logp(ref, xc), logp(ref, xr)
        step(rc, rr)

    with torch.no_grad():
        rc0, rr0 = logp(ref, xc), logp(ref, xr)
    return {"dpo online": timed(online, reps), "dpo cached": timed(lambda: step(rc0, rr0), reps)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure JAX and PyTorch (a fresh process) in turn this many times; ratios per round")
    p.add_argument("--no-torch", action="store_true")
    add_malloc_flag(p)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.pairs} pairs x {args.seq} tokens "
          f"(tok/s counts chosen + rejected), median of {args.reps} steps after one warm-up"
          + (f"; ratios: median (range) of {args.rounds} rounds, JAX and PyTorch in turn" if args.rounds > 1 else "")
          + f"; {host_allocator(args)}")
    print("| model | DPO online tok/s: ours / torch | ratio | DPO cached tok/s: ours / torch | ratio "
          "| AVA-p direct / DPO cached (time) |")
    print("|---|---|---|---|---|---|")
    for shape in args.models.split(","):
        batch = pair_batch(args.pairs, args.seq, SHAPES[shape]["vocab_size"])
        reps = args.reps if shape == "tiny" else max(2, args.reps // 2)
        measure = jax_steps(shape, batch, reps)
        ours, theirs = [], []
        for _ in range(args.rounds):  # JAX, then PyTorch in a fresh process, in turn: drift hits both
            ours.append(measure())
            if not args.no_torch:
                theirs.append(in_fresh_process("dpo_step", "torch_steps", shape=shape, pairs=args.pairs,
                                               seq=args.seq, reps=reps))
        tok = 2 * args.pairs * args.seq
        med = lambda rs, k: statistics.median(r[k] for r in rs)

        def cell(k):
            if not theirs:
                return f"{tok / med(ours, k):.0f} / -", "-"
            return (f"{tok / med(ours, k):.0f} / {tok / med(theirs, k):.0f}",
                    spread([t[k] / o[k] for o, t in zip(ours, theirs)]))
        on, on_r = cell("dpo online")
        ca, ca_r = cell("dpo cached")
        ava = spread([o["ava_p"] / o["dpo cached"] for o in ours])
        print(f"| {shape} | {on} | {on_r} | {ca} | {ca_r} | {ava} |", flush=True)
        if len(theirs) > 1:
            print(f"{shape} per round, online / cached vs torch: " + ", ".join(
                f"{t['dpo online'] / o['dpo online']:.2f}/{t['dpo cached'] / o['dpo cached']:.2f}"
                for o, t in zip(ours, theirs)))


if __name__ == "__main__":
    main()
