"""Run in a subprocess with 8 fake CPU devices (see test_sharding.py): a checkpoint saved on one mesh
restores onto another with the same parameter values, resharded on load; one of another model shape
is an error naming the tensor."""
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ava_jax import sharding as shd  # noqa: E402
from ava_jax.models import HeadConfig, TQR  # noqa: E402
from ava_jax.train.checkpoint import RunCheckpointer  # noqa: E402
from ava_jax.train.step import StepOptions, abstract_train_state, make_train_step  # noqa: E402
from conftest import tiny_config  # noqa: E402
from test_train_step import _batch, lm_loss_fn  # noqa: E402

assert jax.device_count() == 8, jax.devices()
opt = optax.adamw(1e-2)
batch = _batch(B=8, T=16, V=96)


def model_fn(d_model=32):
    cfg = tiny_config("llama", vocab_size=96, d_model=d_model, n_heads=8, n_kv_heads=4, d_ff=64)
    return lambda: TQR(cfg, HeadConfig(q_param="fresh"), rngs=nnx.Rngs(1))


workdir = tempfile.mkdtemp(prefix="ava_mesh_restore_")
save_mesh = shd.make_mesh(8, 1, 1)
with jax.set_mesh(save_mesh):
    graphdef, state = abstract_train_state(model_fn(), opt, save_mesh)
    step = make_train_step(graphdef, lm_loss_fn, opt, save_mesh, state, batch, StepOptions())
    state, _ = step(state, batch, jax.random.key(0))
    saved = jax.tree.map(np.asarray, state.params)
    ckpt = RunCheckpointer(workdir)
    ckpt.save(1, state, force=True)
    ckpt.close()

for shape in [(2, 2, 2), (1, 1, 8), (1, 8, 1)]:
    mesh = shd.make_mesh(*shape)
    with jax.set_mesh(mesh):
        _, target = abstract_train_state(model_fn(), opt, mesh)
        ckpt = RunCheckpointer(workdir)
        restored = ckpt.restore(target)
        ckpt.close()
    diff = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
               zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved)))
    wq = restored.params["backbone"]["blocks"][0]["attn"]["wq"][...]
    want = target.params["backbone"]["blocks"][0]["attn"]["wq"][...].sharding
    assert wq.sharding.is_equivalent_to(want, wq.ndim), (shape, wq.sharding, want)
    assert diff == 0.0, (shape, diff)
    assert int(restored.step) == 1
    print(f"restore onto mesh {shape}: identical parameters, wq shard {wq.addressable_shards[0].data.shape}")

mesh = shd.make_mesh(2, 2, 2)
with jax.set_mesh(mesh):
    _, other = abstract_train_state(model_fn(d_model=48), opt, mesh)
    ckpt = RunCheckpointer(workdir)
    try:
        ckpt.restore(other)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        message = str(e)
    else:
        raise AssertionError("a checkpoint of another shape restored")
    finally:
        ckpt.close()
print("shape mismatch:", message.splitlines()[0][:300])
# Orbax reports whichever mismatched array its restore meets first (not always the same one), so
# the message must name one of the arrays whose shape really differs between the two models.
def _shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


saved_shapes, other_shapes = _shapes(state), _shapes(other)
mismatched = [name for name, shape in other_shapes.items() if saved_shapes[name] != shape]
assert mismatched and "in the checkpoint but" in message, message[:2000]
assert any(name in message for name in mismatched), message[:2000]
print("OK")
