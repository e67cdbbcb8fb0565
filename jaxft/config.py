"""Run configs: the defaults of every key, loading `configs/NAME.py[:ARG]`, command-line overrides.

A config is an ml_collections ConfigDict. `default_config()` holds every key with its default and
meaning; config files start from it (`configs/demo.py` is the embedded default). Overrides are
`--config.KEY=VALUE` with VALUE parsed as a Python literal (else kept as a string); an unknown key
is an error naming it and the closest known keys. `validate` checks what can be checked before
anything is built or compiled; the task's own section is checked by the task (jaxft.tasks).
`get` / `with_values` are the one dotted-key walker ("train.steps"), for ConfigDicts and the plain
dicts saved in checkpoint metadata alike. `optimizer_settings` / `step_settings` / `lora_settings`
turn a config into the settings objects of the layers below, whose own checks are the only ones.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections

from jaxft.data.config import default_config as default_data_config


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "workdir"  # metrics.jsonl, checkpoints/, exports of this run
    c.task = "causal_lm"  # the objective (jaxft.tasks): causal_lm (next-token loss) | classification (a head on
    # the last non-pad token) | dpo (preference tuning) | reward (a reward model) | a registered plug-in; each has
    # its own section below (classification.*, dpo.*, reward.*)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF folder or hub id of the base model
    c.model.revision = ml_collections.FieldReference(None, field_type=str)  # hub revision (branch, tag, commit)
    c.model.dtype = "float32"  # parameter dtype: float32 | bfloat16 (frozen base weights, or all in full FT)
    c.model.compute_dtype = ml_collections.FieldReference(None, field_type=str)  # activations; None = model.dtype
    c.model.attention = "auto"  # auto | xla | jax | cudnn | splash (auto: cudnn on NVIDIA GPU, splash on TPU, else xla)
    c.model.moe_implementation = "grouped"  # MoE experts: grouped (ragged_dot, dropless) | dense (one-hot reference)
    c.model.quantize = "none"  # none | int8 | nf4: QLoRA, the frozen decoder Linears stored quantized (needs lora.rank > 0)
    # New tokens (jaxft.vocab): added to the tokenizer, and the embedding (and an untied lm_head) grown to it.
    c.model.add_tokens = ml_collections.FieldReference((), field_type=object)  # ordinary tokens (strings)
    c.model.add_special_tokens = ml_collections.FieldReference((), field_type=object)  # special ones (chat markers)
    c.model.pad_vocab_multiple = 1  # a grown vocabulary is rounded up to a multiple of this (64/128 suit TPUs)

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
    c.train.end_learning_rate_ratio = 0.0  # linear/cosine decay to this fraction of the peak
    c.train.b1 = ml_collections.FieldReference(None, field_type=float)  # adamw/lion beta1 (None: 0.9)
    c.train.b2 = ml_collections.FieldReference(None, field_type=float)  # beta2 (None: adamw 0.999, lion 0.99)
    c.train.momentum = 0.0  # sgd momentum (0 = plain SGD)
    c.train.clip_norm = 1.0  # global gradient norm (0 = off)
    c.train.z_loss = 0.0
    c.train.router_aux_loss_coef = 0.0  # MoE: × load-balancing loss (transformers' router_aux_loss_coef; 0 = off)
    c.train.router_z_loss_coef = 0.0  # MoE: × router z-loss (ST-MoE; 0 = off)
    c.train.remat = "none"  # none | full | dots | dots_no_batch
    c.train.loss_chunk = 0  # > 0: cross-entropy over sequence chunks of this size (no [B, T, vocab] logits)
    c.train.seed = 0  # data order, LoRA init, dropout
    c.train.freeze = ()  # full FT: regexes of param paths to freeze, e.g. ("embed_tokens",)
    c.train.freeze_first_layers = 0  # full FT: keep the first N decoder layers frozen
    c.train.new_token_rows = ml_collections.FieldReference(None, field_type=bool)  # LoRA: the new tokens'
    # embedding (and lm_head) rows train, the others stay bit-identical (None: True when model.add_tokens grew it)
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

    # task=dpo: preference pairs (data.format="preference": {prompt, chosen, rejected}, TRL's standard or
    # conversational rows); the reference is the base with adapters off (LoRA/DoRA/QLoRA: no copy), a frozen
    # copy (full fine-tuning), or log-probs computed once before training (precompute_reference).
    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | ipo | hinge | simpo | orpo (the last two: no reference)
    c.dpo.beta = 0.1  # the inverse temperature (IPO's τ; ORPO's weight λ of the odds-ratio term)
    c.dpo.label_smoothing = 0.0  # sigmoid / simpo: the assumed share of flipped labels (conservative DPO)
    c.dpo.simpo_gamma = 0.5  # simpo: the target reward margin γ
    c.dpo.max_prompt_length = 0  # a too-long pair's prompt is cut to this many tokens first (0: data.seq_len // 2)
    c.dpo.precompute_reference = False  # reference log-probs in one pass before training (stored in the workdir)

    # task=reward: a reward model (the classification head with one output) trained with the Bradley-Terry
    # loss -log σ(r_chosen - r_rejected [- margin]) on the same preference pairs (data.margin_field: margins).
    c.reward = ml_collections.ConfigDict()
    c.reward.center_rewards_coefficient = 0.0  # + coefficient × mean((r_chosen + r_rejected)²) (TRL's)
    c.reward.max_prompt_length = 0  # as dpo.max_prompt_length

    # task=distill: a frozen teacher (any family jaxft loads, the student's tokenizer) on the same mesh; the
    # loss on the data's trained tokens (any causal_lm format), over train.loss_chunk chunks (jaxft.tasks.distill).
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # HF folder or hub id of the teacher
    c.distill.teacher_revision = ml_collections.FieldReference(None, field_type=str)
    c.distill.teacher_dtype = "float32"  # float32 | bfloat16
    c.distill.teacher_quantize = "none"  # none | int8 | nf4: the teacher's decoder Linears stored quantized
    c.distill.loss = "forward_kl"  # forward_kl (KL(teacher‖student)) | reverse_kl | jsd (GKD's generalized JSD)
    c.distill.jsd_beta = 0.5  # jsd: the mixture weight β (0 and 1 are the two KLs)
    c.distill.temperature = 1.0  # both models' logits divided by T (no T² factor, as TRL's GKD)
    c.distill.alpha = 1.0  # alpha × divergence + (1 − alpha) × the student's cross-entropy on the data
    c.distill.on_policy_fraction = 0.0  # GKD's λ: that share of steps trains on the student's own completions
    c.distill.max_new_tokens = 32  # on-policy: the longest sampled completion
    c.distill.sampling_temperature = 1.0  # on-policy: 0 = greedy

    # task=grpo: online RL from reward functions on prompt rows {"prompt": str | [messages], ...}; rollouts sampled
    # from the params being trained (jaxft.tasks.grpo). data.seq_len = max_prompt_length + max_new_tokens.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.rewards = ()  # "path/to/file.py:function" | "package.module:function", called as TRL calls them
    c.grpo.reward_weights = ()  # one per reward function (default: all 1)
    c.grpo.num_generations = 8  # completions sampled per prompt (train.batch_size counts completions)
    c.grpo.max_prompt_length = 256  # longer prompts keep their end
    c.grpo.max_new_tokens = 64  # completion budget; EOS ends a completion sooner
    c.grpo.temperature = 1.0  # sampling (0: greedy)
    c.grpo.top_p = 1.0
    c.grpo.top_k = 0
    c.grpo.scale_rewards = "group"  # group | batch | none: what the advantages are divided by (std + 1e-4)
    c.grpo.loss_type = "dapo"  # grpo | bnpo | dr_grpo | dapo: how per-token losses are averaged (as TRL)
    c.grpo.beta = 0.0  # weight of the k3 KL to the reference (0: no reference at all)
    c.grpo.epsilon = 0.2  # clipping of the ratio: [1 - epsilon, 1 + epsilon_high]
    c.grpo.epsilon_high = ml_collections.FieldReference(None, field_type=float)  # None: epsilon
    c.grpo.num_iterations = 1  # policy updates per rollout (TRL's μ); each is a step
    c.grpo.mask_truncated_completions = False  # completions without EOS carry no loss
    c.grpo.use_bias_correction_kl = True  # the KL term × the ratio (TRL's default; DeepSeek-V3.2)

    c.eval = ml_collections.ConfigDict()
    c.eval.task_file = ml_collections.FieldReference(None, field_type=str)  # JSONL {"prompt", "answer"}: exact match before/after
    c.eval.max_new_tokens = 16  # generation budget per task answer
    c.eval.patience = 0  # early stopping: evaluations without eval-loss improvement (0 = off)
    c.eval.samples = 8  # generations shown in the report
    c.eval.at_start = False  # also evaluate before the first step (the report then shows before / after)
    c.eval.early_stopping_metric = "eval_loss"  # the eval metric early stopping and checkpoint.keep_best watch
    # (lower is better), e.g. "eval_loss/<name>" of a named data.validation source

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ml_collections.FieldReference("all-linear", field_type=object)  # "all-linear" or module names (q_proj, ...)
    c.lora.use_rslora = False
    c.lora.use_dora = False

    # Which adapter trains (jaxft.peft.methods); names and defaults as PEFT's configs. Methods other than lora
    # ignore lora.*; prefix/prompt tuning export only as PEFT adapters (they cannot be merged into weights).
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # lora (lora.*; lora.rank=0: full fine-tuning) | prefix_tuning | prompt_tuning | ia3
    c.peft.num_virtual_tokens = 20  # prefix/prompt tuning: virtual tokens before every sequence
    c.peft.prefix_projection = False  # prefix tuning: PEFT's reparameterization MLP (embedding -> tanh MLP -> prefix)
    c.peft.encoder_hidden_size = ml_collections.FieldReference(None, field_type=int)  # its hidden size (None: kv heads x head_dim)
    c.peft.prompt_tuning_init = "RANDOM"  # prompt tuning: RANDOM | TEXT | SAMPLE_VOCAB (PEFT's PromptTuningInit)
    c.peft.prompt_tuning_init_text = ml_collections.FieldReference(None, field_type=str)  # TEXT: the starting text

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = {"data": -1}  # axes data, fsdp, context (splits sequences), tensor; -1 takes the remaining devices
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

    from jaxft import tasks  # the sections of registered plug-in objectives (no jax is imported)

    for name, section in tasks.plugin_sections().items():
        c[name] = section.copy_and_resolve_references()
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:smoke` variant of a demo config: 4 steps through every part (eval and a save at step 2)."""
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.eval_every = 2
    c.checkpoint.every = 2
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
    known_args = tuple(getattr(module, "ARGS", ()))  # each config file lists the args it knows
    if arg and arg not in known_args:
        raise ValueError(f"{path}: unknown config arg {arg!r}; this file knows "
                         + (", ".join(repr(a) for a in known_args if a) or "no args (ARGS is empty)"))
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """`config.train.steps=10` (or `train.steps=10`): sets an existing key, typed like its default."""
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like --config.KEY=VALUE")
    node, leaf = _parent(config, key)
    if node is None or leaf not in node:
        raise _unknown(key, config)
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


def _parent(config, key: str):
    """(the section holding `key`'s last part, that part), or (None, part) when a section is missing."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or name not in node:
            return None, leaf
        node = node[name]
    return (node if isinstance(node, Mapping | ml_collections.ConfigDict) else None), leaf


_MISSING = object()


def get(config, key: str, default: Any = _MISSING) -> Any:
    """The value at dotted `key` of a ConfigDict or a plain (saved) config dict; `default` when it is
    absent (a KeyError naming it without one)."""
    node, leaf = _parent(config, key)
    if node is None or leaf not in node:
        if default is _MISSING:
            raise KeyError(f"config has no key {key!r}")
        return default
    return node[leaf]


def with_values(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with {"section.key": value} set (a key the config lacks is added)."""
    config = config.copy_and_resolve_references()
    for key, value in values.items():
        node, leaf = _parent(config, key)
        if node is None:
            raise _unknown(key, config)
        node[leaf] = value
    return config


class UnknownKeyError(KeyError):
    """A config key the defaults do not know. A KeyError, whose message prints without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


def _unknown(key: str, config: ml_collections.ConfigDict) -> UnknownKeyError:
    known = list(_flat_keys(config))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownKeyError(f"unknown config key {key!r}{hint}")


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
            raise _unknown(key, default_config())


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks made before anything is loaded or compiled: the keys, the shared settings (each by the
    layer that uses it, see *_settings), then the task's own section (jaxft.tasks)."""
    check_keys(config)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(bool(config.model.path), "model.path is empty: give an HF folder or hub id")
    need(bool(str(config.workdir or "").strip()), "workdir is empty: give the folder this run writes into")
    need("://" not in str(config.workdir),
         f"workdir {config.workdir!r} is a URL; the workdir must be a filesystem path: mount the bucket (gcsfuse, as "
         "tpu_scripts/install.sh does at /mnt/gcs) and use e.g. /mnt/gcs/runs/NAME")
    need(config.model.dtype in ("float32", "bfloat16"), f"model.dtype {config.model.dtype!r} must be float32 or bfloat16")
    from jaxft.models.attention import CHOICES as ATTENTION_CHOICES  # imported here: loading a config needs no jax

    need(config.model.attention in ATTENTION_CHOICES,
         f"model.attention {config.model.attention!r} must be one of {ATTENTION_CHOICES}")
    need(config.train.steps > 0, f"train.steps must be > 0, got {config.train.steps}")
    need(config.train.batch_size > 0, f"train.batch_size must be > 0, got {config.train.batch_size}")
    need(config.train.log_every > 0, f"train.log_every must be > 0, got {config.train.log_every}")
    need(config.train.on_nonfinite in ("abort", "skip"), f"train.on_nonfinite {config.train.on_nonfinite!r} must be abort or skip")
    need(config.lora.rank >= 0, f"lora.rank must be >= 0, got {config.lora.rank}")
    if config.model.quantize != "none":
        from jaxft.peft import quant

        with _in_config_terms({"quantization mode": "model.quantize"}):
            quant.check_mode(config.model.quantize)
    from jaxft.peft import methods as peft_methods

    peft_methods.settings(config)  # peft.method and its keys
    need(config.model.quantize == "none" or peft_methods.is_adapter_run(config),
         f"model.quantize={config.model.quantize} needs LoRA (lora.rank > 0): quantized base weights are frozen "
         "and cannot be fully fine-tuned")
    need(config.checkpoint.every > 0, f"checkpoint.every must be > 0, got {config.checkpoint.every}")
    need(config.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1 (the latest checkpoints kept), got "
         f"{config.checkpoint.keep}: with 0 each checkpoint would be deleted as soon as it is written")
    need(config.checkpoint.keep_best >= 0, f"checkpoint.keep_best must be >= 0, got {config.checkpoint.keep_best}")
    need(not (config.lora.rank and (config.train.freeze or config.train.freeze_first_layers)),
         "train.freeze / freeze_first_layers are for full fine-tuning (lora.rank=0); LoRA freezes the base already")
    from jaxft import vocab

    vocab.token_settings(config)
    need(not (config.lora.rank and vocab.tokens_added(config) and "lm_head" in _targets(config.lora.targets)),
         "lora.targets includes lm_head and model.add_tokens grows it: the new token rows train on lm_head "
         "instead; leave lm_head out of lora.targets")
    optimizer_settings(config)
    step_settings(config)
    if config.lora.rank and peft_methods.method(config) == "lora":
        lora_settings(config)

    from jaxft import tasks

    tasks.get(config.task).validate(config)


def _targets(targets) -> tuple[str, ...]:
    return tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)


# The settings objects of the layers below, built from a config. Their own checks are the only
# ones (each thing is checked in one place); their messages name their own fields, which are
# translated here into the config's keys.
_OPTIMIZER_KEYS = {"name": "train.optimizer", "learning_rate": "train.learning_rate", "schedule": "train.schedule",
                   "warmup_steps": "train.warmup_steps", "total_steps": "train.steps",
                   "weight_decay": "train.weight_decay", "clip_norm": "train.clip_norm", "b1": "train.b1",
                   "b2": "train.b2", "momentum": "train.momentum",
                   "end_learning_rate_ratio": "train.end_learning_rate_ratio"}
_STEP_KEYS = {"grad_accum": "train.grad_accum", "remat": "train.remat", "freeze_first_layers": "train.freeze_first_layers"}


def optimizer_settings(config):
    """jaxft.optim.OptimConfig of a config."""
    from jaxft import optim

    t = config.train
    betas = {"lion": (0.9, 0.99)}.get(t.optimizer, (0.9, 0.999))  # each optimizer's paper default
    with _in_config_terms(_OPTIMIZER_KEYS):
        return optim.OptimConfig(name=t.optimizer, learning_rate=t.learning_rate, schedule=t.schedule,
                                 warmup_steps=t.warmup_steps, total_steps=t.steps, weight_decay=t.weight_decay,
                                 end_learning_rate_ratio=t.end_learning_rate_ratio,
                                 b1=betas[0] if t.b1 is None else t.b1, b2=betas[1] if t.b2 is None else t.b2,
                                 momentum=t.momentum, clip_norm=t.clip_norm or None)


def step_settings(config):
    """jaxft.step.StepConfig of a config."""
    from jaxft import step

    t = config.train
    with _in_config_terms(_STEP_KEYS):
        return step.StepConfig(grad_accum=t.grad_accum, remat=t.remat, skip_nonfinite=t.on_nonfinite == "skip",
                               freeze_first_layers=t.freeze_first_layers)


def lora_settings(config, targets=None):
    """jaxft.peft.lora.LoraConfig of a config (lora.rank > 0); `targets` replaces lora.targets (a
    task may narrow "all-linear", see Task.lora_targets)."""
    from jaxft.peft import lora

    c = config.lora
    if targets is None:
        targets = c.targets if isinstance(c.targets, str) else tuple(c.targets)
    return lora.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=targets, use_rslora=c.use_rslora,
                           use_dora=c.use_dora)


@contextlib.contextmanager
def _in_config_terms(keys: Mapping[str, str]):
    """Re-raises a lower layer's ValueError with its field names replaced by the config keys."""
    try:
        yield
    except ValueError as e:
        message = str(e)
        for field, key in keys.items():
            message = re.sub(rf"(?<![\w.]){re.escape(field)}(?!\w)", key, message)
        raise ValueError(message) from None


def from_plain(values: dict) -> ml_collections.ConfigDict:
    """The inverse of to_plain: a saved config (checkpoint meta) back into a ConfigDict."""
    config = default_config()
    _update(config, values)
    return config


def _update(node: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
    for key, value in values.items():
        if key not in node:
            raise _unknown(prefix + key, default_config())
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
