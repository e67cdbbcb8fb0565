"""Run configs: the defaults of every key, loading `configs/NAME.py[:ARG]`, command-line overrides.

A config is an ml_collections ConfigDict. `default_config()` holds every key with its default and
meaning; config files start from it (`configs/demo.py` is the embedded default). Overrides are
`--config.KEY=VALUE` with VALUE parsed as a Python literal (else kept as a string); an unknown key
is an error naming it and the closest known keys. `validate` checks what can be checked before
anything is built or compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from jaxft.data.config import default_config as default_data_config


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir"  # metrics.jsonl, checkpoints/, exports of this run
    c.task = "causal_lm"  # causal_lm (next-token loss) | classification (a head on the last non-pad token)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF folder or hub id of the base model
    c.model.revision = ml_collections.FieldReference(None, field_type=str)  # hub revision (branch, tag, commit)
    c.model.dtype = "float32"  # parameter dtype: float32 | bfloat16 (frozen base weights, or all in full FT)
    c.model.compute_dtype = ml_collections.FieldReference(None, field_type=str)  # activations; None = model.dtype
    c.model.attention = "auto"  # auto | xla | jax | cudnn | splash (auto: cudnn on NVIDIA GPU, splash on TPU, else xla)
    c.model.quantize = "none"  # none | int8 | nf4: QLoRA, the frozen decoder Linears stored quantized (needs lora.rank > 0)

    c.data = default_data_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100  # optimizer steps
    c.train.batch_size = 8  # global, in sequences (all hosts, all micro-batches)
    c.train.grad_accum = 1  # micro-batches per step
    c.train.learning_rate = 1e-4  # peak
    c.train.optimizer = "adamw"  # adamw | adafactor | lion | sgd
    c.train.schedule = "cosine"  # constant | linear | cosine, after warmup
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0  # decoupled; never on norms or biases
    c.train.clip_norm = 1.0  # global gradient norm (0 = off)
    c.train.z_loss = 0.0
    c.train.remat = "none"  # none | full | dots | dots_no_batch
    c.train.loss_chunk = 0  # > 0: cross-entropy over sequence chunks of this size (no [B, T, vocab] logits)
    c.train.seed = 0  # data order, LoRA init, dropout
    c.train.freeze = ()  # full FT: regexes of param paths to freeze, e.g. ("embed_tokens",)
    c.train.freeze_first_layers = 0  # full FT: keep the first N decoder layers frozen
    c.train.on_nonfinite = "abort"  # abort (naming the step, saving nothing bad) | skip (drop that update)
    c.train.log_every = 1  # steps between metrics.jsonl rows
    c.train.eval_every = 0  # steps between eval-loss passes (0 = only at the end, if validation data)
    c.train.wandb = False  # also log to Weights & Biases (if installed)
    c.train.preflight = True  # before downloading/compiling: estimate memory from shapes, stop if it cannot fit
    c.train.device_memory_gb = 0.0  # the preflight's limit in GiB per device; 0 = what the runtime reports (none on CPU)

    # task=classification: rows {text_field: str, label_field: name or id} from data.train / data.validation,
    # each padded or cut to data.seq_len; data.format, data.packing and the data.* mixing keys do not apply
    # (one row is one example). Eval reports eval_loss, accuracy and macro-F1 (jaxft.tasks.classification).
    c.classification = ml_collections.ConfigDict()
    c.classification.labels = ()  # label names in id order (>= 2): the head's classes and HF id2label
    c.classification.text_field = "text"
    c.classification.label_field = "label"

    c.eval = ml_collections.ConfigDict()
    c.eval.task_file = ml_collections.FieldReference(None, field_type=str)  # JSONL {"prompt", "answer"}: exact match before/after
    c.eval.max_new_tokens = 16  # generation budget per task answer
    c.eval.patience = 0  # early stopping: evaluations without eval-loss improvement (0 = off)
    c.eval.samples = 8  # generations shown in the report

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ml_collections.FieldReference("all-linear", field_type=object)  # "all-linear" or module names (q_proj, ...)
    c.lora.use_rslora = False
    c.lora.use_dora = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = {"data": -1}  # axes data, fsdp, tensor; -1 takes the remaining devices
    c.mesh.coordinator = ml_collections.FieldReference(None, field_type=str)  # multi-host: "host:port"
    c.mesh.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.mesh.process_id = ml_collections.FieldReference(None, field_type=int)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # steps between saves (and one at the end)
    c.checkpoint.keep = 2  # latest checkpoints kept ...
    c.checkpoint.keep_best = 1  # ... plus the best by eval loss
    c.checkpoint.async_save = True  # write in the background while training goes on
    c.checkpoint.resume_from = ml_collections.FieldReference(None, field_type=str)  # another run's workdir
    c.checkpoint.allow_changes = False  # resume even if model/data/seq_len/batch_size changed
    return c


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:ARG]` → its get_config(ARG), with `--config.KEY=VALUE` overrides applied."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"jaxft_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """`config.train.steps=10` (or `train.steps=10`): sets an existing key, typed like its default."""
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise KeyError(_unknown(".".join(parents[:depth + 1]), config))
        node = node[name]
    if leaf not in node:
        raise KeyError(_unknown(key, config))
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as a path
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, str):
        value = (value,)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"--config.{key}={raw}: {e}") from None


def _unknown(key: str, config: ml_collections.ConfigDict) -> str:
    known = list(_flat_keys(config))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


_DICT_VALUED = {"mesh.shape"}  # keys whose value is a dict, not a section


def _flat_keys(config, prefix: str = ""):
    for name in config.keys():
        value = config[name]
        full = f"{prefix}{name}"
        yield full
        if isinstance(value, ml_collections.ConfigDict) and full not in _DICT_VALUED:
            yield from _flat_keys(value, full + ".")


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Every key must be one the defaults know: a typo in a config file fails loudly."""
    known = set(_flat_keys(default_config()))
    for key in _flat_keys(config):
        if key not in known and not key.startswith("data."):
            raise KeyError(_unknown(key, default_config()))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks made before anything is loaded or compiled."""
    check_keys(config)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(bool(config.model.path), "model.path is empty: give an HF folder or hub id")
    need("://" not in str(config.workdir),
         f"workdir {config.workdir!r} is a URL; the workdir must be a filesystem path: mount the bucket (gcsfuse, as "
         "tpu_scripts/install.sh does at /mnt/gcs) and use e.g. /mnt/gcs/runs/NAME")
    need(config.model.dtype in ("float32", "bfloat16"), f"model.dtype {config.model.dtype!r} must be float32 or bfloat16")
    from jaxft.models.attention import CHOICES as ATTENTION_CHOICES  # imported here: loading a config needs no jax

    need(config.model.attention in ATTENTION_CHOICES,
         f"model.attention {config.model.attention!r} must be one of {ATTENTION_CHOICES}")
    need(config.train.steps > 0, f"train.steps must be > 0, got {config.train.steps}")
    need(config.train.warmup_steps <= config.train.steps,
         f"train.warmup_steps={config.train.warmup_steps} exceeds train.steps={config.train.steps}")
    need(config.train.batch_size > 0, f"train.batch_size must be > 0, got {config.train.batch_size}")
    need(config.train.on_nonfinite in ("abort", "skip"), f"train.on_nonfinite {config.train.on_nonfinite!r} must be abort or skip")
    need(config.lora.rank >= 0, f"lora.rank must be >= 0, got {config.lora.rank}")
    need(config.model.quantize in ("none", "int8", "nf4"),
         f"model.quantize {config.model.quantize!r} must be none, int8 or nf4")
    need(config.model.quantize == "none" or config.lora.rank > 0,
         f"model.quantize={config.model.quantize} needs LoRA (lora.rank > 0): quantized base weights are frozen "
         "and cannot be fully fine-tuned")
    need(config.checkpoint.every > 0, f"checkpoint.every must be > 0, got {config.checkpoint.every}")
    need(config.task in ("causal_lm", "classification"), f"task {config.task!r} must be causal_lm or classification")
    if config.task == "classification":
        labels = list(config.classification.labels)
        need(len(labels) >= 2 and len(set(labels)) == len(labels) and all(isinstance(x, str) for x in labels),
             f"classification.labels must be >= 2 distinct label names, got {labels}")
        need(bool(config.data.train), "task=classification needs data.train (JSONL/Parquet rows {text, label})")
        need(isinstance(config.data.train, str) and (not config.data.validation or isinstance(config.data.validation, str)),
             "task=classification reads one source each for data.train / data.validation (a path pattern or hf:/tfds: spec)")
        need(not config.data.validation_fraction and not config.data.stages,
             "task=classification takes its validation rows from data.validation; data.validation_fraction and "
             "data.stages are for causal_lm")
        need(not config.eval.task_file,
             "eval.task_file (exact match of generated answers) does not apply to task=classification: a classifier "
             "does not generate; its accuracy and F1 on data.validation are reported instead")
    need(not (config.lora.rank and (config.train.freeze or config.train.freeze_first_layers)),
         "train.freeze / freeze_first_layers are for full fine-tuning (lora.rank=0); LoRA freezes the base already")


def from_plain(values: dict) -> ml_collections.ConfigDict:
    """The inverse of to_plain: a saved config (checkpoint meta) back into a ConfigDict."""
    config = default_config()
    _update(config, values)
    return config


def _update(node: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
    for key, value in values.items():
        if key not in node:
            raise KeyError(_unknown(prefix + key, default_config()))
        if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict) and prefix + key not in _DICT_VALUED:
            _update(node[key], value, prefix + key + ".")
        else:
            node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value


def to_plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """JSON-ready dict (tuples as lists) for metadata and reports."""
    return _plain(config.to_dict())


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
