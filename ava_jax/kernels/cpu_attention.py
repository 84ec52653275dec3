"""Causal self-attention with key padding as a compiled CPU kernel (`cpu_attention.cc`).

`models.attention` uses it for `model.attention="cpu_kernel"` (head dims 8, 16, 32, 64), and for
"auto" on CPU at head dim 8, where it builds: the same heads-major layout, the same residuals and
the same custom VJP as the XLA query-blocked kernel there, with the forward and the flash backward
each one custom call instead of a few dozen XLA ops per query block. TinyStories-260K LM train step
on 2 cores: 114.4 -> 70.9 ms, forward 30.0 -> 19.8 ms (`python bench/attention_cpu.py`;
docs/performance.md, ninth pass).

Under a mesh the calls run per shard (`jax.shard_map`): the batch split as the mesh's data axes
split it and the key/value heads as its tensor axis does, where they divide; XLA would otherwise
gather the whole batch onto every device for a custom call it cannot partition. Under `vmap` the
calls run once per vmapped element.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ava_jax import sharding as shd
from ava_jax.kernels import build

_FORWARD = "ava_jax_causal_attention_forward"
_BACKWARD = "ava_jax_causal_attention_backward"


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel is built and registered with JAX; otherwise why it is not (once per process)."""
    try:
        lib = build.load("cpu_attention")
    except build.BuildError as e:
        return str(e)
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.AvaCausalAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.AvaCausalAttentionBackward), platform="cpu")
    return None


def _require():
    reason = unavailable_reason()
    if reason is not None:
        raise build.BuildError(reason)


def shard_specs(q_shape, mesh) -> tuple[P, P]:
    """(spec of every [B, K, ...] operand, spec of key_valid [B, T]) on `mesh`: the batch over the data
    axes and the key/value heads over the tensor axis, each where it divides (else replicated)."""
    batch = tuple(a for a in shd.BATCH if a in mesh.axis_names) or None
    heads = "tensor" if "tensor" in mesh.axis_names else None
    return shd.fit_spec(P(batch, heads), q_shape[:2], mesh), shd.fit_spec(P(batch), q_shape[:1], mesh)


def _per_shard(fn, args, n_out: int):
    """fn(*args) on each shard of the context mesh (`shard_specs`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    spec, valid_spec = shard_specs(args[0].shape, mesh)
    in_specs = tuple(valid_spec if a.ndim == 2 else spec for a in args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(spec,) * n_out,
                         check_vma=False)(*args)


def forward(q, k, v, key_valid):
    """(o [B, K, G, T, H], lse [B, K, G, T, 1]) of float32 q [B, K, G, T, H] (scaled), k, v [B, K, T, H]."""
    _require()

    def call(q, k, v, key_valid):
        return jax.ffi.ffi_call(_FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                           jax.ShapeDtypeStruct(q.shape[:-1] + (1,), jnp.float32)),
                                vmap_method="sequential")(q, k, v, key_valid.astype(bool))
    return _per_shard(call, (q, k, v, key_valid), 2)


def backward(q, k, v, key_valid, o, lse, do):
    """(dq, dk, dv) of the forward above, given its output o, its lse and the output's cotangent do."""
    _require()

    def call(q, k, v, key_valid, o, lse, do):
        return jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                            jax.ShapeDtypeStruct(k.shape, jnp.float32),
                                            jax.ShapeDtypeStruct(v.shape, jnp.float32)),
                                vmap_method="sequential")(q, k, v, key_valid.astype(bool), o, lse, do)
    return _per_shard(call, (q, k, v, key_valid, o, lse, do), 3)
