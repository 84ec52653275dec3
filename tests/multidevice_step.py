"""Run in a subprocess with 8 fake CPU devices (see test_sharding.py): one train step on several
meshes (and with a rematerialised backbone) must equal the single-device step, and parameter shards must have the expected shapes."""
import dataclasses
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ava_jax import sharding as shd  # noqa: E402
from ava_jax.models import HeadConfig, TQR  # noqa: E402
from ava_jax.train.step import StepOptions, abstract_train_state, make_train_step  # noqa: E402
from conftest import tiny_config  # noqa: E402
from test_train_step import _batch, lm_loss_fn  # noqa: E402

assert jax.device_count() == 8, jax.devices()
cfg = tiny_config("llama", vocab_size=96, d_model=32, n_heads=8, n_kv_heads=4, d_ff=64)
opt = optax.adamw(1e-2)
batch = _batch(B=8, T=16, V=96)


def model_fn(remat=False):
    return TQR(dataclasses.replace(cfg, remat=remat), HeadConfig(q_param="fresh"), rngs=nnx.Rngs(0))


def one_step(mesh, remat=False):
    with jax.set_mesh(mesh):
        graphdef, state = abstract_train_state(lambda: model_fn(remat), opt, mesh)
        step = make_train_step(graphdef, lm_loss_fn, opt, mesh, state, batch, StepOptions(accum_steps=2))
        state, metrics = step(state, batch, jax.random.key(0))
        return state, metrics


ref_state, ref_metrics = one_step(shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
ref = jax.tree.map(np.asarray, ref_state.params)
for shape in [(8, 1, 1), (2, 2, 2), (1, 1, 8)]:
    state, metrics = one_step(shd.make_mesh(*shape))
    diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)))
    loss_diff = abs(float(metrics["loss"][0]) - float(ref_metrics["loss"][0])) / float(ref_metrics["loss"][1])
    print(f"mesh {shape}: max |param diff| = {diff:.2e}, loss diff = {loss_diff:.2e}")
    assert diff < 1e-5 and loss_diff < 1e-5, (shape, diff, loss_diff)
    data, fsdp, tensor = shape
    params = state.params
    expect = {
        ("backbone", "embed"): (96 // tensor, 32 // fsdp),
        ("backbone", "blocks", 0, "attn", "wq"): (32 // fsdp, 8 // tensor, 4),
        ("backbone", "blocks", 0, "attn", "wk"): (32 // fsdp, 4 // tensor if 4 % tensor == 0 else 4, 4),
        ("backbone", "blocks", 0, "attn", "wo"): (8 // tensor, 4, 32 // fsdp),
        ("backbone", "blocks", 0, "mlp", "w_gate"): (32 // fsdp, 64 // tensor),
        ("backbone", "blocks", 0, "mlp", "w_down"): (64 // tensor, 32 // fsdp),
        ("q_head", "kernel"): (32 // fsdp, 96 // tensor),
        ("reward_head", "kernel"): (32, 2),
    }
    for path, want in expect.items():
        leaf = params
        for k in path:
            leaf = leaf[k]
        arr = leaf[...]
        got = arr.addressable_shards[0].data.shape
        assert got == want, (shape, path, got, want)
    # Adam's moments live where their parameters live.
    mu = state.opt_state[0].mu["backbone"]["blocks"][0]["attn"]["wq"]
    mu = mu[...]
    wq = params["backbone"]["blocks"][0]["attn"]["wq"][...]
    assert mu.sharding.is_equivalent_to(wq.sharding, wq.ndim), (shape, mu.sharding, wq.sharding)
# The rematerialised backbone (a checkpointed scan over the blocks' stacked, sharded parameters).
state, metrics = one_step(shd.make_mesh(2, 2, 2), remat=True)
diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)))
print(f"mesh (2, 2, 2) remat: max |param diff| = {diff:.2e}")
assert diff < 1e-5, diff
print("OK")
