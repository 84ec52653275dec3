"""The generic train step: exact gradient accumulation, skipped non-finite steps, bad batches, the
compiled memory analysis logged before step 1."""
import logging
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ava_jax import sharding as shd
from ava_jax.losses.lm import lm_loss
from ava_jax.models import TQR
from ava_jax.train.loop import IteratorBatches, LoopOptions, train_loop
from ava_jax.train.metrics import MetricWriter
from ava_jax.train.step import StepOptions, freeze, grads_and_metrics, init_train_state, make_train_step

from conftest import tiny_config


def lm_loss_fn(model, batch, rng, frozen=None):
    out = model.backbone(batch["tokens"], batch["mask"])
    return lm_loss(out.logits, batch["tokens"], batch["mask"])


def _batch(B=8, T=16, V=97, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, T + 1, size=B)  # ragged: micro-batches have different token counts
    mask = np.arange(T)[None] < lens[:, None]
    return dict(tokens=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), mask=jnp.asarray(mask))


def test_accumulation_equals_full_batch():
    """A batch of 8 equals 4 accumulated micro-steps of 2: loss normalised by the true token count."""
    model = TQR(tiny_config("llama"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = _batch()
    f = jax.jit(lambda p, b, k: grads_and_metrics(lm_loss_fn, graphdef, p, b, jax.random.key(0), k),
                static_argnums=2)
    g1, m1 = f(params, batch, 1)
    g4, m4 = f(params, batch, 4)
    loss1 = m1["loss"][0] / m1["loss"][1]
    loss4 = m4["loss"][0] / m4["loss"][1]
    assert abs(float(loss1 - loss4)) < 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # The true-count normalisation differs from a mean of per-micro-batch means on ragged data.
    micro_means = []
    for a in range(4):
        mb = jax.tree.map(lambda x: x[a::4], batch)
        micro_means.append(float(lm_loss_fn(nnx.merge(graphdef, params), mb, None)[0]))
    assert abs(np.mean(micro_means) - float(loss1)) > 1e-4
    # And the full-batch loss is the plain token-mean NLL computed directly.
    direct = lm_loss_fn(nnx.merge(graphdef, params), batch, None)[0]
    assert abs(float(direct - loss1)) < 1e-6


def test_train_step_decreases_loss_and_skips_nonfinite():
    mesh = shd.make_mesh()
    batch = _batch()
    graphdef, state = init_train_state(TQR(tiny_config("gpt2"), rngs=nnx.Rngs(1)), optax.adamw(3e-3), mesh)
    step = make_train_step(graphdef, lm_loss_fn, optax.adamw(3e-3), mesh, state, batch, StepOptions(accum_steps=2))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
    assert losses[-1] < losses[0] - 0.1, losses

    def nan_loss(model, batch, rng, frozen):
        loss, metrics = lm_loss_fn(model, batch, rng, frozen)
        s, c = metrics["loss"]
        return loss * jnp.nan, {"loss": (s * jnp.nan, c)}

    bad_step = make_train_step(graphdef, nan_loss, optax.adamw(3e-3), mesh, state, batch, StepOptions(donate=False))
    before = jax.tree.map(np.asarray, state.params)
    after, metrics = bad_step(state, batch, jax.random.key(0))
    assert float(metrics["skipped"][0]) == 1.0 and int(after.bad_steps) == 1 and int(after.step) == 6
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)


def test_a_good_step_is_the_optax_update_and_a_bad_one_leaves_the_donated_state_bit_identical():
    """The step's conditional update equals optax's update on the same gradients; a non-finite step
    with the state donated (the default) returns the old parameters and optimizer moments exactly."""
    mesh = shd.make_mesh()
    batch = _batch()
    opt = optax.adamw(3e-3)
    graphdef, state = init_train_state(TQR(tiny_config("llama"), rngs=nnx.Rngs(2)), opt, mesh)
    for _ in range(2):  # past the first step, so the moments are not zero
        state, _ = make_train_step(graphdef, lm_loss_fn, opt, mesh, state, batch)(state, batch, jax.random.key(0))
    host = lambda tree: jax.tree.map(np.asarray, tree)
    params0 = host(state.params)
    key = jax.random.key(3)
    grads, _ = jax.jit(lambda p: grads_and_metrics(lm_loss_fn, graphdef, p, batch,
                                                   jax.random.fold_in(key, state.step), 1))(state.params)
    updates, want_opt = opt.update(grads, state.opt_state, state.params)
    want = host((optax.apply_updates(state.params, updates), want_opt))
    good, metrics = make_train_step(graphdef, lm_loss_fn, opt, mesh, state, batch)(state, batch, key)
    assert float(metrics["skipped"][0]) == 0.0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(host((good.params, good.opt_state)))):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    params1, opt1 = host(good.params), host(good.opt_state)

    def nan_loss(model, batch, rng, frozen):
        loss, metrics = lm_loss_fn(model, batch, rng, frozen)
        s, c = metrics["loss"]
        return loss * jnp.nan, {"loss": (s * jnp.nan, c)}

    bad, metrics = make_train_step(graphdef, nan_loss, opt, mesh, good, batch)(good, batch, key)
    assert float(metrics["skipped"][0]) == 1.0 and int(bad.bad_steps) == 1
    for a, b in zip(jax.tree.leaves((params1, opt1)), jax.tree.leaves(host((bad.params, bad.opt_state)))):
        np.testing.assert_array_equal(a, b)
    moved = {jax.tree_util.keystr(k): not np.array_equal(a, b) for (k, a), b in
             zip(jax.tree_util.tree_flatten_with_path(params0)[0], jax.tree.leaves(params1))}
    assert all(v for k, v in moved.items() if "backbone" in k), moved  # the good step moved the LM's weights


def test_the_step_copies_none_of_the_donated_state():
    """The update runs in place: the compiled step holds no copy of a parameter or optimizer moment
    (a select between the updated and the old state made XLA copy every moment, twice the parameters'
    size in temporaries)."""
    mesh = shd.make_mesh()
    batch = _batch()
    opt = optax.adamw(3e-3)
    graphdef, state = init_train_state(TQR(tiny_config("llama"), rngs=nnx.Rngs(2)), opt, mesh)
    hlo = make_train_step(graphdef, lm_loss_fn, opt, mesh, state, batch).lower(
        state, batch, jax.random.key(0)).compile().as_text()
    names = re.findall(r"%(state_(?:params|opt_state)[\w.]*) = \S+ parameter\(", hlo)
    assert len(names) >= 2 * len(jax.tree.leaves(state.params)), names[:5]  # the state's leaves, by name
    copied = [n for n in names if re.search(rf"copy\(%{re.escape(n)}\)", hlo)]
    assert not copied, copied[:5]


def test_frozen_models_are_arguments_not_constants_and_stay_unchanged():
    """A loss reading a frozen reference (a KL to it, as DPO and PPO do) trains the policy only: the
    reference's parameters are arguments of the compiled step (not baked in as constants), are not
    donated, and are bitwise unchanged after several steps; a new reference reuses the program."""
    mesh = shd.make_mesh()
    batch = _batch()

    def kl_to_reference(model, batch, rng, frozen):
        logp = jax.nn.log_softmax(model.backbone(batch["tokens"], batch["mask"]).logits)
        ref = jax.nn.log_softmax(frozen["reference"].backbone(batch["tokens"], batch["mask"]).logits)
        m = batch["mask"][..., None]
        total = jnp.sum(jnp.where(m, jnp.exp(logp) * (logp - ref), 0.0))
        count = jnp.sum(batch["mask"], dtype=jnp.float32)
        return total / count, {"loss": (total, count)}

    graphdef, state = init_train_state(TQR(tiny_config("llama"), rngs=nnx.Rngs(0)), optax.adam(1e-2), mesh)
    frozen = freeze({"reference": TQR(tiny_config("llama"), rngs=nnx.Rngs(1))}, mesh)
    before = jax.tree.map(lambda x: np.array(x, copy=True), frozen.params)
    step = make_train_step(graphdef, kl_to_reference, optax.adam(1e-2), mesh, state, batch, frozen=frozen)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
    assert losses[-1] < losses[0], losses  # the policy moves toward the reference
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen.params)):
        assert not b.is_deleted()  # not donated
        np.testing.assert_array_equal(a, np.asarray(b))
    lowered = step.lower(state, batch, jax.random.key(0))
    n_frozen = len(jax.tree.leaves(frozen.params))
    assert len(jax.tree.leaves(lowered.args_info[0][3])) == n_frozen  # passed as arguments
    assert not any(info.donated for info in jax.tree.leaves(lowered.args_info[0][3]))
    # Another reference of the same shapes runs through the same compiled program.
    step.frozen = freeze({"reference": TQR(tiny_config("llama"), rngs=nnx.Rngs(2))}, mesh)
    misses = step.jitted._cache_size()
    state, _ = step(state, batch, jax.random.key(0))
    assert step.jitted._cache_size() == misses


def test_indivisible_batch_errors():
    mesh = shd.make_mesh()
    graphdef, state = init_train_state(TQR(tiny_config("llama"), rngs=nnx.Rngs(0)), optax.sgd(1e-3), mesh)
    with pytest.raises(ValueError, match="train.accum_steps=4"):
        make_train_step(graphdef, lm_loss_fn, optax.sgd(1e-3), mesh, state, _batch(B=6), StepOptions(accum_steps=4))
    with pytest.raises(ValueError, match="does not divide the data-parallel mesh axes"):
        shd.check_batch_divides(6, _FakeMesh({"data": 4, "fsdp": 1, "tensor": 1}))


class _FakeMesh:
    def __init__(self, shape):
        self.shape = shape


def test_the_loop_logs_the_compiled_memory_before_step_1_and_compiles_once(caplog):
    """Style point 10: the step is compiled before it first runs and XLA's memory analysis is logged;
    the jitted call then reuses that executable (one backend compile of the step in the whole run)."""
    mesh = shd.make_mesh()
    batch = _batch()
    graphdef, state = init_train_state(TQR(tiny_config("gpt2"), rngs=nnx.Rngs(1)), optax.adamw(3e-3), mesh)
    param_mib = sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2 ** 20
    step = make_train_step(graphdef, lm_loss_fn, optax.adamw(3e-3), mesh, state, batch)
    compiles = []

    def on_event(event, _, **kw):
        if event.endswith("backend_compile_duration"):
            compiles.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        with caplog.at_level(logging.INFO, logger="ava_jax.train.loop"):
            state, _ = train_loop(step, state, IteratorBatches(iter([batch] * 3)), jax.random.key(0),
                                  LoopOptions(num_steps=3, log_every=1, progress=False), writer=MetricWriter(None))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert int(state.step) == 3 and compiles.count("jit(step)") == 1, compiles
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled train step")]
    arguments = float(line.split("arguments ")[1].split(" MiB")[0].replace(",", ""))
    assert arguments >= 3 * param_mib  # parameters and both AdamW moments at least
    assert float(line.split("temporaries ")[1].split(" MiB")[0].replace(",", "")) > 0


def test_log_records_print_above_the_progress_bar_not_after_it(capsys):
    """A record logged while the bar is drawn (the compiled memory before step 1, an evaluation)
    starts a line of its own: without `logs_above_bars` it is appended to the bar's text."""
    mesh = shd.make_mesh()
    batch = _batch()
    graphdef, state = init_train_state(TQR(tiny_config("gpt2"), rngs=nnx.Rngs(1)), optax.adamw(3e-3), mesh)
    step = make_train_step(graphdef, lm_loss_fn, optax.adamw(3e-3), mesh, state, batch)
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as logging.basicConfig installs
    logger = logging.getLogger("ava_jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_loop(step, state, IteratorBatches(iter([batch] * 2)), jax.random.key(0),
                   LoopOptions(num_steps=2, log_every=1, progress=True), writer=MetricWriter(None),
                   eval_fn=lambda s: {"accuracy": 0.5})
        after = list(logger.handlers)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler in after  # the loop put the console handler back after the run
    err = capsys.readouterr().err
    assert "train: 100%" in err  # the bar was drawn on the same stream
    for needle in ("compiled train step", "step 2 eval: accuracy=0.5000"):
        at = err.index(needle)
        assert err[at - 1] in "\r\n", repr(err[max(0, at - 80):at + len(needle)])
