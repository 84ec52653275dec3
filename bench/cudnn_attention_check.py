"""GPU-only check of the cuDNN attention path against XLA's, in value and gradient.

`models.attention.cudnn_causal_attention` is tested on CPU with XLA standing in for cuDNN (the same
causal flag and sequence lengths); only a GPU can show that cuDNN itself accepts our shapes and agrees.
For each padding (none, right: the fused branch; left: the masked fallback) and head layout (multi-head
and grouped-query), this compares the path with cuDNN against the same path with XLA, on real
positions, in bf16, and says whether the compiled gradient holds cuDNN's custom calls.

  python bench/cudnn_attention_check.py        # prints one line per case and "OK" or "MISMATCH"
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ava_jax.models import attention as attn_lib


def _case(B, T, N, K, H, padding, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H), dtype) for kk, n in zip(keys, (N, K, K)))
    n_real = np.linspace(T, T // 3, B).astype(int)[:, None]
    slots = np.arange(T)[None]
    valid = {"none": np.ones((B, T), bool), "right": slots < n_real, "left": slots >= T - n_real}[padding]
    valid = jnp.asarray(valid)
    w = (jax.random.normal(keys[3], (B, T, N, H), jnp.float32) * valid[:, :, None, None]).astype(dtype)

    def run(implementation):
        f = functools.partial(attn_lib.cudnn_causal_attention, key_valid_BxT=valid, scale=H ** -0.5,
                              implementation=implementation)

        def loss(q, k, v):
            return jnp.sum((f(q, k, v) * w).astype(jnp.float32))

        step = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))
        hlo = step.lower(q, k, v).compile().as_text()
        out, grads = step(q, k, v)
        return out, grads, sorted(set(re.findall(r'custom_call_target="([^"]*cudnn[^"]*)"', hlo)))

    out_c, grads_c, calls = run("cudnn")
    out_x, grads_x, _ = run("xla")
    real = np.asarray(valid)[:, :, None, None]

    def rel(a, b, where=True):  # max |a - b| relative to max |b|, over `where`
        a, b = np.where(where, np.asarray(a, np.float32), 0), np.where(where, np.asarray(b, np.float32), 0)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))

    # Outputs on real positions only; gradients everywhere (padding queries get a zero cotangent).
    return [rel(out_c, out_x, real)] + [rel(gc, gx) for gc, gx in zip(grads_c, grads_x)], calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tol", type=float, default=2e-2, help="relative tolerance (bf16 has 8 mantissa bits)")
    args = p.parse_args()
    if not attn_lib.cudnn_available():
        print(f"no NVIDIA GPU (backend {jax.default_backend()}): nothing to check")
        return 0
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, T={args.seq}, {args.dtype}")
    ok = True
    for N, K in ((12, 12), (12, 4)):
        for padding in ("none", "right", "left"):
            errs, calls = _case(4, args.seq, N, K, 64, padding, jnp.dtype(args.dtype))
            good = max(errs) <= args.tol and bool(calls)
            ok &= good
            print(f"heads {N}/{K}, padding {padding:5s}: rel. error out {errs[0]:.1e}, dq {errs[1]:.1e}, "
                  f"dk {errs[2]:.1e}, dv {errs[3]:.1e}; cuDNN calls {calls or 'none'} -> "
                  f"{'ok' if good else 'MISMATCH'}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
