"""Will a run fit? Per-device memory of a training step from shapes alone, before anything is
downloaded, loaded or compiled; when it does not fit, the nearest settings that do.

    jaxft plan --config configs/llama3_8b_lora.py:h100 --device v5e --config.train.batch_size=1
    jaxft plan --config configs/demo.py --compile       # also compile the step: estimate vs XLA's count
    python -c "import jaxft.plan as p, jaxft.config as c; print(p.plan(c.load('configs/demo.py'), 'v5e').table())"

Counted per device (an array's bytes / the shards its NamedSharding gives it on the config's mesh):
  frozen base      params that do not train, in model.dtype; with model.quantize (QLoRA) the decoder's
                   Linear weights as jaxft.peft.quant stores them: int8 = 1 B/param + a float32 scale
                   per output row; nf4 = 0.5 B/param + a double-quantized absmax per block of 64
  trainable        params the optimizer updates (LoRA adapters, or everything)
  optimizer state  as optax builds it (AdamW: two moments per trainable param)
  gradients        one per trainable param; twice with grad_accum > 1 (the accumulator + a micro-batch's)
  activations      what the backward pass keeps under train.remat: the residuals of the loss's VJP, as
                   jax itself saves them, traced (make_jaxpr, no FLOPs) on one micro-batch's shapes;
                   with a `context` mesh axis, those along the sequence are split over it
  logits           the [B, T, V] float32 residual of the loss (one chunk's with train.loss_chunk)
  working set      the largest transient: one layer's backward (its forward intermediates, recomputed
                   under remat, their cotangents and, with FSDP, its gathered weights), the logits'
                   cotangent, or the optimizer's updates once the activations are freed
XLA's own scratch, fragmentation and the runtime's reserve are not counted, so a plan above 90% of the
device is reported as tight. How the estimate compares with XLA's compiled count: tests/test_plan.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import config as config_lib
from jaxft import sharding, step
from jaxft import run as run_lib
from jaxft.peft import methods as peft_methods

log = logging.getLogger("jaxft.plan")

GIB = 2**30
# HBM per chip/GPU in GiB (the runtime's `bytes_limit` wins when it reports one).
DEVICE_MEMORY_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
                     "t4": 15, "l4": 22, "a100-40gb": 40, "a100": 80, "h100": 80, "h200": 141}
_DEVICE_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"),
                 ("v5", "v5p"), ("v4", "v4"), ("v3", "v3"), ("v2", "v2"), ("h200", "h200"), ("h100", "h100"),
                 ("a100", "a100"), ("l4", "l4"), ("t4", "t4"))
TPUS = ("v2", "v3", "v4", "v5e", "v5p", "v6e")  # the rest of DEVICE_MEMORY_GIB are NVIDIA GPUs
TIGHT = 0.9  # above this share of the device, XLA's own buffers may tip it over
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # each keeps less for the backward pass than the last
QUANT_ORDER = ("none", "int8", "nf4")  # each stores the frozen base in fewer bytes than the last


class DoesNotFitError(RuntimeError):
    """The preflight found that the run needs more memory than the device has; the message is the plan."""


@dataclasses.dataclass
class Estimate:
    """Per-device bytes of one training setup, as table rows (what, bytes, detail)."""

    rows: list[tuple[str, int, str]]
    settings: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def get(self, what: str) -> int:
        return sum(b for name, b, _ in self.rows if name.startswith(what))


@dataclasses.dataclass
class Plan:
    estimate: Estimate
    memory: int | None  # bytes per device; None = unknown
    device: str
    header: str
    tried: list[tuple[dict, int]] = dataclasses.field(default_factory=list)  # (overrides, total bytes)
    advice: dict | None = None  # overrides that fit, when the config does not
    compiled: dict | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.estimate.total <= self.memory

    def table(self) -> str:
        unit, size = ("GiB", GIB) if self.estimate.total >= GIB else ("MiB", 2**20)  # the demo is ~50 MiB
        fmt = lambda b: f"{b / size:8.2f}"  # noqa: E731
        lines = [self.header, f"  {'per device':<44}{unit:>8}"]
        lines += [f"  {what:<44}{fmt(b)}  {detail}".rstrip() for what, b, detail in self.estimate.rows]
        total = self.estimate.total
        lines.append(f"  {'total':<44}{fmt(total)}" + self._verdict(total, unit, size))
        if self.compiled:
            c = self.compiled
            parts = " ".join(f"{sign} {what} {c[key] / size:.2f}" for sign, what, key in
                             (("=", "argument", "argument"), ("+", "output", "output"), ("-", "aliased", "alias"),
                              ("+", "temp", "temp")))
            here = "" if c["estimate"] == total else \
                f" (the estimate for {jax.default_backend()}: {fmt(c['estimate']).strip()})"
            lines.append(f"  {'compiled here (XLA memory_analysis)':<44}{fmt(c['peak'])}  {parts}; "
                         f"estimate/compiled = {c['estimate'] / c['peak']:.2f}{here}")
        if self.tried:
            lines.append("  settings tried (each on top of the last):")
            lines += [f"    {_flags(o):<80}{fmt(b)} {unit}" for o, b in self.tried]
        if self.advice is not None:
            lines.append("  nearest settings that fit: " + (_flags(self.advice) or "(as is)"))
        elif self.fits is False:
            lines.append("  nothing tried fits: use more devices (mesh.shape, e.g. {'fsdp': -1}) or a smaller model")
        return "\n".join(lines)

    def _verdict(self, total: int, unit: str, size: int) -> str:
        if self.memory is None:
            return f"  of ? ({self.device}: memory unknown; give --device v5e|h100|... to compare)"
        share = total / self.memory
        verdict = "does NOT fit" if share > 1 else "fits, tight" if share > TIGHT else "fits"
        unit, size = ("GiB", GIB) if self.memory >= GIB else (unit, size)
        return f"  of {self.memory / size:.2f} {unit} ({self.device}): {verdict} ({share:.0%})"


# ---- device memory --------------------------------------------------------------------------------
def device_memory(device: str | None = None, config=None) -> tuple[int | None, str]:
    """(bytes per device or None, its name): --device from the table, train.device_memory_gb, or what
    the runtime reports (TPU/GPU `bytes_limit`; CPU reports nothing: unknown)."""
    if device:
        key = device.lower()
        if key not in DEVICE_MEMORY_GIB:
            raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_MEMORY_GIB)}")
        return DEVICE_MEMORY_GIB[key] * GIB, key
    limit = float(config_lib.get(config, "train.device_memory_gb", 0.0) or 0.0) if config is not None else 0.0
    if limit > 0:
        return int(limit * GIB), f"train.device_memory_gb={limit:g}"
    local = jax.local_devices()[0]
    stats = local.memory_stats() if hasattr(local, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), local.device_kind
    kind = local.device_kind.lower()
    for pattern, key in _DEVICE_KINDS:
        if local.platform != "cpu" and pattern in kind:
            return DEVICE_MEMORY_GIB[key] * GIB, local.device_kind
    return None, local.device_kind


# ---- the estimate ---------------------------------------------------------------------------------
def hf_config_for(path: str, revision: str | None = None) -> dict:
    """config.json of a model, read without its weights (jaxft.hf.config_for)."""
    from jaxft import hf

    return hf.config_for(path, revision)


def mesh_sizes(shape, num_devices: int | None = None) -> dict[str, int]:
    """mesh.shape with -1 resolved, without building a Mesh (the plan may be for devices not here)."""
    sizes = {axis: int(dict(shape).get(axis, 1)) for axis in sharding.MESH_AXES}
    if -1 in sizes.values():
        known = math.prod(s for s in sizes.values() if s != -1)
        total = num_devices or jax.device_count()
        sizes = {a: (max(total // known, 1) if s == -1 else s) for a, s in sizes.items()}
    return sizes


_CACHE: dict[str, Estimate] = {}  # estimates are pure functions of their inputs; advice revisits many


def estimate(config, hf_config: dict, sizes: dict[str, int], target: str | None = None) -> Estimate:
    """Per-device memory of `config`'s train step on a mesh of `sizes` (see the module docstring).

    target: the backend it will run on ("tpu", "gpu"; None = this one). Attention's implementation
    depends on it (model.attention=auto: splash on TPU, cudnn on GPU for bf16); a fused kernel keeps
    no [B, H, T, S] scores, so a plan made on CPU for a TPU drops those the XLA reference would keep.
    """
    key = repr((sorted(config.to_dict().items(), key=str), sorted(hf_config.items(), key=str), sorted(sizes.items()),
                target))
    if key not in _CACHE:
        _CACHE[key] = _estimate(config, hf_config, sizes, _fused_attention(config, hf_config, target))
    return _CACHE[key]


def _fused_attention(config, hf_config, target) -> str | None:
    """The fused kernel the target runs where this machine traces the XLA reference, else None."""
    if target in (None, jax.default_backend()):
        return None  # the trace runs the implementation this backend resolves: nothing to correct
    attention = config_lib.get(config, "model.attention", "auto")
    if attention == "auto":
        compute = jnp.dtype(config.model.compute_dtype or config.model.dtype)
        softcap = hf_config.get("attn_logit_softcapping") is not None
        attention = "splash" if target == "tpu" else "cudnn" if compute != jnp.float32 and not softcap else "xla"
    return attention if attention in ("splash", "cudnn") else None


def _estimate(config, hf_config, sizes, fused) -> Estimate:
    parts = run_lib.abstract_training(config, hf_config)  # the state the run builds, as shapes
    model_def, optimizer, state = parts.model_def, parts.optimizer, parts.state
    mesh = types.SimpleNamespace(shape=sizes)  # all sharding.logical_to_spec reads
    axes = model_def.axes
    shards = lambda path, x: _shards(sharding.logical_to_spec(axes[path], x.shape, mesh), sizes)  # noqa: E731
    per_device = lambda path, x: _nbytes(x) // shards(path, x)  # noqa: E731
    quantize = config_lib.get(config, "model.quantize", "none") or "none"
    layers = int(hf_config["num_hidden_layers"])
    frozen = sum(per_device(p, x) for p, x in state.frozen.items())
    trainable = sum(per_device(p, x) for p, x in state.params.items())
    counts = {p: shards(p, x) for p, x in state.params.items()}
    import optax

    opt = optax.tree_map_params(optimizer, lambda x, n: _nbytes(x) // n, state.opt_state, counts,
                                transform_non_params=_nbytes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    opt_bytes = int(sum(jax.tree.leaves(opt)))
    accum = config.train.grad_accum
    grads = trainable * (2 if accum > 1 else 1)

    dp = sizes["data"] * sizes["fsdp"] * sizes.get("expert", 1)  # the batch's mesh axes (sharding.DEFAULT_RULES)
    micro = max(config.train.batch_size // accum // dp, 1)
    grown = parts.new_vocab  # model.add_tokens: the grown vocabulary is what the step computes over
    seq, vocab = config.data.seq_len, grown.size if grown else int(hf_config["vocab_size"])
    context = sizes.get("context", 1)
    saved = _residuals(parts, config, micro, seq, vocab, layers, hf_config, sizes, fused)
    if config.train.remat == "none":
        full = saved
    else:  # the remat policy is part of the model graph: trace a copy without it for one layer's intermediates
        plain = config_lib.with_values(config, {"train.remat": "none"})
        full = _residuals(run_lib.abstract_training(plain, hf_config), plain, micro, seq, vocab, layers, hf_config,
                          sizes, fused)
    layer = full["stacked"] // layers  # one layer's forward intermediates
    recomputed = max(layer - saved["stacked"] // layers, 0)  # what remat drops and the backward redoes
    # Backward of one layer: its cotangents (about its intermediates' size) plus part of what remat
    # recomputes, alive at once (0.4: XLA's CPU count on the demo model, tests/test_plan.py). A
    # quantized layer's dequantized weights are among its intermediates, so they are in `layer`.
    layer_working = layer + int(0.4 * recomputed)
    if sizes["fsdp"] > 1 or context > 1:  # FSDP gathers each layer's weights whole (but for tensor splits) to use them
        stacked = [(p, x) for p, x in {**state.params, **state.frozen}.items() if x.shape and x.shape[0] == layers]
        tensor_only = {**sizes, "data": 1, "fsdp": 1, "context": 1}
        layer_working += sum(_nbytes(x) // _shards(sharding.logical_to_spec(axes[p], x.shape, mesh), tensor_only)
                             for p, x in stacked) // layers
    if context > 1:  # context-parallel attention gathers each layer's keys and values whole (and their cotangents)
        kv_heads = int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])
        head_dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"])
        compute = jnp.dtype(config.model.compute_dtype or config.model.dtype).itemsize
        kv_tp = sizes["tensor"] if kv_heads % sizes["tensor"] == 0 else 1
        layer_working += 2 * 2 * micro * seq * kv_heads * head_dim * compute // kv_tp
    # Per device, a chunked loss holds `chunk` tokens of each context shard (jaxft.losses.over_chunks).
    chunk = config.train.loss_chunk or seq // context
    tp = sizes["tensor"] if vocab % sizes["tensor"] == 0 else 1
    # The logits' cotangent (softmax fused in), for objectives that make [B, T, V] logits at all.
    logits_working = micro * chunk * vocab * 4 // tp if saved["logits"] else 0
    # After the backward pass the activations are gone and the optimizer makes its updates (one
    # array per trainable param): in full fine-tuning that, not the backward pass, is the peak.
    update_working = trainable - saved["other"] - saved["logits"]
    working = max((layer_working, "one layer's backward"), (logits_working, "logits cotangent"),
                  (update_working, "optimizer update, after the activations are freed"))

    base_dtype = str(state.frozen["model.embed_tokens.weight"].dtype) if "model.embed_tokens.weight" in state.frozen \
        else config.model.dtype
    rows = [
        (f"frozen base ({base_dtype}{'' if quantize == 'none' else ', Linears ' + quantize})", frozen,
         f"{_count(state.frozen)} params" if state.frozen else ""),
        (f"trainable params ({_dtypes(state.params)})", trainable, f"{_count(state.params)} params"
         + (f", vocabulary {grown.old_size} → {grown.size} ({len(grown.rows)} new token rows"
            + (" trained)" if any(".adapter.rows" in p for p in state.params) or not config.lora.rank else ")")
            if grown else "")),
        ("optimizer state", opt_bytes, config.train.optimizer),
        ("gradients", grads, "+ accumulator" if accum > 1 else ""),
        (f"activations (remat={config.train.remat})", saved["other"],
         f"saved for backward, micro-batch {micro} × {seq}" + (f" / context {context}" if context > 1 else "")),
        (f"logits [{saved['logits'] // (seq // context * vocab * 4) or micro}, {seq if context == 1 else f'{seq}/{context}'}, "
         f"{vocab}] f32" if not config.train.loss_chunk
         else f"logits, chunks of {chunk} tokens", saved["logits"], ""),
        ("working set", *working),
    ]
    # Full fine-tuning freezes nothing; an objective without vocabulary logits (a classifier) has none.
    rows = [row for row in rows if row[1] or not row[0].startswith(("frozen", "logits"))]
    rows += parts.task.extra_memory(config, hf_config, sizes)  # e.g. GRPO's rollout KV cache
    from jaxft.models import attention as attn_lib

    implementation = fused or attn_lib.resolve_implementation(
        config_lib.get(config, "model.attention", "auto"), dtype=config.model.compute_dtype or config.model.dtype,
        softcap=hf_config.get("attn_logit_softcapping") is not None)
    settings = {"micro_batch": micro, "grad_accum": accum, "seq_len": seq, "remat": config.train.remat,
                "loss_chunk": config.train.loss_chunk, "lora_rank": config.lora.rank, "quantize": quantize,
                "peft_method": peft_methods.method(config), "trainable_params": sum(int(np.prod(x.shape)) for x in
                                                                                    state.params.values()),
                "virtual_tokens": peft_methods.virtual_tokens(config),  # extra key/value length of every sequence
                "attention": implementation}
    from jaxft.models import moe

    routing = moe.counts_of_hf_config(hf_config)
    if routing:  # MoE: what a token uses (MFU's count) beside what memory holds
        shapes = {p: tuple(x.shape) for p, x in {**state.params, **state.frozen}.items()
                  if ".adapter." not in p and (".weight." not in p or p.endswith(".codes"))}  # the base model
        settings["params_total"], settings["params_active"] = moe.param_counts(shapes, *routing)
        settings["experts"] = f"top-{routing[0]} of {routing[1]}"
    return Estimate(rows, settings)


def _residuals(parts, config, micro, seq, vocab, layers, hf_config, sizes, fused) -> dict[str, int]:
    """Bytes of the objective's loss VJP's residuals per device: {"logits", "stacked" (per-layer,
    [L, ...]), "other"}, traced on a micro-batch of the task's batch shapes.

    The inputs (params, the batch) are not residuals here: they are counted once, above. With
    `fused` attention, the reference's [.., T, S] scores, probabilities and mask are left out.
    """
    from jax.extend import core as jcore

    state = parts.state
    loss_fn = step.make_loss_fn(parts.model_def, parts.objective)
    batch = parts.task.batch_spec(config, micro)

    def forward(params, frozen, batch, rng):
        normalizer = parts.objective.normalizer(batch)  # a count, or a dict of counts (ORPO, GRPO)
        return jax.vjp(lambda p: loss_fn(p, frozen, batch, normalizer, rng)[0], params)

    closed, out_shape = jax.make_jaxpr(forward, return_shape=True)(state.params, state.frozen, batch, jax.random.key(0))
    outvars = closed.jaxpr.outvars
    residuals = outvars[len(outvars) - len(jax.tree.leaves(out_shape[1])):]
    inputs, seen = set(closed.jaxpr.invars), set()
    # Views of the inputs are inputs too: layer_groups reshapes the stacked [L, ...] params to
    # [G, P, ...] for its scan, a layout change XLA makes without a copy.
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name in ("reshape", "squeeze", "expand_dims") and eqn.invars[0] in inputs:
            inputs.update(eqn.outvars)
    tp_dims = {hf_config.get("num_attention_heads"), hf_config.get("num_key_value_heads"),
               hf_config.get("intermediate_size"), vocab}
    context, chunk = sizes.get("context", 1), config.train.loss_chunk
    out = {"logits": 0, "stacked": 0, "other": 0}
    for var in residuals:
        if isinstance(var, jcore.Literal) or var in inputs or var in seen:
            continue
        seen.add(var)
        shape = var.aval.shape
        if fused and len(shape) >= 2 and shape[-2:] == (seq, seq):
            continue
        nbytes = int(np.prod(shape)) * var.aval.dtype.itemsize
        # Tensor parallelism splits heads / mlp / vocab activations; the batch is already per device.
        if sizes["tensor"] > 1 and any(d in tp_dims and d % sizes["tensor"] == 0 for d in shape):
            nbytes //= sizes["tensor"]
        # Context parallelism splits activations along the sequence (attention's [.., T, S] scores
        # along the queries: each device's T/c against all S keys).
        # A chunked loss's [T/chunk, B, chunk, ..] pieces too (jaxft.losses.over_chunks).
        chunked = chunk and len(shape) >= 3 and shape[0] == seq // chunk and shape[2] == chunk
        if context > 1 and (seq in shape or chunked) and seq % context == 0:
            nbytes //= context
        if len(shape) >= 2 and shape[-1] == vocab:
            out["logits"] += nbytes
        else:
            out["other"] += nbytes
            if len(shape) >= 3 and shape[0] == layers:
                out["stacked"] += nbytes
    return out


def _shards(spec, sizes) -> int:
    used = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(sizes.get(a, 1) for a in used)


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize if hasattr(x, "shape") else 0


def _count(params: dict) -> str:
    """Model params, a quantized weight counted once (its `codes`; nf4 packs two a byte), not its scales."""
    n = 0
    for path, x in params.items():
        if ".weight." not in path:
            n += int(np.prod(x.shape))
        elif path.endswith(".codes"):
            n += int(np.prod(x.shape)) * (2 if x.dtype == jnp.uint8 else 1)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _dtypes(tree) -> str:
    return "/".join(sorted({str(x.dtype) for x in jax.tree.leaves(tree)}))


def _flags(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


# ---- the plan: estimate, compare, advise ----------------------------------------------------------
def plan(config, device: str | None = None, memory_bytes: int | None = None, num_devices: int | None = None,
         advise: bool = True, compile: bool = False, name: str = "") -> Plan:
    """The estimate for `config` against the device's memory, and if it does not fit the nearest
    settings that do. `device`: a DEVICE_MEMORY_GIB key; `memory_bytes` overrides it."""
    hf_config = hf_config_for(config.model.path, config.model.revision)
    sizes = mesh_sizes(config.mesh.shape, num_devices)
    memory, where = device_memory(device, config)
    if memory_bytes:
        memory, where = int(memory_bytes), f"{memory_bytes / GIB:g} GiB given"
    target = None if not device else "tpu" if device.lower() in TPUS else "gpu"
    est = estimate(config, hf_config, sizes, target)
    result = Plan(est, memory, where, _header(config, hf_config, sizes, est, name))
    if advise and result.fits is False:
        result.tried, result.advice = nearest_fit(config, hf_config, sizes, memory, target)
    if compile:
        result.compiled = compiled_memory(config, hf_config, sizes)
        # XLA compiled for this backend: compare with the estimate for it (attention may differ from the target's).
        result.compiled["estimate"] = estimate(config, hf_config, sizes).total
    return result


def nearest_fit(config, hf_config, sizes, memory, target=None) -> tuple[list[tuple[dict, int]], dict | None]:
    """Walks the knobs in order — smaller micro-batch with more accumulation, stronger remat, chunked
    loss, lower LoRA rank, a quantized base (LoRA only) — each on top of the last, until the estimate
    fits; then undoes every change the fit does not need. Returns (what was tried, the overrides)."""
    def total(overrides: dict) -> int:
        return estimate(config_lib.with_values(config, overrides), hf_config, sizes, target).total

    tried, current = [], {}
    chunkable = estimate(config, hf_config, sizes, target).get("logits") > 0  # only a vocabulary loss chunks
    for key, values in _knobs(config, sizes, chunkable):
        for value in values:
            current = {**current, key: value}
            tried.append((current, total(current)))
            if tried[-1][1] <= memory:
                return tried, _undo_unneeded(config, sizes, current, total, memory, chunkable)
    return tried, None


def _knobs(config, sizes, chunkable: bool = True):
    """(key, values from the current setting towards the most frugal) in the order they are tried."""
    dp = sizes["data"] * sizes["fsdp"] * sizes.get("expert", 1)  # the batch's mesh axes (sharding.DEFAULT_RULES)
    batch, accum = config.train.batch_size, config.train.grad_accum
    yield "train.grad_accum", [a for a in (accum * 2**i for i in range(1, 12))
                               if batch % a == 0 and (batch // a) % dp == 0]
    remat = REMAT_ORDER.index(config.train.remat)
    yield "train.remat", list(REMAT_ORDER[remat + 1:])
    seq = config.data.seq_len
    if chunkable and not config.train.loss_chunk:
        yield "train.loss_chunk", [c for c in (512, 256, 128) if seq % c == 0 and c < seq][:1]
    if config.lora.rank:
        yield "lora.rank", [r for r in (8, 4) if r < config.lora.rank]
        quantize = config_lib.get(config, "model.quantize", "none") or "none"
        yield "model.quantize", list(QUANT_ORDER[QUANT_ORDER.index(quantize) + 1:])
    elif not (config.train.freeze or config.train.freeze_first_layers):
        yield "lora.rank", [16]  # full fine-tuning that cannot fit: train adapters instead


def _undo_unneeded(config, sizes, found: dict, total, memory, chunkable: bool) -> dict:
    """For each change, newest first, the setting closest to the config's own that still fits."""
    result = dict(found)
    for key in reversed(list(found)):
        original = config_lib.get(config, key, "none")
        values = [original] + [v for k, vs in _knobs(config, sizes, chunkable) if k == key for v in vs
                               if v != found[key]]
        for value in values:
            trial = {k: v for k, v in {**result, key: value}.items() if v != config_lib.get(config, k, "none")}
            if _ordered_before(key, value, found[key]) and total(trial) <= memory:
                result = trial
                break
    return result


def _ordered_before(key, value, chosen) -> bool:
    """Is `value` less drastic than `chosen` for this knob?"""
    order = {"train.remat": REMAT_ORDER, "model.quantize": QUANT_ORDER}.get(key)
    if order:
        return order.index(value) < order.index(chosen)
    if key == "train.loss_chunk":
        return value == 0 or value > chosen
    if key == "lora.rank":
        return value > chosen
    return value < chosen  # grad_accum


def compiled_memory(config, hf_config: dict, sizes: dict[str, int]) -> dict:
    """Lower and compile the real train step on this machine's devices (abstract inputs: nothing is
    allocated) and return XLA's per-device count. Affordable for small models only.

    argument = the donated state + the batch; output = the new state + metrics, nearly all of it
    aliased to the donated arguments; temp = everything else live at the peak (activations,
    gradients, the logits). Peak = argument + output - alias + temp."""
    mesh = sharding.make_mesh(sizes, devices=jax.devices()[:math.prod(sizes.values())])
    parts = run_lib.abstract_training(config, hf_config)
    jitted, _ = step.compile_train_step(parts.train_step, parts.state, parts.optimizer, parts.model_def, mesh)
    batch = parts.task.batch_spec(config, config.train.batch_size)
    with sharding.activate(mesh):
        stats = jitted.lower(parts.state, batch).compile().memory_analysis()
    counts = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
              "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes}
    counts["peak"] = counts["argument"] + counts["output"] - counts["alias"] + counts["temp"]
    return counts


def preflight(config, mesh) -> Plan | None:
    """Before `jaxft train` downloads or compiles anything: the plan, if the device's memory is known
    (train.device_memory_gb, or the runtime's); raises DoesNotFitError with the advice if it is exceeded."""
    memory, _ = device_memory(None, config)
    if memory is None:
        return None
    try:
        result = plan(config, num_devices=mesh.size)
    except Exception as e:  # noqa: BLE001 - a planning failure must not stop a run that may well fit
        log.warning("memory preflight skipped: %s: %s", type(e).__name__, e)
        return None
    if result.fits is False:
        raise DoesNotFitError("this run does not fit in device memory (set train.preflight=False to try anyway):\n"
                              + result.table())
    log.info("memory plan: %.2f GiB of %.2f GiB per device (%s)", result.estimate.total / GIB, memory / GIB,
             result.device)
    return result


def _header(config, hf_config, sizes, est, name) -> str:
    s = est.settings
    mesh = " × ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1 device"
    method = peft_methods.method(config)
    what = f"LoRA r{config.lora.rank}" if config.lora.rank else "full fine-tuning"
    if method != "lora":
        what = f"{method} ({s['trainable_params']:,} trained params" + (
            f"; +{s['virtual_tokens']} key/value positions per sequence)" if s["virtual_tokens"] else ")")
    return (f"jaxft plan{' ' + name if name else ''}: {config.model.path} ({hf_config.get('model_type')}), {what}\n"
            f"  mesh {mesh}; micro-batch {s['micro_batch']} × seq {s['seq_len']} per device, grad_accum "
            f"{s['grad_accum']}; remat {s['remat']}; loss_chunk {s['loss_chunk']}; attention {s['attention']}; "
            f"{config.model.dtype} params, quantize {s['quantize']}"
            + (f"\n  experts {s['experts']}: {s['params_total'] / 1e9:.2f}B params in total, {s['params_active'] / 1e9:.2f}B "
               "active per token (MFU counts these)" if "params_active" in s else ""))
