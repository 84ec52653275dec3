"""Weight products: `y = einsum(eq, x, w)` with the weight gradient contracted as x^T g.

Every projection of the backbone is one einsum with the activations on the left and the weight on
the right (`"btd,df->btf"`, `"btd,dnh->btnh"`, `"btnh,nhd->btd"`). JAX's transpose rule forms the
weight's gradient as (g^T x)^T: a product with the output's free axes first, then a transpose. On
the CPU backend XLA absorbs that transpose by writing g transposed ([F, B*T]) inside the elementwise
fusion that produces it, a strided write that cost more than a tenth of the SmolLM2-135M-shape
train step (docs/performance.md). `weight_einsum` gives the same einsum a VJP that contracts
x^T g in the weight's own axis order, which XLA lays out without the transposed copy. Values are
the same products (gradients agree with autodiff to float32 rounding; tests/test_model.py checks
them against float64 NumPy).

LoRA adapters (`models.lora`, through qwix) attach by intercepting `jnp.einsum` while an adapted
model runs (qwix swaps the function's code object; other interceptors may replace the attribute).
A custom VJP cannot see the adapters' parameters, so whenever `jnp.einsum`'s code is not the code
this module saw at import (an interceptor is active) the product is the plain intercepted einsum
and autodiff differentiates it. Under LoRA the base weights are frozen, so their gradient,
the one this VJP speeds up, is not computed anyway.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_EINSUM_CODE = jnp.einsum.__code__


def _intercepted() -> bool:
    return getattr(jnp.einsum, "__code__", None) is not _EINSUM_CODE


def weight_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(eq, x, w)` for an `eq` "<x axes>,<w axes>-><out axes>" in which every axis of
    either operand is contracted with the other or kept in the output (a projection); its VJP
    contracts each gradient in its operand's axis order."""
    if _intercepted():  # qwix (LoRA) is intercepting einsums: let it see this one
        return jnp.einsum(eq, x, w)
    return _einsum_xtg(eq, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_xtg(eq, x, w):
    return jnp.einsum(eq, x, w)


def _fwd(eq, x, w):
    return jnp.einsum(eq, x, w), (x, w)


def _bwd(eq, res, g):
    x, w = res
    xs, rest = eq.split(",")
    ws, outs = rest.split("->")
    dx = jnp.einsum(f"{outs},{ws}->{xs}", g, w)
    dw = jnp.einsum(f"{xs},{outs}->{ws}", x, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum_xtg.defvjp(_fwd, _bwd)
