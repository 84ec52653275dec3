"""Which attention kernel a compiled train step actually uses, read from the optimised HLO.

On a GPU, `jax.nn.dot_product_attention` runs cuDNN's fused (flash) attention only when asked for
it (`model.attention` "auto" or "cudnn" resolves to `models.attention.cudnn_causal_attention`, which
does); otherwise XLA materialises the scores. This compiles the backbone's train step for one shape
and reports what the HLO holds: cuDNN fMHA custom calls, and [.., T, T] score tensors. With the
cuDNN path the HLO still holds score tensors: those of the masked fallback branch that batches
with left padding or holes take. On a CPU there are neither (the blocked kernel's scores are
per block, the compiled kernel's, `model.attention="cpu_kernel"`, per row inside its custom call).

  python bench/attention_path.py --arch gpt2 --seq 1024 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax.losses.lm import masked_nll
from ava_jax.models import ModelConfig, Transformer
from ava_jax.models.attention import resolve


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto")
    args = p.parse_args()
    kv = 12 if args.arch == "gpt2" else 4
    cfg = ModelConfig(arch=args.arch, vocab_size=50257, d_model=768, n_layers=2, n_heads=12, n_kv_heads=kv,
                      d_ff=3072, max_seq_len=max(args.seq, 1024), dtype=args.dtype, attention=args.attention)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(tokens)

    def loss(p):
        m = nnx.merge(graphdef, p)
        return masked_nll(m.token_logprobs(m(tokens, mask, logits=False).hidden, tokens), mask)[0]

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    T = args.seq
    fmha = sorted(set(re.findall(r'custom_call_target="([^"]*(?:fmha|cudnn)[^"]*)"', hlo)))
    scores = len(re.findall(rf"\[{args.batch},\d+,(?:\d+,)?{T},{T}\]", hlo))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); {args.arch}, {args.batch} x {T}, "
          f"{args.dtype}; model.attention={args.attention} -> {resolve(cfg, cached=False)}")
    print(f"cuDNN fused-attention custom calls: {fmha if fmha else 'none'}")
    print(f"full [B, N, T, T] score arrays in the HLO: {scores}"
          + (" (the masked fallback branch's, for batches that are not right-padded)" if fmha else ""))
    print(f"flash path taken: {'yes' if fmha else 'no'}")


if __name__ == "__main__":
    main()
