"""Sharded train steps on 8 fake CPU devices, in a subprocess (XLA flags are read once per process)."""
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ava_jax import sharding as shd

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_script(name: str) -> str:
    """stdout of tests/<name> run in its own process (which must end by printing OK)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, name)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    return proc.stdout


def test_sharded_step_equals_single_device():
    stdout = _run_script("multidevice_step.py")
    for shape in ("(8, 1, 1)", "(2, 2, 2)", "(1, 1, 8)", "(2, 2, 2) remat"):
        assert f"mesh {shape}" in stdout


def test_fit_spec_replicates_indivisible_dims():
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])

    class M:
        shape = {"data": 1, "fsdp": 2, "tensor": 8}

    assert shd.fit_spec(P("fsdp", "tensor", None), (32, 4, 16), M) == P("fsdp")
    assert shd.fit_spec(P("fsdp", "tensor"), (32, 64), M) == P("fsdp", "tensor")
    assert shd.param_spec("backbone/blocks/0/attn/wq", (32, 8, 4), mesh) == P("fsdp", "tensor")
    assert shd.param_spec("backbone/ln_final/scale", (32,), mesh) == P()
    # A backbone on its own (a reference, an initial policy) is laid out as inside a TQR or an actor-critic.
    for name in ("embed", "pos_embed", "lm_head"):
        shape = (96, 32)
        assert (shd.param_spec(name, shape, mesh) == shd.param_spec(f"backbone/{name}", shape, mesh)
                == shd.param_spec(f"critic_backbone/{name}", shape, mesh) != P())


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_and_names_a_mismatched_tensor():
    """Saved on data=8, restored on (2, 2, 2), (1, 1, 8) and (1, 8, 1): identical values, resharded."""
    stdout = _run_script("multidevice_restore.py")
    for shape in ("(2, 2, 2)", "(1, 1, 8)", "(1, 8, 1)"):
        assert f"restore onto mesh {shape}: identical parameters" in stdout


def test_place_module_gives_an_evaluated_model_the_train_states_shardings():
    """The initial policy, evaluated beside the trained one, must hit the same compiled programs:
    jit keys its cache on input shardings, and a loaded model's arrays start unsharded."""
    import numpy as np
    import optax
    from flax import nnx

    from ava_jax.eval.policy import response_logprobs
    from ava_jax.models import TQR
    from ava_jax.train.step import init_train_state
    from conftest import tiny_config

    mesh = shd.make_mesh()
    model = TQR(tiny_config(), rngs=nnx.Rngs(0))
    initial = nnx.clone(model.backbone)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, optax.sgd(0.1), mesh)
        trained = nnx.merge(graphdef, state.params).backbone
        before = [x.sharding for x in jax.tree.leaves(nnx.state(initial, nnx.Param))]
        shd.place_module(initial, mesh)
        after = [x.sharding for x in jax.tree.leaves(nnx.state(initial, nnx.Param))]
        want = [x.sharding for x in jax.tree.leaves(nnx.state(trained, nnx.Param))]
        assert before != want and after == want
        prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
        lp0 = response_logprobs(initial, prompts, responses, pad_id=0, banned_ids=(96,), batch_size=2)
        lp1 = response_logprobs(trained, prompts, responses, pad_id=0, banned_ids=(96,), batch_size=2)
    np.testing.assert_array_equal(lp0, lp1)  # the same weights, the same program
    from ava_jax.eval import policy
    assert policy._response_logprob_fn(nnx.graphdef(trained), (96,))._cache_size() == 1
