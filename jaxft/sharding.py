"""Device meshes and the one table from logical axis names to mesh axes.

Every parameter carries logical axis names (`axes` metadata, e.g. ("mlp", "embed")); activations are
pinned with the same names through `jaxft.models.layers.constrain`. `DEFAULT_RULES` maps them onto
the mesh axes `data`, `fsdp`, `context` and `tensor`:

- data:    batch split, params replicated
- fsdp:    batch split, params split along `embed` (ZeRO-3 style: gathered per layer as needed)
- context: sequence split (context parallelism for long sequences: each device holds T / context
           tokens of every activation; attention gathers the keys and values, see
           jaxft.models.context_parallel); params split along `embed` as with fsdp, since the
           devices of a context group hold the same rows and would otherwise each keep a full copy
- tensor:  heads / mlp / vocab split (Megatron style)
- expert:  mixture-of-experts weights split along their `expert` dimension (expert parallelism); the
           batch is split over it too, so outside the experts it is one more data-parallel axis

A dimension that a mesh axis does not divide stays replicated along that axis, so tiny test models
and odd head counts still run on any mesh.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.models import context_parallel  # noqa: F401  (registers attention over a split sequence)
from jaxft.models import layers

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")  # context next to tensor: both talk every layer

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
    (layers.Axis.BATCH, ("data", "fsdp", "expert")),
    (layers.Axis.SEQ, "context"),
    (layers.Axis.VOCAB, "tensor"),
    (layers.Axis.EMBED, ("fsdp", "context")),
    (layers.Axis.HEADS, "tensor"),
    (layers.Axis.KV_HEADS, "tensor"),
    (layers.Axis.MLP, "tensor"),
    (layers.Axis.EXPERT, "expert"),
    (layers.Axis.LAYERS, None),
    (layers.Axis.NORM, None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh; one entry may be -1 to take the devices left over.

    >>> make_mesh({"fsdp": -1, "tensor": 2})  # on 8 devices: data=1, fsdp=4, context=1, tensor=2
    >>> make_mesh({"context": 4, "fsdp": 2})  # sequences split 4 ways, rows 2 ways

    A sequence of sizes is in MESH_AXES order; 3 entries are the older (data, fsdp, tensor) form.
    """
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh.shape: unknown axis name(s) {sorted(unknown)}; axes are {MESH_AXES}")
        sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) == 3:  # (data, fsdp, tensor), from before the expert and context axes
            sizes[2:2] = [1, 1]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh.shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        # Keep the mesh axes that exist, are unused by an earlier dim, and divide this one.
        kept = []
        for axis in mesh_axes:
            size = mesh.shape.get(axis, 1)
            if size > 1 and axis not in used and dim % (size * math.prod(mesh.shape[a] for a in kept)) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Inside this block, models pin activations to the mesh by their logical axis names."""
    with layers.logical_sharding(lambda axes, shape: named_sharding(axes, shape, mesh, rules)):
        yield


def describe(mesh: Mesh) -> str:
    return " × ".join(f"{name}={size}" for name, size in mesh.shape.items())


# --- training state and batches ------------------------------------------------------------------
def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Batch arrays of any rank ([batch], [batch, seq], ...): rows split over the data-parallel axes
    (data and fsdp), every other dimension whole."""
    batch_axes = dict(rules)[layers.Axis.BATCH]
    return NamedSharding(mesh, PartitionSpec(batch_axes))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    axes = dict(rules)[layers.Axis.BATCH]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Fails before compiling when the batch cannot be split evenly, with the numbers."""
    dp = data_parallel_size(mesh, rules)
    if global_batch % grad_accum:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by train.grad_accum={grad_accum}")
    micro = global_batch // grad_accum
    if micro % dp:
        raise ValueError(f"micro-batch of {micro} sequences (train.batch_size={global_batch} / grad_accum="
                         f"{grad_accum}) is not divisible by the data-parallel size {dp} ({describe(mesh)})")
    if global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes")
    if mesh.shape.get("context", 1) > 1:
        # Each process feeds whole rows (global_batch); the devices of one context group share their
        # rows, so they must all be fed by the same process.
        grid = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices), mesh.axis_names.index("context"), -1)
        if (grid != grid[..., :1]).any():
            raise ValueError(f"the context axis ({describe(mesh)}) spans processes; put it within a host "
                             f"(each host feeds whole sequences)")


def param_shardings(axes: Mapping[str, tuple], shapes: Mapping[str, tuple], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
    return {path: named_sharding(axes[path], shapes[path], mesh, rules) for path in shapes}


def state_shardings(state, optimizer, axes: Mapping[str, tuple], mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Shardings for a jaxft.step.TrainState: params by their axes, optimizer moments like their
    params (optax.tree_map_params finds them; a factored moment, e.g. Adafactor's row and column
    statistics, like its param without the factored-out dimension), everything else replicated."""
    import optax

    shape = lambda tree: {path: tuple(x.shape) for path, x in tree.items()}  # noqa: E731
    params = param_shardings(axes, shape(state.params), mesh, rules)
    frozen = param_shardings(axes, shape(state.frozen), mesh, rules)

    def like_param(moment, param_sharding: NamedSharding, param) -> NamedSharding:
        moment_shape, param_shape = tuple(moment.shape), tuple(param.shape)
        if moment_shape == param_shape:
            return param_sharding
        if moment_shape[1:] == param_shape[1:] and len(param_shape) > 1:  # rows of a stacked param (frozen layers)
            return param_sharding
        spec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
        for dropped in range(len(param_shape)):
            if moment_shape == param_shape[:dropped] + param_shape[dropped + 1:]:
                return NamedSharding(mesh, PartitionSpec(*spec[:dropped], *spec[dropped + 1:]))
        return replicated(mesh)  # a placeholder of another shape (e.g. the [1] of an unused factor)

    opt = optax.tree_map_params(optimizer, like_param, state.opt_state, params, state.params,
                                transform_non_params=lambda _: replicated(mesh),
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    return state.replace(step=replicated(mesh), params=params, frozen=frozen, opt_state=opt, rng=replicated(mesh))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over the mesh (each host feeds only its shard)."""
    sharding = batch_sharding(mesh, rules)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in local_batch.items()}
