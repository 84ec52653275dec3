"""A generic train step: jitted once with explicit shardings and donation, exact gradient
accumulation, and non-finite steps skipped inside the step.

A loss function has the signature `loss_fn(model, batch, rng, frozen) -> (loss, metrics)` where
`model` is the NNX module rebuilt from its parameters, `frozen` a dict of frozen NNX modules (a
reference policy, a reward model: `FrozenModels`, passed into the jitted step as sharded,
non-donated arguments, so they are neither constants of the program nor trained), and
`metrics["loss"] = (loss_sum, count)`, `count` being the true normaliser (valid tokens or pairs). Micro-batch gradients are weighted by their counts, so
accumulating k micro-batches gives exactly the gradient of loss_sum_total / count_total, not a mean
of means.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ava_jax import sharding as shd
from ava_jax import xla


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of Params
    opt_state: Any
    bad_steps: jax.Array  # consecutive non-finite steps ending at `step`


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh, trainable=nnx.Param):
    """Splits the model and creates parameters and optimizer state directly in their shardings.

    Returns (graphdef, TrainState). The parameters are placed by `sharding.PARAM_RULES`; the optimizer
    state is created by a jitted `optimizer.init`, which gives Adam's moments their parameter's sharding.
    trainable: the NNX filter of what the state trains (default every Param; `models.lora.trainable`
    for a LoRA run, whose other parameters are `fixed_params`).
    """
    graphdef, params, _ = nnx.split(model, trainable, ...)
    # may_alias=False: the step donates its state, which must not delete the caller's model arrays.
    params = shd.place(params, shd.param_shardings(params, mesh))
    return graphdef, _state(params, optimizer, mesh)


def fixed_params(model: nnx.Module, trainable, mesh):
    """The parameters outside `trainable` (a LoRA run's base weights) placed by `sharding.PARAM_RULES`,
    sharing the model's buffers where they already sit there: the step never donates them."""
    _, _, fixed = nnx.split(model, trainable, ...)
    return jax.device_put(fixed, shd.param_shardings(fixed, mesh))


def abstract_train_state(model_fn: Callable[[], nnx.Module], optimizer, mesh):
    """Creates a train state from scratch with every array born in its final sharding (no host copy).

    `model_fn` builds the model (e.g. `lambda: TQR(cfg, rngs=nnx.Rngs(0))`).
    """
    abstract = nnx.eval_shape(model_fn)
    graphdef, abs_params = nnx.split(abstract, nnx.Param)
    param_sh = shd.param_shardings(abs_params, mesh)

    def make():
        return nnx.split(model_fn(), nnx.Param)[1]

    params = xla.jit(make, out_shardings=param_sh)()
    return graphdef, _state(params, optimizer, mesh)


def _state(params, optimizer, mesh) -> TrainState:
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = shd.state_shardings(jax.eval_shape(optimizer.init, params), params_sh, mesh)
    opt_state = xla.jit(optimizer.init, out_shardings=opt_sh)(params)
    # Separate buffers: donation forbids two state leaves sharing one.
    zeros = [shd.place(jnp.zeros((), jnp.int32), NamedSharding(mesh, P())) for _ in range(2)]
    return TrainState(step=zeros[0], params=params, opt_state=opt_state, bad_steps=zeros[1])


@dataclasses.dataclass(frozen=True)
class FrozenModels:
    """Models the loss reads but does not train: {name: graphdef} (static) and {name: params} (arrays),
    plus views: {name: (graphdef, key)}, models made of the trained model's fixed parameters under
    `key` (a LoRA run's reference: the backbone without adapters, read from the base weights the step
    already holds, so no second copy)."""
    graphdefs: dict
    params: dict
    views: dict = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted({*self.graphdefs, *self.views}))

    def merge(self, params=None, fixed=None) -> dict:
        """{name: NNX module} rebuilt from `params` (default: the stored ones) and, for the views, from
        the trained model's fixed parameters; inside a jitted step pass the traced ones."""
        params = self.params if params is None else params
        out = {k: nnx.merge(self.graphdefs[k], jax.lax.stop_gradient(params[k])) for k in self.graphdefs}
        if self.views and fixed is None:
            raise ValueError(f"frozen views {sorted(self.views)} need the trained model's fixed parameters")
        for k, (graphdef, key) in self.views.items():
            out[k] = nnx.merge(graphdef, jax.lax.stop_gradient(fixed[key]))
        return out


NO_FROZEN = FrozenModels({}, {})


def freeze(models: dict, mesh, views: dict | None = None) -> FrozenModels:
    """Splits each module and places its parameters by `sharding.PARAM_RULES` (copies: the step never
    donates them, and the caller's arrays stay valid). views: {name: (graphdef, key)} as in
    FrozenModels."""
    graphdefs, params = {}, {}
    for name, module in models.items():
        graphdefs[name], p = nnx.split(module, nnx.Param)
        params[name] = shd.place(p, shd.param_shardings(p, mesh))
    return FrozenModels(graphdefs, params, dict(views or {}))


def _tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _split_micro(batch, accum: int):
    """[B, ...] -> [accum, B/accum, ...], micro-batch a taking rows a, a+accum, ...

    Interleaving keeps each device's rows on that device when the batch axis is sharded.
    """
    def one(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(one, batch)


def grads_and_metrics(loss_fn, graphdef, params, batch, rng, accum: int, frozen: dict | None = None,
                      fixed=None):
    """Gradient of loss_sum_total / count_total over `accum` micro-batches, and summed metrics.

    frozen: {name: NNX module} handed to the loss as it is (no gradient flows to it).
    fixed: the model's parameters outside `params` (a LoRA run's base weights): read, not differentiated.
    """
    frozen = {} if frozen is None else frozen
    fixed = () if fixed is None else (jax.lax.stop_gradient(fixed),)

    def micro(p, mb, key):
        model = nnx.merge(graphdef, p, *fixed)
        loss, metrics = loss_fn(model, mb, key, frozen)
        loss_sum, count = metrics["loss"]
        # d(loss_sum)/dp = count * d(loss)/dp; return the sum so micro-batches add up exactly.
        return loss_sum, metrics

    grad_fn = jax.grad(micro, has_aux=True)
    if accum == 1:
        grads, metrics = grad_fn(params, batch, rng)
    else:
        micro_batches = _split_micro(batch, accum)

        def body(carry, xs):
            g_acc, m_acc = carry
            mb, i = xs
            g, m = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

        g0 = jax.tree.map(jnp.zeros_like, params)
        _, m_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng)
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
        (grads, metrics), _ = jax.lax.scan(body, (g0, m0), (micro_batches, jnp.arange(accum)))
    count = jnp.maximum(metrics["loss"][1], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return grads, metrics


@dataclasses.dataclass(frozen=True)
class StepOptions:
    accum_steps: int = 1
    donate: bool = True


class TrainStep:
    """`step(state, batch, key) -> (state, metrics)`: the jitted step with the frozen models' parameters
    bound as arguments (`jitted(state, batch, key, frozen_params)` is the compiled function)."""

    def __init__(self, jitted, frozen: FrozenModels, batch_shardings=None, fixed=None):
        self.jitted, self.frozen, self.batch_shardings, self.fixed = jitted, frozen, batch_shardings, fixed

    def __call__(self, state, batch, key):
        # Several processes: each holds its share of the rows; assemble the global arrays first.
        batch = shd.global_batch(batch, self.batch_shardings) if self.batch_shardings is not None else batch
        return self.jitted(state, batch, key, self.frozen.params, self.fixed)

    def lower(self, state, batch, key):
        batch = shd.global_batch(batch, self.batch_shardings) if self.batch_shardings is not None else batch
        return self.jitted.lower(state, batch, key, self.frozen.params, self.fixed)

    def describe_compiled(self, state, batch, key) -> str:
        """Compiles the step for these arguments (the jitted call reuses the executable) and says what
        XLA reserves per device: arguments, outputs (less what donation aliases), temporaries."""
        mem = self.lower(state, batch, key).compile().memory_analysis()
        if mem is None:
            return "compiled train step (this backend gives no memory analysis)"
        mib = lambda name: getattr(mem, name, 0) / 2 ** 20
        return (f"compiled train step, per device: arguments {mib('argument_size_in_bytes'):,.1f} MiB, outputs "
                f"{mib('output_size_in_bytes') - mib('alias_size_in_bytes'):,.1f} MiB beyond the donated ones, "
                f"temporaries {mib('temp_size_in_bytes'):,.1f} MiB, code {mib('generated_code_size_in_bytes'):,.1f} MiB")


def make_train_step(graphdef, loss_fn, optimizer: optax.GradientTransformation, mesh, state: TrainState,
                    batch_example, options: StepOptions = StepOptions(), frozen: FrozenModels = NO_FROZEN,
                    fixed=None):
    """Builds `step(state, batch, key) -> (state, metrics)`, jitted with explicit shardings.

    The batch is split over the (data, fsdp) axes; the state keeps its current shardings and is
    donated; the frozen models' parameters (`freeze`) keep theirs and are not donated, and so do the
    model's fixed parameters (`fixed_params`: a LoRA run's base weights). A step whose
    loss or gradients are not finite leaves parameters and optimizer state unchanged, sets
    metrics["skipped"] and increments `state.bad_steps` (reset by the next good step).
    """
    leading = {x.shape[0] for x in jax.tree.leaves(batch_example)}
    if len(leading) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(leading)}")
    (batch_size,) = leading
    batch_size *= jax.process_count()  # the example is this process's share of the global batch
    shd.check_batch_divides(batch_size, mesh)
    if batch_size % options.accum_steps:
        raise ValueError(f"train.batch_size={batch_size} is not a multiple of "
                         f"train.accum_steps={options.accum_steps}")
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), batch_example)
    replicated = NamedSharding(mesh, P())
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen.params)
    fixed_sh = jax.tree.map(lambda x: x.sharding, fixed)

    def step(state: TrainState, batch, key, frozen_params, fixed):
        rng = jax.random.fold_in(key, state.step)
        grads, metrics = grads_and_metrics(loss_fn, graphdef, state.params, batch, rng, options.accum_steps,
                                           frozen.merge(frozen_params, fixed), fixed)
        ok = jnp.isfinite(metrics["loss"][0]) & _tree_all_finite(grads)
        # A bad step keeps the old state wholesale. A conditional, not a select between the updated and
        # the old state: a select needs the old optimizer moments after the new ones are written, so
        # XLA copied every moment of the donated state each step (a temporary twice the size of the
        # parameters); under `cond` the update runs in place and a bad step's gradients never reach it.
        def update(params, opt_state):
            updates, new_opt = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        new_params, new_opt = jax.lax.cond(ok, update, lambda params, opt_state: (params, opt_state),
                                           state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt,
                               bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
        metrics = dict(metrics)
        metrics["skipped"] = (1.0 - ok.astype(jnp.float32), jnp.float32(1.0))
        # The run of consecutive bad steps lives in the (checkpointed) state, so it survives a resume.
        metrics["bad_run"] = (new_state.bad_steps.astype(jnp.float32), jnp.float32(1.0))
        metrics["grad_norm"] = (jnp.where(ok, optax.tree.norm(grads), 0.0), ok.astype(jnp.float32))
        return new_state, metrics

    jitted = xla.jit(step, in_shardings=(state_sh, batch_sh, replicated, frozen_sh, fixed_sh),
                     out_shardings=(state_sh, replicated),
                     donate_argnames=("state",) if options.donate else ())
    return TrainStep(jitted, frozen, batch_sh, fixed)


def metric_means(metrics) -> dict[str, float]:
    """Host-side means of (sum, count) metrics; call only on log steps (it waits for the device)."""
    fetched = jax.device_get(metrics)
    return {k: float(s) / max(float(c), 1e-12) for k, (s, c) in fetched.items()}
