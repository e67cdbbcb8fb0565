"""`from_pretrained` and `save_pretrained`: HF folders in, HF folders out.

Loading never materializes a random model: the model is built abstractly (`nnx.eval_shape`), the
checkpoint is checked against the family's key table from headers alone, and then each parameter
is created directly with its target sharding by `jax.make_array_from_callback`, whose callback
reads from disk only the slice that each device holds. Host memory therefore peaks near one
parameter's shard, not the model, and on a multi-host mesh each host reads only its own shards.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxft import hf, sharding
from jaxft.models import registry
from jaxft.models.keys import KeyRule, check_checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(value) -> jnp.dtype:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[value])
    return jnp.dtype(value)


def flat_params(model_or_state) -> tuple[nnx.GraphDef | None, dict[str, nnx.Variable]]:
    """'.'-joined param path → Variable, in a stable order."""
    graphdef, state = nnx.split(model_or_state) if isinstance(model_or_state, nnx.Module) else (None, model_or_state)
    return graphdef, {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def from_pretrained(path_or_id: str | os.PathLike, dtype="float32", *, compute_dtype=None, mesh: Mesh | None = None,
                    rules: sharding.Rules = sharding.DEFAULT_RULES, revision: str | None = None,
                    allow_pickle: bool = False) -> nnx.Module:
    """Loads an HF causal LM (local folder or hub id) as a jaxft model.

    dtype: parameter dtype; compute_dtype: activation dtype (defaults to dtype). With a mesh, each
    parameter is placed by its logical axes and `rules`; without one, on the first device.

        model = jaxft.from_pretrained("meta-llama/Llama-3.2-1B", dtype="bfloat16")
        logits = model(input_ids, attention_mask=mask)  # [B, T, V]
    """
    source = hf.resolve(path_or_id, revision)
    hf_config = hf.read_config(source.path)
    where = os.path.join(source.path, "config.json")
    family = registry.family_for(hf_config, where)
    config = family.config_cls.from_hf(hf_config, where)
    param_dtype = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: family.model_cls(
        config, param_dtype=param_dtype, dtype=_dtype(compute_dtype or param_dtype), rngs=nnx.Rngs(0)))
    graphdef, params = flat_params(abstract)
    rules_table = family.convert.key_table(config, list(params))

    def place(variable: nnx.Variable):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        return sharding.named_sharding(variable.axes, variable.shape, mesh, rules)

    with hf.Checkpoint(source.path, allow_pickle=allow_pickle) as checkpoint:
        check_checkpoint(rules_table, {p: v.shape for p, v in params.items()}, config.num_hidden_layers,
                         checkpoint.shapes, checkpoint.files, family.convert.ignored_keys(config))
        loaded = {rule.param: _load_param(checkpoint, rule, params[rule.param], place(params[rule.param]),
                                          config.num_hidden_layers) for rule in rules_table}
        jax.block_until_ready(list(loaded.values()))  # host buffers must outlive their transfers
    state = nnx.from_flat_state([(tuple(p.split(".")), params[p].replace(value=loaded[p])) for p in params])
    model = nnx.merge(graphdef, state)
    model.source = source
    return model


def _load_param(checkpoint: hf.Checkpoint, rule: KeyRule, variable: nnx.Variable, target: NamedSharding | SingleDeviceSharding,
                num_layers: int) -> jax.Array:
    """One parameter, built shard by shard from the checkpoint slices each device holds.

    A param stacked over layers is assembled on the device one layer at a time, so the host holds
    at most one layer's shard at once, never the whole stack.
    """
    dtype = np.dtype(variable.dtype)
    if not rule.stacked:
        return _array_from_tensor(checkpoint, rule.hf, tuple(variable.shape), dtype, target)
    layer_target = _drop_leading_axis(target)
    stacked = _zeros(tuple(variable.shape), dtype, target)
    for layer, key in enumerate(rule.hf_keys(num_layers)):
        one_layer = _array_from_tensor(checkpoint, key, tuple(variable.shape[1:]), dtype, layer_target)
        stacked = _set_layer(stacked, one_layer, layer)
    return stacked


def _array_from_tensor(checkpoint: hf.Checkpoint, key: str, shape: tuple[int, ...], dtype: np.dtype,
                       target: jax.sharding.Sharding) -> jax.Array:
    cache: dict[Any, np.ndarray] = {}  # replicated shards ask for the same slice on every device

    def read(index: tuple[slice, ...]) -> np.ndarray:
        cache_key = tuple((s.start, s.stop, s.step) for s in index)
        if cache_key not in cache:
            out = np.empty(tuple(len(range(n)[i]) for n, i in zip(shape, index)), dtype)
            cache[cache_key] = checkpoint.read(key, index, out=out)
        return cache[cache_key]

    return jax.make_array_from_callback(shape, target, read)


def _drop_leading_axis(target):
    if isinstance(target, NamedSharding):
        if target.spec and target.spec[0] is not None:
            raise ValueError(f"the layer axis cannot be sharded (spec {target.spec}); map 'layers' to None in the rules")
        return NamedSharding(target.mesh, PartitionSpec(*target.spec[1:]))
    return target


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, target):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), target)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index) -> jax.Array:
    # Donated, so the stack is updated in place rather than copied once per layer.
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, axis=0)


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *, dtype=None, max_shard_size: int = 2 * 2**30,
                    copy_tokenizer: bool = True) -> list[str]:
    """Writes an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads as is.

    Tensors are written file by file (at most `max_shard_size` bytes each, with an index when there
    are several), so host memory peaks near one file. In multi-host runs every process must call
    this (the gather is collective); process 0 writes. Returns the weight files written.
    """
    out_dir = os.fspath(out_dir)
    config = model.config
    family = registry.family_for({"model_type": config.model_type})
    _, params = flat_params(model)
    rules_table = family.convert.key_table(config, list(params))
    save_dtype = np.dtype(_dtype(dtype)) if dtype is not None else np.dtype(params[rules_table[0].param].dtype)
    layers = config.num_hidden_layers

    # Each HF key with a function that fetches its tensor to the host when its file is written.
    fetchers: dict[str, Callable[[], np.ndarray]] = {}
    sizes: list[tuple[str, int]] = []
    for rule in rules_table:
        array = params[rule.param].get_value()
        per_key_shape = array.shape[1:] if rule.stacked else array.shape
        for i, key in enumerate(rule.hf_keys(layers)):
            fetchers[key] = (lambda a=array, i=i: _to_host(a[i])) if rule.stacked else (lambda a=array: _to_host(a))
            sizes.append((key, int(np.prod(per_key_shape)) * save_dtype.itemsize))

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    shards = hf.plan_shards(sizes, max_shard_size)
    names = hf.shard_file_names(len(shards))
    weight_map = {}
    from safetensors.numpy import save_file

    for name, keys in zip(names, shards):
        tensors = {key: np.ascontiguousarray(fetchers[key]().astype(save_dtype, copy=False)) for key in keys}
        if writer:
            save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
        del tensors
    if not writer:
        return names
    if len(names) > 1:
        hf.write_index(out_dir, weight_map, sum(size for _, size in sizes))
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = {np.dtype(jnp.bfloat16): "bfloat16"}.get(save_dtype, save_dtype.name)
    hf.write_json(out_dir, "config.json", hf_config)
    source = getattr(model, "source", None)
    if copy_tokenizer and source is not None and os.path.abspath(source.path) != os.path.abspath(out_dir):
        hf.copy_tokenizer_files(source.path, out_dir)
    return names


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def init_random(hf_config: dict[str, Any], dtype="float32", *, compute_dtype=None, seed: int = 0) -> nnx.Module:
    """A randomly initialized model for an HF config (from-scratch runs, benchmarks, tests)."""
    family = registry.family_for(hf_config)
    config = family.config_cls.from_hf(hf_config)
    param_dtype = _dtype(dtype)
    return family.model_cls(config, param_dtype=param_dtype, dtype=_dtype(compute_dtype or param_dtype),
                            rngs=nnx.Rngs(seed))


__all__ = ["from_pretrained", "save_pretrained", "init_random", "flat_params", "DTYPES"]
