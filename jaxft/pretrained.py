"""`from_pretrained` and `save_pretrained`: HF folders in, HF folders out.

Loading never materializes a random model: the model is built abstractly (`nnx.eval_shape`), the
checkpoint is checked against the family's key table from headers alone, and then each parameter
is created directly with its target sharding by `jax.make_array_from_callback`, whose callback
reads from disk only the slice that each device holds. Host memory therefore peaks near one
parameter's shard, not the model, and on a multi-host mesh each host reads only its own shards.
On the CPU backend, where device memory is host memory, each parameter (all its layers) is read
straight into an aligned buffer that becomes the jax array without a copy.
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
from jaxft.models import classification, registry
from jaxft.models.keys import KeyRule, check_checkpoint, group_by_key

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
                    allow_pickle: bool = False, labels=None, pad_token_id: int | None = None,
                    seed: int = 0, quantize: str | None = None, skip=()) -> nnx.Module:
    """Loads an HF causal LM or sequence classifier (local folder or hub id) as a jaxft model.

    dtype: parameter dtype; compute_dtype: activation dtype (defaults to dtype). With a mesh, each
    parameter is placed by its logical axes and `rules`; without one, on the first device.
    labels (names, or a count) make a sequence classifier: the checkpoint's head if it has one, a
    new head (drawn from `seed`) on a causal LM otherwise; a checkpoint whose config.json names a
    *ForSequenceClassification architecture loads as one anyway. pad_token_id overrides config.json's
    (a classifier pools the last non-pad token). See jaxft.models.classification.
    quantize ("int8" | "nf4", QLoRA): the decoder layers' Linear weights are stored quantized
    (jaxft.peft.quant), each layer quantized as it is read: the device never holds the dense stack,
    only the quantized model plus one layer of one weight (and its float32 quantization temporaries).
    skip: param paths that are checked against the checkpoint but not read: their values stay
    jax.ShapeDtypeStructs, for a caller that has them already (a full fine-tuning checkpoint
    restores them: jaxft.run.restore), so that they are never held twice.

        model = jaxft.from_pretrained("meta-llama/Llama-3.2-1B", dtype="bfloat16")
        logits = model(input_ids, attention_mask=mask)  # [B, T, V]
    """
    source = hf.resolve(path_or_id, revision)
    hf_config, family, config = read_model_config(source.path)
    where = os.path.join(source.path, "config.json")
    head = classification.head_options(hf_config, labels, pad_token_id, where)
    param_dtype = _dtype(dtype)
    abstract = nnx.eval_shape(lambda: _build(family, config, head, param_dtype, compute_dtype, seed))
    graphdef, params = flat_params(abstract)
    rules_table = family.convert.key_table(config, list(params))
    # The checkpoint is checked against the dense model; the model built is the quantized one.
    final_graphdef, final_params, quantized = graphdef, params, {}
    if quantize not in (None, "none"):
        from jaxft.peft import quant

        abstract = nnx.eval_shape(lambda: quant.quantize_model(
            _build(family, config, head, param_dtype, compute_dtype, seed), quantize))
        final_graphdef, final_params = flat_params(abstract)
        quantized = quant.quantized_parts_of(list(params), list(final_params))

    def place(variable: nnx.Variable):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        return sharding.named_sharding(variable.axes, variable.shape, mesh, rules)

    with hf.Checkpoint(source.path, allow_pickle=allow_pickle) as checkpoint:
        if hasattr(family.convert, "checkpoint_view"):  # a family whose checkpoints have layouts of their own (MoE)
            checkpoint = family.convert.checkpoint_view(config, checkpoint)
        fresh, ignored = [], list(family.convert.ignored_keys(config))
        if head is not None:
            fresh, more_ignored = classification.head_rules(checkpoint.shapes)
            rules_table, ignored = [r for r in rules_table if r.param not in fresh], ignored + more_ignored
        check_checkpoint(rules_table, {p: v.shape for p, v in params.items()}, config.num_hidden_layers,
                         checkpoint.shapes, checkpoint.files, ignored)
        skip = set(skip)
        if skip & set(quantized):
            raise ValueError(f"cannot skip quantized params ({sorted(skip & set(quantized))[:3]}): they are built from "
                             "the checkpoint as they are read")
        loaded = {rule.param: _load_param(checkpoint, rule, params[rule.param], place(params[rule.param]),
                                          config.num_hidden_layers)
                  for rule in rules_table if rule.param not in quantized and rule.param not in skip}
        loaded.update({p: jax.ShapeDtypeStruct(tuple(params[p].shape), params[p].dtype, sharding=place(params[p]))
                       for p in skip if p in params})
        for rule in (r for r in rules_table if r.param in quantized):
            loaded.update(_load_quantized(checkpoint, rule, params[rule.param],
                                          {p: final_params[p] for p in quantized[rule.param]}, place,
                                          config.num_hidden_layers, quantize))
        for i, path in enumerate(fresh):
            if path in skip:
                continue
            loaded[path] = _normal_init(jax.random.fold_in(jax.random.key(seed), i), tuple(params[path].shape),
                                        np.dtype(params[path].dtype), place(params[path]))
        jax.block_until_ready([v for v in loaded.values() if isinstance(v, jax.Array)])  # host buffers must outlive their transfers
    state = nnx.from_flat_state([(tuple(p.split(".")), final_params[p].replace(value=loaded[p])) for p in final_params])
    model = nnx.merge(final_graphdef, state)
    model.source = source
    return model


def _build(family: registry.Family, config, head: dict | None, param_dtype, compute_dtype, seed: int) -> nnx.Module:
    kw = dict(param_dtype=param_dtype, dtype=_dtype(compute_dtype or param_dtype), rngs=nnx.Rngs(seed))
    if head is None:
        return family.model_cls(config, **kw)
    return classification.SequenceClassifier(config, **head, **kw)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_init(key, shape, dtype, target):
    # The init of layers.Linear (and of transformers' heads): N(0, 0.02²).
    return jax.lax.with_sharding_constraint((0.02 * jax.random.normal(key, shape)).astype(dtype), target)


def _load_param(checkpoint: hf.Checkpoint, rule: KeyRule, variable: nnx.Variable, target: NamedSharding | SingleDeviceSharding,
                num_layers: int) -> jax.Array:
    """One parameter, built shard by shard from the checkpoint slices each device holds.

    A param stacked over layers is assembled on the device one layer at a time, so the host holds
    at most one layer's shard at once, never the whole stack.
    """
    dtype = np.dtype(variable.dtype)
    first_row = rule.rows[0] if rule.rows else 0  # a block of a fused tensor starts there
    if _aliases_host_memory(target):
        return _read_into_host_array(checkpoint, rule, tuple(variable.shape), dtype, target, num_layers, first_row)
    if not rule.stacked:
        return _array_from_tensor(checkpoint, rule.hf, tuple(variable.shape), dtype, target, first_row)
    layer_target = _drop_leading_axis(target)
    stacked = _zeros(tuple(variable.shape), dtype, target)
    for layer, key in enumerate(rule.hf_keys(num_layers)):
        one_layer = _array_from_tensor(checkpoint, key, tuple(variable.shape[1:]), dtype, layer_target, first_row)
        stacked = _set_layer(stacked, one_layer, layer)
    return stacked


def _aliases_host_memory(target) -> bool:
    """True for the CPU backend, where PJRT adopts a 64-byte-aligned numpy buffer as the device
    buffer without copying it."""
    return isinstance(target, SingleDeviceSharding) and next(iter(target.device_set)).platform == "cpu"


def _read_into_host_array(checkpoint: hf.Checkpoint, rule: KeyRule, shape: tuple[int, ...], dtype: np.dtype,
                          target: SingleDeviceSharding, num_layers: int, first_row: int) -> jax.Array:
    """CPU: every layer is read with pread straight into its slice of one aligned buffer, which
    becomes the jax array as is: one pass over the bytes, as a plain file read, and no second copy."""
    out = hf.host_buffer(shape, dtype)
    rows = shape[1] if rule.stacked else shape[0]
    index = (slice(first_row, first_row + rows),) if rule.rows else ()  # a block of a fused tensor
    if rule.stacked:
        for layer, key in enumerate(rule.hf_keys(num_layers)):
            checkpoint.read(key, index, out=out[layer])
    else:
        checkpoint.read(rule.hf, index, out=out)
    return jax.device_put(out, target)


def _load_quantized(checkpoint: hf.Checkpoint, rule: KeyRule, variable: nnx.Variable, parts: dict[str, nnx.Variable],
                    place: Callable, num_layers: int, mode: str) -> dict[str, jax.Array]:
    """A quantized Linear weight (QLoRA): each layer is read densely and quantized before the next
    one is read, into stacked codes and scales placed by their own logical axes."""
    from jaxft.peft import quant

    dtype = np.dtype(variable.dtype)
    first_row = rule.rows[0] if rule.rows else 0
    names = {path: path[len(rule.param) + 1:] for path in parts}  # "...q_proj.weight.codes" → "codes"
    # double_quant=True as quant.quantize_model's default: the structure built must match.
    if not rule.stacked:
        dense = _array_from_tensor(checkpoint, rule.hf, tuple(variable.shape), dtype, place(variable), first_row)
        out = quant.quantize_layer(dense, mode, True, tuple((n, place(parts[p])) for p, n in names.items()))
        return {p: out[n] for p, n in names.items()}
    stacked = {p: _zeros(tuple(v.shape), np.dtype(v.dtype), place(v)) for p, v in parts.items()}
    targets = tuple((n, _drop_leading_axis(place(parts[p]))) for p, n in names.items())
    layer_target = _drop_leading_axis(place(variable))
    for layer, key in enumerate(rule.hf_keys(num_layers)):
        dense = _array_from_tensor(checkpoint, key, tuple(variable.shape[1:]), dtype, layer_target, first_row)
        one = quant.quantize_layer(dense, mode, True, targets)
        stacked = {p: _set_layer(stacked[p], one[n], layer) for p, n in names.items()}
    return stacked


def _array_from_tensor(checkpoint: hf.Checkpoint, key: str, shape: tuple[int, ...], dtype: np.dtype,
                       target: jax.sharding.Sharding, first_row: int = 0) -> jax.Array:
    cache: dict[Any, np.ndarray] = {}  # replicated shards ask for the same slice on every device

    def read(index: tuple[slice, ...]) -> np.ndarray:
        cache_key = tuple((s.start, s.stop, s.step) for s in index)
        if cache_key not in cache:
            out = np.empty(tuple(len(range(n)[i]) for n, i in zip(shape, index)), dtype)
            if first_row:  # rows of this param within the fused checkpoint tensor
                rows = range(shape[0])[index[0]]
                index = (slice(rows.start + first_row, rows.stop + first_row, rows.step), *index[1:])
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


def read_model_config(folder: str):
    """(config.json as read, the family, the family's checked config) of a local HF folder: every
    field checked, and a bad one named by file and key (before transformers reads it in its own terms)."""
    hf_config = hf.read_config(folder)
    where = os.path.join(folder, "config.json")
    family = registry.family_for(hf_config, where)
    return hf_config, family, family.config_cls.from_hf(hf_config, where)


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *, dtype=None, max_shard_size: int = 2 * 2**30,
                    copy_tokenizer: bool = True) -> list[str]:
    """Writes an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads as is.

    Tensors are gathered and written one at a time (files of at most `max_shard_size` bytes, with an
    index when there are several), so host memory peaks near the largest tensor. In multi-host runs every process must call
    this (the gather is collective); process 0 writes. Returns the weight files written.
    """
    out_dir = os.fspath(out_dir)
    config = model.config
    family = registry.family_for({"model_type": config.model_type})
    _, params = flat_params(model)
    adapters = sorted(p for p in params if ".adapter." in p)
    if adapters:
        raise ValueError(f"the model has adapters attached ({adapters[0]}, ...): merge them first with "
                         "jaxft.peft.lora.merge_lora(model), or export them with `jaxft export --format peft`")
    quantized = sorted(p for p in params if p.endswith(".weight.codes"))
    if quantized:
        raise ValueError(f"the model has quantized base weights ({quantized[0]}, ...): dequantize them first with "
                         "jaxft.peft.quant.dequantize_model(model), after merge_lora")
    rules_table = family.convert.key_table(config, list(params))
    save_dtype = np.dtype(_dtype(dtype)) if dtype is not None else np.dtype(params[rules_table[0].param].dtype)
    layers = config.num_hidden_layers

    # Each HF key with a function that fetches its tensor to the host when its file is written; a
    # fused key (Phi-3's qkv_proj) concatenates its params' blocks in row order.
    fetchers: dict[str, Callable[[], np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    sizes: list[tuple[str, int]] = []
    for group in group_by_key(rules_table).values():
        arrays = [params[rule.param].get_value() for rule in group]
        stacked = group[0].stacked
        block_shapes = [a.shape[1:] if stacked else a.shape for a in arrays]
        per_key_shape = (sum(b[0] for b in block_shapes), *block_shapes[0][1:]) if len(arrays) > 1 else block_shapes[0]
        for i, key in enumerate(group[0].hf_keys(layers)):
            parts = [(lambda a=a, i=i: _to_host(a[i])) if stacked else (lambda a=a: _to_host(a)) for a in arrays]
            fetchers[key] = parts[0] if len(parts) == 1 else (lambda parts=parts: np.concatenate([f() for f in parts]))
            shapes[key] = tuple(per_key_shape)
            sizes.append((key, int(np.prod(per_key_shape)) * save_dtype.itemsize))

    if hasattr(family.convert, "export_tensors"):  # keys written as other tensors (MoE: one per expert)
        expanded = [t for key, _ in sizes for t in family.convert.export_tensors(config, key, shapes[key], fetchers[key])]
        fetchers, shapes = {k: f for k, _, f in expanded}, {k: s for k, s, _ in expanded}
        sizes = [(k, int(np.prod(s)) * save_dtype.itemsize) for k, s, _ in expanded]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    shards = hf.plan_shards(sizes, max_shard_size)
    names = hf.shard_file_names(len(shards))
    weight_map = {}
    for name, keys in zip(names, shards):
        entries = [(key, shapes[key], save_dtype, lambda key=key: fetchers[key]().astype(save_dtype, copy=False))
                   for key in keys]
        if writer:
            hf.write_safetensors(os.path.join(out_dir, name), entries)
        else:  # the gathers are collective: every process takes part
            for *_, fetch in entries:
                fetch()
        weight_map.update({key: name for key in keys})
    if not writer:
        return names
    if len(names) > 1:
        hf.write_index(out_dir, weight_map, sum(size for _, size in sizes))
    hf_config = model.to_hf_config() if hasattr(model, "to_hf_config") else config.to_hf()
    hf_config["torch_dtype"] = {np.dtype(jnp.bfloat16): "bfloat16"}.get(save_dtype, save_dtype.name)
    hf.write_json(out_dir, "config.json", hf_config)
    source = getattr(model, "source", None)
    copied = []
    if copy_tokenizer and source is not None and os.path.abspath(source.path) != os.path.abspath(out_dir):
        copied = hf.copy_tokenizer_files(source.path, out_dir)  # generation_config.json among them, if any
    same_folder = source is not None and os.path.abspath(source.path) == os.path.abspath(out_dir)
    if "generation_config.json" not in copied and not same_folder and _generates(hf_config):
        hf.write_json(out_dir, "generation_config.json", generation_config(hf_config))
    return names


def _generates(hf_config: dict[str, Any]) -> bool:
    """A causal LM (what transformers' save_pretrained writes a generation_config.json for)."""
    return any(str(a).endswith("ForCausalLM") for a in hf_config.get("architectures") or [])


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json for a model whose base has none, as transformers'
    GenerationConfig.from_model_config builds it: the config's special token ids that are set."""
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    return {"_from_model_config": True, **ids}


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def init_random(hf_config: dict[str, Any], dtype="float32", *, compute_dtype=None, seed: int = 0, labels=None,
                pad_token_id: int | None = None) -> nnx.Module:
    """A randomly initialized model for an HF config (from-scratch runs, benchmarks, tests);
    `labels` make it a sequence classifier, as in `from_pretrained`."""
    family = registry.family_for(hf_config)
    config = family.config_cls.from_hf(hf_config)
    head = classification.head_options(hf_config, labels, pad_token_id)
    return _build(family, config, head, _dtype(dtype), compute_dtype, seed)


__all__ = ["from_pretrained", "save_pretrained", "init_random", "flat_params", "DTYPES"]
