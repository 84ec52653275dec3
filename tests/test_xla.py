"""`xla.jit`: the package's programs are compiled with the backend's options (LLVM at -O2 on CPU),
the options reach the compiler, and they change no result beyond float32 rounding; and the drivers'
compilation cache (`xla.cache_compilations_for_this_process`)."""
import os
import subprocess
import sys
import tempfile

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


# In a process of its own: pytest's own compilation cache (conftest) would leave the function nothing to do.
_CACHE_SCRIPT = r"""
import os, sys, jax, numpy as np
import jax._src.compilation_cache as cc
mode = sys.argv[1]
if mode == "unreadable":  # as on the hosts of jax-ml/jax#38445: every entry is rejected on load
    def reject(*args, **kwargs):
        raise RuntimeError("Target machine feature +prefer-no-gather is not supported on the host machine")
    cc.get_executable_and_time = reject
from ava_jax import xla
path = xla.cache_compilations_for_this_process()
print("path", path, "config", jax.config.jax_compilation_cache_dir)
if path:
    hits = []
    jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e.endswith("/cache_hits") else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    for _ in range(2):  # two cells' runs: new functions, the same program
        def step(v):
            return jax.numpy.tanh(v @ v.T).sum()
        jax.jit(step).lower(np.ones((4, 4), np.float32)).compile()
    print("hits", len(hits), "entries", len(os.listdir(path)))
"""


@pytest.mark.parametrize("mode", ["fresh", "user", "unreadable"])
def test_the_drivers_compilation_cache(mode, tmp_path):
    """cache_compilations_for_this_process: a second run's program is loaded, not compiled, and the
    directory goes at exit; a user's JAX_COMPILATION_CACHE_DIR wins; a host that cannot load its
    entries back keeps the cache off."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if mode == "user":
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "mine")
    p = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, mode], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    words = p.stdout.split()
    path = words[1]
    if mode == "fresh":
        assert path.startswith(tempfile.gettempdir()) and words[3] == path
        # the probe's entry and the step's; the second compile of the step was a hit
        assert words[words.index("hits") + 1] == "1" and words[words.index("entries") + 1] == "2", p.stdout
        assert not os.path.exists(path)  # removed at exit
    elif mode == "user":
        assert path == "None" and words[3] == str(tmp_path / "mine"), p.stdout
    else:
        assert path == "None" and words[3] == "None", p.stdout
        assert "Error reading persistent compilation cache" not in p.stderr  # the probe's warning is its own
