"""`xla.jit`: the package's programs are compiled with the backend's options (LLVM at -O2 on CPU),
the options reach the compiler, and they change no result beyond float32 rounding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax import xla
from ava_jax.models import TQR

from conftest import tiny_config


def test_on_cpu_the_options_are_the_cpu_options():
    assert jax.default_backend() == "cpu"
    assert xla.compiler_options() == xla.CPU_OPTIONS == {"xla_backend_optimization_level": 2}
    assert xla.compiler_options() is not xla.CPU_OPTIONS  # a copy: a caller cannot change the package's


def test_an_option_set_in_xla_flags_is_left_to_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=3")
    assert xla.compiler_options() is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert xla.compiler_options() == xla.CPU_OPTIONS


def test_the_options_reach_the_compiler(monkeypatch):
    """A name XLA does not know fails the compile: the options are passed, not dropped."""
    monkeypatch.setattr(xla, "CPU_OPTIONS", {**xla.CPU_OPTIONS, "not_an_xla_option": 1})
    with pytest.raises(Exception, match="not_an_xla_option"):
        xla.jit(lambda x: x + 1)(jnp.ones(3))


def test_both_decorator_forms_and_jit_arguments():
    @xla.jit
    def plain(x):
        return x * 2

    @xla.jit(static_argnames=("n",))
    def with_static(x, *, n):
        return x * n

    np.testing.assert_array_equal(plain(jnp.arange(3)), [0, 2, 4])
    np.testing.assert_array_equal(with_static(jnp.arange(3), n=3), [0, 3, 6])


def test_a_padded_forward_and_its_gradient_agree_with_xlas_defaults():
    """The padding-masked forward (the program whose compile time the option cuts most) and its
    gradient, against the same program at XLA's default -O3, to float32 rounding."""
    model = TQR(tiny_config(max_seq_len=48), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 97, (4, 40)), jnp.int32)
    mask = jnp.asarray(np.arange(40)[None, :] >= np.array([[0], [3], [11], [25]]))  # left padding

    def loss(p):
        h = nnx.merge(graphdef, p).backbone(tokens, mask, logits=False).hidden
        return jnp.sum(jnp.where(mask[..., None], h, 0.0) ** 2) / jnp.sum(mask)

    fn = jax.value_and_grad(loss)
    (v_opt, g_opt), (v_ref, g_ref) = xla.jit(fn)(params), jax.jit(fn)(params)
    np.testing.assert_allclose(v_opt, v_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_opt), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
