"""The device mesh and every PartitionSpec in the project.

Axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer state
sharded), `tensor` (Megatron-style: attention heads, MLP width and vocabulary split). Specs are named
by the axis letters of the arrays they shard (`emb_vd`, `attn_q_dnh`, ...). A dimension that the
mesh axis does not divide is replicated rather than failing (e.g. 4 KV heads on 8 tensor devices).
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Parameter specs, by the axis letters of each weight (V vocab, D model, N heads, K kv heads, H head
# dim, F MLP width, S positions, W weighting width).
emb_vd = P("tensor", "fsdp")
pos_sd = P(None, "fsdp")
attn_q_dnh = P("fsdp", "tensor", None)
attn_o_nhd = P("tensor", None, "fsdp")
bias_nh = P("tensor", None)
mlp_in_df = P("fsdp", "tensor")
mlp_out_fd = P("tensor", "fsdp")
bias_f = P("tensor")
head_dv = P("fsdp", "tensor")
small_dw = P("fsdp", None)
replicated = P()
# Activation specs.
act_bt = P(BATCH, None)
act_btd = P(BATCH, None, None)

# First match wins (re.search); paths look like "backbone/blocks/3/attn/wq". A backbone on its own
# ("embed") and the same weights inside a TQR or an actor-critic ("backbone/embed",
# "critic_backbone/embed") get one spec, so a reference or initial policy is laid out as the policy.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)embed$", emb_vd),
    (r"(^|/)pos_embed$", pos_sd),
    (r"attn/w[qkv]$", attn_q_dnh),
    (r"attn/wo$", attn_o_nhd),
    (r"attn/b[qkv]$", bias_nh),
    (r"mlp/(w_gate|w_up|w_fc)$", mlp_in_df),
    (r"mlp/(w_down|w_proj)$", mlp_out_fd),
    (r"mlp/b_fc$", bias_f),
    (r"((^|/)lm_head|q_head/kernel|value_head/kernel)$", head_dv),
    (r"weighting/w[qk]$", small_dw),
    (r".*", replicated),  # norms, output biases, the reward head
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; `data=-1` takes every device not used by the other axes.

    Axes are `Auto` (sharding propagated by the compiler from the jit in/out shardings), so model
    code stays free of sharding annotations.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"mesh.fsdp * mesh.tensor = {fsdp * tensor} does not divide {n} devices")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) needs {data * fsdp * tensor} "
                         f"devices, but {n} are available")
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if key == "value":  # nnx.Variable's own pytree node
            continue
        parts.append(str(key))
    return "/".join(parts)


def fit_spec(spec: P, shape, mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
    out = []
    for i, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is None:
            out.append(None)
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axis if shape[i] % size == 0 else None)
    while out and out[-1] is None:  # P("x", None) and P("x") are the same; keep the short form
        out.pop()
    return P(*out)


def param_spec(path: str, shape, mesh) -> P:
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh)
    raise AssertionError("the last rule matches everything")


def param_shardings(abstract_params, mesh):
    """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs), by path."""
    def one(path, x):
        spec = param_spec(_path_str(path), x.shape, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, abstract_params)


def state_shardings(abstract_state, params_shardings, mesh):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path (Adam's mu and
    nu mirror the parameter tree) gets that parameter's sharding; counters and scalars replicate."""
    by_path = {_path_str(path): s for path, s in jax.tree_util.tree_leaves_with_path(params_shardings)}

    def one(path, x):
        parts = _path_str(path).split("/")
        for i in range(len(parts)):
            s = by_path.get("/".join(parts[i:]))
            if s is not None and len(s.spec) <= x.ndim:
                return NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def place(tree, shardings):
    """Copies of `tree`'s arrays in `shardings` (the caller's arrays stay valid, even after a step
    that donates the copies). On one device a device copy; on several each device's shard is built
    from a host copy (`jax.make_array_from_callback`): `device_put(..., may_alias=False)` onto a
    multi-device sharding was seen to share a replicated shard's buffer with the source, which the
    donating train step then deleted. On several processes every process holds the same values
    (e.g. the same checkpoint)."""
    if jax.device_count() == 1:
        return jax.device_put(tree, shardings, may_alias=False)

    def one(x, sh):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
    return jax.tree.map(one, tree, shardings)


def place_module(module, mesh) -> None:
    """Puts an NNX module's parameters in their shardings (`param_shardings`), in place.

    For a model that is evaluated but never trained, beside a train state's (the initial policy
    beside the trained one): its arrays then have the train state's shardings, and the jitted
    evaluations (sampling, log-probs), whose cache keys include the input shardings, reuse the
    programs compiled for it instead of compiling them again. Arrays already in place are kept (the
    module is never donated); on several processes each one is built as `place` builds them.
    """
    from flax import nnx
    params = nnx.state(module, nnx.Param)
    shardings = param_shardings(params, mesh)
    nnx.update(module, jax.device_put(params, shardings) if jax.process_count() == 1 else place(params, shardings))


def is_primary() -> bool:
    """Process 0: the one that writes summaries, exports, plots and logs (every process writes its
    part of the checkpoints)."""
    return jax.process_index() == 0


def process_shard() -> tuple[int, int]:
    """(process index, process count): which share of every global batch this process reads."""
    return jax.process_index(), jax.process_count()


def global_batch(batch, shardings):
    """This process's rows of a global batch -> global arrays (`jax.make_array_from_process_local_data`;
    the local rows are the process's contiguous block of the batch axis, as `data.batching` reads
    them). On one process the arrays are put in the step's shardings (host arrays are copied; device
    arrays already there are kept; one committed elsewhere, e.g. a rollout's, is resharded, which jit
    would refuse)."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, sh: jax.make_array_from_process_local_data(sh, np.asarray(x)), batch, shardings)


def check_batch_divides(batch_size: int, mesh, what: str = "train.batch_size") -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} does not divide the data-parallel mesh axes "
                         f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {n}; "
                         f"use a multiple of {n}")


def describe(mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" over {mesh.devices.size} device(s)"

