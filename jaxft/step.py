"""The loss and the jitted train step.

    model_def, params, frozen = split_model(model, trainable=is_lora_param)   # or all params
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes)
    state = init_state(params, frozen, optimizer, seed=0)
    train_step = make_train_step(model_def, optimizer, StepConfig(grad_accum=4))
    state, metrics = train_step(state, batch)       # jit it with compile_train_step(...) for meshes

Params live in flat {path: array} dicts (paths as in jaxft.pretrained.flat_params): simple to
mask, shard, checkpoint and read. Only the trainable dict reaches the optimizer, so frozen params
carry no optimizer state. The loss is the mean token cross-entropy over every target token of the
whole global batch, micro-batches included, so k micro-batches of b equal one batch of k·b.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxft.models import layers

REMAT_POLICIES = layers.REMAT_POLICIES
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    z_loss: float = 0.0  # weight of mean(logsumexp²): keeps logits from drifting (PaLM)
    remat: str = "none"  # none | full | dots | dots_no_batch: what the backward pass recomputes
    skip_nonfinite: bool = False  # a step with a non-finite loss or gradient leaves params and optimizer as they were
    loss_chunk: int = 0  # > 0: the loss runs over sequence chunks of this many tokens, never holding [B, T, V] logits

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"train.remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")


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


def cross_entropy_sums(logits, targets, loss_mask, z_loss: float = 0.0):
    """Sums over masked tokens of -log p(target) and of logsumexp² (float32 whatever the logits)."""
    logits = logits.astype(jnp.float32)  # [B, T, V]
    logsumexp = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    nll = (logsumexp - target_logit) * mask
    z = jnp.square(logsumexp) * mask if z_loss else jnp.zeros_like(nll)
    return nll.sum(), z.sum()


def _forward(model, batch):
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))


def chunked_cross_entropy_sums(model, hidden, targets, loss_mask, z_loss: float, chunk: int):
    """cross_entropy_sums over sequence chunks: each chunk's [B, chunk, V] logits are made, reduced
    and (under remat) recomputed in the backward pass, so full-vocab fp32 logits never coexist."""
    batch, length, _ = hidden.shape
    if length % chunk:
        raise ValueError(f"train.loss_chunk={chunk} does not divide data.seq_len={length}")
    split = lambda x: x.reshape(batch, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def one_chunk(carry, xs):
        h, t, m = xs
        nll, z = cross_entropy_sums(model.logits(h), t, m, z_loss)
        return (carry[0] + nll, carry[1] + z), None

    (nll, z), _ = jax.lax.scan(one_chunk, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                               (split(hidden), split(targets), split(loss_mask)))
    return nll, z


def make_loss_fn(model_def: ModelDef, cfg: StepConfig):
    def loss_fn(params, frozen, batch, num_targets, rng):
        """Loss summed over this micro-batch, divided by the target count of the whole batch."""
        model = model_def.merge(params, frozen)
        with layers.dropout_rng(rng):
            if cfg.loss_chunk:
                hidden = model.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                             positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
                nll, z = chunked_cross_entropy_sums(model, hidden, batch["targets"], batch["loss_mask"], cfg.z_loss,
                                                    cfg.loss_chunk)
            else:
                nll, z = cross_entropy_sums(_forward(model, batch), batch["targets"], batch["loss_mask"], cfg.z_loss)
        return (nll + cfg.z_loss * z) / num_targets, (nll, z)

    return loss_fn


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation, cfg: StepConfig,
                    schedule: optax.Schedule | None = None):
    loss_fn = make_loss_fn(model_def, cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        num_targets = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        key = jax.random.wrap_key_data(state.rng)
        step_key, next_key = jax.random.split(jax.random.fold_in(key, state.step))
        if cfg.grad_accum == 1:
            (_, (nll, z)), grads = grad_fn(state.params, state.frozen, batch, num_targets, step_key)
        else:
            k = cfg.grad_accum
            # Row j of micro-batch i is row j*k + i: every micro-batch spans all data-parallel devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, xs):
                grads, nll, z = carry
                micro_batch, index = xs
                (_, (m_nll, m_z)), m_grads = grad_fn(state.params, state.frozen, micro_batch, num_targets,
                                                     jax.random.fold_in(step_key, index))
                return (jax.tree.map(jnp.add, grads, m_grads), nll + m_nll, z + m_z), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, nll, z), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, jnp.arange(k)))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(nll) & jnp.isfinite(grad_norm)
        if cfg.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": nll / num_targets, "z_loss": z / num_targets, "grad_norm": grad_norm,
                   "num_targets": num_targets, "finite": finite}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(next_key))
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef):
    def eval_step(params, frozen, batch):
        logits = _forward(model_def.merge(params, frozen), batch)
        nll, _ = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
        return {"nll_sum": nll, "num_targets": batch["loss_mask"].astype(jnp.float32).sum()}

    return eval_step


def compile_train_step(train_step, state: TrainState, optimizer, model_def: ModelDef, mesh, rules=None):
    """jax.jit with explicit shardings for state and batch, and the state donated."""
    from jaxft import sharding

    rules = rules or sharding.DEFAULT_RULES
    state_sh = sharding.state_shardings(state, optimizer, model_def.axes, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=0), state_sh
