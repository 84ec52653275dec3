"""PPO rollouts: our jitted KV-cache sampler against transformers' `generate` on the same policy and
shapes in one run, and a PPO iteration split into generation, policy forward, reference pass, reward
pass and update (the `ppo` pipeline's own timers).

Both samplers draw B rows of exactly N new tokens (no early EOS) after the same left-padded
prompts, from the bundled TinyStories-260K weights (exported to a Hugging Face directory for
transformers). Compare only on an idle machine.

  python bench/ppo_rollout.py                       # B=64, N=24 and N=64, then a short PPO run
  python bench/ppo_rollout.py --no-ppo --batch 16,64 --new 64
"""
from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from ava_jax.checkpoints.load import load_pretrained, save_pretrained
from ava_jax.config import BUNDLED
from ava_jax.rl.rollout import left_pad
from ava_jax.sampling import SamplingConfig, generate
from model import timed  # bench/model.py: the median of timed calls after one warm-up


def prompts(b, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 512, rng.integers(6, 15)).tolist() for _ in range(b)]


def ours(model, ptok, pmask, n, reps):
    cfg = SamplingConfig(max_new_tokens=n, temperature=1.0, eos_id=None, pad_id=0, new_bucket=n)
    key = jax.random.key(0)
    return timed(lambda: jax.block_until_ready(generate(model.backbone, (ptok, pmask), key, cfg).tokens), reps)


def torch_generate(hf_dir, ptok, pmask, n, reps):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids, att = torch.tensor(np.asarray(ptok), dtype=torch.long), torch.tensor(np.asarray(pmask), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=att, do_sample=True, max_new_tokens=n, min_new_tokens=n,
                             use_cache=True, pad_token_id=0, top_k=0, top_p=1.0, temperature=1.0)
        assert out.shape[1] == ids.shape[1] + n
    return timed(run, reps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="64")
    p.add_argument("--new", default="24,64")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-ppo", action="store_true")
    args = p.parse_args()
    model, _ = load_pretrained(BUNDLED["tinystories-260k"])
    hf_dir = tempfile.mkdtemp(prefix="ava_bench_hf_")
    save_pretrained(model, None, hf_dir)
    print(f"devices: {jax.devices()}")
    print("| batch | new tokens | ours tokens/s | transformers generate tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for b in (int(x) for x in args.batch.split(",")):
        ptok, pmask = left_pad(prompts(b), 0, 16)
        for n in (int(x) for x in args.new.split(",")):
            t_ours = ours(model, ptok, pmask, n, args.reps)
            t_torch = float("nan") if args.no_torch else torch_generate(hf_dir, ptok, pmask, n, args.reps)
            print(f"| {b} | {n} | {b * n / t_ours:,.0f} | {b * n / t_torch:,.0f} | {t_torch / t_ours:.2f}x |",
                  flush=True)
    if args.no_ppo:
        return
    from ava_jax.pipelines import ppo
    c = ppo.default_config("tiny")
    c.workdir = tempfile.mkdtemp(prefix="ava_bench_ppo_")
    c.ppo.update(iterations=6, rollout_batch=64, minibatches=4, epochs=2)
    c.data.stories.update(num_pairs=256, num_eval_pairs=32)
    r = ppo.run(c)
    split = ppo.timing(r.rollouts)
    total = sum(split.values())
    print("\nPPO iteration (stories tiny, 64 rollouts x 24 tokens, 2 epochs x 4 minibatches; mean over the "
          "iterations after the compiling ones):")
    for k, v in split.items():
        print(f"  {k:16s} {v:7.3f} s  ({100 * v / total:4.1f}%)")
    os.system(f"rm -rf {hf_dir} {c.workdir}")


if __name__ == "__main__":
    main()
