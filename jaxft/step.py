"""The jitted train step around an objective's loss.

    model_def, params, frozen = split_model(model, trainable=is_lora_param)   # or all params
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes)
    state = init_state(params, frozen, optimizer, seed=0)
    objective = jaxft.tasks.causal_lm.NextTokenLoss()                          # or any Objective
    train_step = make_train_step(model_def, optimizer, objective, StepConfig(grad_accum=4))
    state, metrics = train_step(state, batch)       # jit it with compile_train_step(...) for meshes

Params live in flat {path: array} dicts (paths as in jaxft.pretrained.flat_params): simple to
mask, shard, checkpoint and read. Only the trainable dict reaches the optimizer, so frozen params
carry no optimizer state. The step knows nothing of any objective's loss: it asks the Objective
for the batch's normalizer and each micro-batch's share of the loss (see Objective), so that k
micro-batches of b rows equal one batch of k·b for every objective alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxft.models import layers

REMAT_POLICIES = layers.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    remat: str = "none"  # none | full | dots | dots_no_batch: what the backward pass recomputes
    skip_nonfinite: bool = False  # a step with a non-finite loss or gradient leaves params and optimizer as they were
    # train.freeze_first_layers: those layers run outside autodiff (no weight gradients); pair with
    # optim.make_optimizer(..., frozen_layers=) so that they keep no optimizer state either
    freeze_first_layers: int = 0

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.freeze_first_layers < 0:
            raise ValueError(f"freeze_first_layers must be >= 0, got {self.freeze_first_layers}")


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a model: its graph and each param's Variable (type and `axes`)."""

    graphdef: Any
    templates: dict[str, nnx.Variable]

    @property
    def axes(self) -> dict[str, tuple]:
        return {path: tuple(getattr(v, "axes", ()) or ()) for path, v in self.templates.items()}

    def merge(self, *param_dicts: dict[str, jax.Array]) -> nnx.Module:
        values = {path: value for d in param_dicts for path, value in d.items()}
        missing = set(self.templates) - set(values)
        if missing:
            raise ValueError(f"no value for params {sorted(missing)[:5]}")
        state = nnx.from_flat_state([(tuple(path.split(".")), self.templates[path].replace(value=values[path]))
                                     for path in self.templates])
        return nnx.merge(self.graphdef, state)

    def __hash__(self):  # identity: one ModelDef per compiled step
        return id(self)


def split_model(model: nnx.Module, trainable: Callable[[str, nnx.Variable], bool] = lambda path, v: True,
                remat: str = "none"):
    """(ModelDef, trainable params, frozen params): flat {path: array} dicts."""
    if hasattr(model, "remat"):
        model.remat = remat
    graphdef, state = nnx.split(model)
    templates, train, frozen = {}, {}, {}
    for path, variable in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        templates[name] = variable
        (train if trainable(name, variable) else frozen)[name] = variable.get_value()
    if not train:
        raise ValueError("no trainable parameters: every parameter is frozen")
    return ModelDef(graphdef, templates), train, frozen


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array


def init_state(params, frozen, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(seed)))


class Objective(Protocol):
    """What the step needs of an objective (each jaxft.tasks Task builds one).

    normalizer(batch): the count the loss is averaged over, for the WHOLE batch (tokens with a
    target, rows, pairs, ...), computed before the batch is split into micro-batches; a dict of
    counts when terms average over different things (ORPO: pairs, and chosen tokens).
    loss(model, micro_batch, normalizer) -> (loss, metrics): the loss summed over this micro-batch
    and divided by that whole-batch count; metrics likewise (sums / normalizer), so that summing
    over micro-batches gives the batch's values and k micro-batches of b rows equal one batch of k·b.
    `metrics["loss"]`, when given, is what is logged as the loss (e.g. without a regularizer).
    """

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array: ...

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], normalizer: jax.Array) -> tuple[jax.Array, dict]: ...


def make_loss_fn(model_def: ModelDef, objective: Objective, freeze_first_layers: int = 0):
    def loss_fn(params, frozen, batch, normalizer, rng):
        """(loss, metrics) of one micro-batch, as the objective computes them; dropout keyed by rng."""
        model = model_def.merge(params, frozen)
        with layers.dropout_rng(rng), layers.frozen_prefix(freeze_first_layers):
            return objective.loss(model, batch, normalizer)

    return loss_fn


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation, objective: Objective,
                    cfg: StepConfig = StepConfig(), schedule: optax.Schedule | None = None):
    """train_step(state, batch) -> (state, metrics): the objective's loss, its gradient accumulated
    over cfg.grad_accum micro-batches, one optimizer update. metrics: the objective's, plus
    grad_norm, finite and (with a schedule) learning_rate."""
    grad_fn = jax.value_and_grad(make_loss_fn(model_def, objective, cfg.freeze_first_layers), has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        normalizer = jax.tree.map(lambda n: jnp.maximum(jnp.asarray(n, jnp.float32), 1.0), objective.normalizer(batch))
        key = jax.random.wrap_key_data(state.rng)
        step_key, next_key = jax.random.split(jax.random.fold_in(key, state.step))
        if cfg.grad_accum == 1:
            (loss, metrics), grads = grad_fn(state.params, state.frozen, batch, normalizer, step_key)
        else:
            k = cfg.grad_accum
            # Row j of micro-batch i is row j*k + i: every micro-batch spans all data-parallel devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(totals, xs):
                micro_batch, index = xs
                out = grad_fn(state.params, state.frozen, micro_batch, normalizer, jax.random.fold_in(step_key, index))
                return jax.tree.map(jnp.add, totals, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, state.frozen, first, normalizer,
                                                                 step_key))
            ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(k)))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if cfg.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "finite": finite}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(next_key))
        return new_state, metrics

    return train_step


def compile_train_step(train_step, state: TrainState, optimizer, model_def: ModelDef, mesh, rules=None):
    """jax.jit with explicit shardings for state and batch, and the state donated."""
    from jaxft import sharding

    rules = rules or sharding.DEFAULT_RULES
    state_sh = sharding.state_shardings(state, optimizer, model_def.axes, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=0), state_sh
