"""What a config builds, in one place for train, plan, eval, export and the CLI alike: the model with
the task's additions, the trainable/frozen split, the optimizer, the shardings, the train state
(placed, or as shapes only), and a run's checkpoint restored for inference.

    training = build_training(config, mesh, source_path, tokenizer)   # jaxft.train: state on the mesh, compiled steps
    parts = abstract_training(config, hf_config)                       # jaxft.plan: the same state, shapes only
    trained = restore("workdir/demo")                                  # jaxft export / eval: no optimizer state
    logits = trained.model()(input_ids)

The objective is config.task's (jaxft.tasks): nothing here names one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from jaxft import checkpoint as ckpt_lib
from jaxft import config as config_lib
from jaxft import optim, sharding, step, tasks, vocab
from jaxft.models import attention as attn_lib
from jaxft.models import moe
from jaxft.peft import lora, quant, token_rows
from jaxft.peft import methods as peft_methods
from jaxft.pretrained import from_pretrained, init_random
from jaxft.tasks.base import Task

log = logging.getLogger("jaxft.run")


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was made with a different model, data, or batch setup."""


# ---- the model ------------------------------------------------------------------------------------
def load_model(config, task: Task, source_path: str, mesh, pad_token_id: int | None, skip=()):
    """The base model as config.model says (dtype, compute dtype, QLoRA quantization while it loads),
    with the task's extra arguments (a classification head), placed on `mesh`."""
    return from_pretrained(source_path, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype, mesh=mesh,
                           quantize=config.model.quantize, skip=skip, **task.model_options(config, pad_token_id))


def prepare_model(model, config, task: Task, training: bool = True, mesh=None, abstract: bool = False,
                  new_vocab: vocab.NewVocab | None = None):
    """Every change a run makes to a loaded (or shapes-only) model, in the one order that works;
    returns (model, the predicate of the params that train). Callers never order these themselves:
    0. grow the vocabulary (`new_vocab`, jaxft.vocab: model.add_tokens): the base as the run sees it;
    1. quantize the base (model.quantize): before any adapter, since DoRA's magnitudes and the merge
       are of the base as stored; a no-op where from_pretrained quantized while loading;
    2. adapters (lora.*) on the targets the task asks for, or else full fine-tuning minus
       train.freeze patterns; the task's own trainable parts (a head) on top;
    3. the task's additions (Task.attach: a head; when `training`, a frozen reference, a teacher),
       after the adapters, so that nothing attached is adapted or quantized with the student;
    4. the attention implementation (model.attention): static graph data, so before the split.
    The remat policy (train.remat) is the split's (step.split_model), the last change of all.
    `mesh` / `abstract` are handed to Task.attach (where a teacher loads; shapes only for the plan).
    In a LoRA run the grown vocabulary's rows are token-row adapters (jaxft.peft.token_rows), which
    train unless train.new_token_rows=False; in full fine-tuning the grown tables train whole.
    """
    if new_vocab is not None:
        vocab.grow(model, new_vocab, seed=config.train.seed)
    if config.model.quantize != "none":
        quant.quantize_model(model, config.model.quantize)
    if peft_methods.method(config) != "lora":  # prefix/prompt tuning, IA3: lora.* does not apply
        peft_methods.apply(model, config, seed=config.train.seed, abstract=abstract)
        trainable = lora.is_lora_param
    elif config.lora.rank:
        targets = config.lora.targets if isinstance(config.lora.targets, str) else tuple(config.lora.targets)
        lora.apply_lora(model, config_lib.lora_settings(config, task.lora_targets(model, targets)),
                        seed=config.train.seed)
        trainable = lora.is_lora_param
        if new_vocab is not None:
            token_rows.attach(model, new_vocab.rows)
            if not vocab.trains_rows(config, new_vocab):
                trainable = lambda path, v: lora.is_lora_param(path, v) and not token_rows.is_token_rows_param(path, v)  # noqa: E731
    else:
        patterns = tuple(config.train.freeze)
        trainable = lambda path, variable: not optim.frozen_by_pattern([path], patterns)  # noqa: E731
    model = task.attach(model, config, training=training, mesh=mesh, abstract=abstract)
    attn_lib.set_attention_implementation(model, config.model.attention)
    moe.set_moe_implementation(model, config.model.get("moe_implementation", "grouped"))
    return model, task.trainable(trainable)


# ---- training -------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingParts:
    """What a training run is made of before it is placed on a mesh."""

    config: Any
    task: Task
    model_def: step.ModelDef
    optimizer: Any
    objective: Any  # jaxft.step.Objective
    train_step: Any  # not yet compiled
    state: step.TrainState
    new_vocab: vocab.NewVocab | None = None  # model.add_tokens: how the vocabulary grew


def training_parts(model, config, task: Task, mesh=None, abstract: bool = False,
                   new_vocab: vocab.NewVocab | None = None) -> TrainingParts:
    model, trainable = prepare_model(model, config, task, mesh=mesh, abstract=abstract, new_vocab=new_vocab)
    model_def, params, frozen = step.split_model(model, trainable, remat=config.train.remat)
    optim_cfg = config_lib.optimizer_settings(config)
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes, config.train.freeze_first_layers)
    objective = task.objective(config)
    train_step = step.make_train_step(model_def, optimizer, objective, config_lib.step_settings(config),
                                      optim.make_schedule(optim_cfg))
    state = step.init_state(params, frozen, optimizer, seed=config.train.seed)
    return TrainingParts(config, task, model_def, optimizer, objective, train_step, state, new_vocab)


def abstract_training(config, hf_config: dict) -> TrainingParts:
    """The training parts a config builds, the state as shapes only (jax.eval_shape): nothing is
    allocated, nothing downloaded. What jaxft plan counts, and tests check configs of big models with.
    New tokens (model.add_tokens) are counted with the base's tokenizer where model.path is a local
    folder that has one; otherwise each listed token is taken to be new to a tokenizer that fills
    the vocabulary."""
    task = tasks.get(config.task)
    holder = {}
    new_vocab = planned_vocab(config, hf_config)

    def make():
        # Shapes only: any pad id will do for a head.
        options = task.model_options(config, hf_config.get("pad_token_id") or 0)
        model = init_random(hf_config, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype, **options)
        holder["parts"] = training_parts(model, config, task, abstract=True, new_vocab=new_vocab)
        return holder["parts"].state

    state = jax.eval_shape(make)
    return dataclasses.replace(holder["parts"], state=state)


@dataclasses.dataclass
class Training(TrainingParts):
    """A training run placed on its mesh: the state sharded, the train and eval steps compiled."""

    state_shardings: Any = None
    compiled_step: Any = None
    eval_step: Any = None

    def saved(self, state=None) -> dict:
        return saved_state(self.state if state is None else state)

    def restore_target(self) -> Any:
        """What a checkpoint restores onto: the saved part of the state, with its shardings."""
        return ckpt_lib.abstract_target(self.saved(), saved_state(self.state_shardings))


def build_training(config, mesh, source_path: str, tokenizer) -> Training:
    """The model (loaded onto `mesh`), its optimizer and train state, and the compiled steps."""
    task = tasks.get(config.task)
    model = load_model(config, task, source_path, mesh, tokenizer.pad_token_id)
    new_vocab = check_vocab(config, tokenizer, model.config.vocab_size, source_path)
    parts = training_parts(model, config, task, mesh=mesh, new_vocab=new_vocab)
    compiled, state_shardings = step.compile_train_step(parts.train_step, parts.state, parts.optimizer,
                                                        parts.model_def, mesh)
    return Training(**{**vars(parts), "state": jax.device_put(parts.state, state_shardings)},
                    state_shardings=state_shardings, compiled_step=compiled,
                    eval_step=task.eval_step(parts.model_def, mesh, config))


def check_vocab(config, tokenizer, vocab_size: int, source_path: str) -> vocab.NewVocab | None:
    """Before anything compiles: how the vocabulary grows for the run's tokenizer (model.add_tokens),
    or None. A tokenizer with more tokens than the model has embedding rows, and no model.add_tokens,
    is refused (it would index past the embedding: NaN loss from the first step that meets such a token)."""
    return vocab.plan(config, tokenizer, vocab_size, source_path)


def load_tokenizer(config, source_path: str):
    """The run's tokenizer: the base's, with model.add_tokens / add_special_tokens and data.chat_template."""
    return vocab.load_tokenizer(config, source_path)


def planned_vocab(config, hf_config: dict) -> vocab.NewVocab | None:
    """check_vocab from config.json alone (jaxft plan): exact with the base's tokenizer where
    model.path is a local folder holding one; else each listed token counts as new."""
    if not vocab.tokens_added(config):
        return None
    size = int(hf_config["vocab_size"])
    path = config.model.path
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return check_vocab(config, load_tokenizer(config, path), size, path)
    ordinary, special, _ = vocab.token_settings(config)

    class Counted:  # a tokenizer that fills the vocabulary, then gains the listed tokens
        def __len__(self):
            return size + len(ordinary) + len(special)

        def convert_tokens_to_ids(self, tokens):
            return [size + i for i in range(len(tokens))]

    return check_vocab(config, Counted(), size, path)


def saved_state(state) -> dict:
    """What a checkpoint holds: everything but the frozen base, which is reloaded from its folder."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def run_meta(config, source, trainable) -> dict:
    """The metadata every checkpoint of a run carries (jaxft.checkpoint)."""
    import jaxft

    return {"config": config_lib.to_plain(config), "jaxft_version": jaxft.__version__,
            "base": {"path": source.path, "repo_id": source.repo_id, "revision": source.revision,
                     "fingerprint": ckpt_lib.base_fingerprint(source.path)},
            "trainable": sorted(trainable)}


def resume(checkpointer: ckpt_lib.Checkpointer, config, meta: dict, target) -> tuple[int, dict | None, dict | None]:
    """Where a run starts, decided in this one place:
    1. a checkpoint in this run's workdir (the run was interrupted: continue it);
    2. else `checkpoint.resume_from`, another run's workdir (warm start from its newest checkpoint);
    3. else the base model, step 0.
    A checkpoint made with a different model, data, sequence length or batch size (or a change in
    the task's own resume keys) is refused, listing what changed, unless `checkpoint.allow_changes`.
    """
    source = checkpointer
    if not checkpointer.steps():
        if not config.checkpoint.resume_from:
            return 0, None, None
        source = ckpt_lib.Checkpointer(os.path.join(config.checkpoint.resume_from, "checkpoints"), read_only=True)
    step_index, restored, data_state, saved_meta = source.restore(target)
    keys = ckpt_lib.RESUME_SENSITIVE_KEYS + tasks.get(config.task).resume_keys
    changes = ckpt_lib.config_changes(saved_meta["config"], meta["config"], keys)
    if not ckpt_lib.same_base(saved_meta["base"]["fingerprint"], meta["base"]["path"]):
        changes.append(f"base weights fingerprint: {saved_meta['base']['fingerprint']} → {meta['base']['fingerprint']}")
    if changes and not config.checkpoint.allow_changes:
        raise ResumeMismatchError(f"checkpoint {source.directory}/{step_index} was made by a different run:\n  "
                                  + "\n  ".join(changes) + "\nset checkpoint.allow_changes=True to resume anyway, "
                                  "or use a new workdir")
    if changes:
        log.warning("resuming despite changes (checkpoint.allow_changes): %s", "; ".join(changes))
        data_state = None  # the data changed: its saved position means nothing now
    log.info("resuming from %s at step %d", source.directory, step_index)
    return step_index, restored, data_state


def flops_per_token(parts: TrainingParts, config) -> float:
    """Model FLOPs per trained token (jaxft.metrics.model_flops_per_token) of the run's model."""
    from jaxft.metrics import model_flops_per_token

    state = parts.state
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((state.params, state.frozen)))
    if config.model.quantize != "none":  # a quantized weight computes as its dense shape, not its stored parts
        for linear in quant.base_linears(parts.model_def.merge(state.params, state.frozen)).values():
            if quant.is_quantized(linear):
                stored = sum(int(np.prod(p.shape)) for p in linear.weight.parts().values())
                total += int(np.prod(linear.weight.shape)) - stored
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    norms = state.frozen.get("model.layers.input_layernorm.weight", state.params.get("model.layers.input_layernorm.weight"))
    num_layers, hidden = (norms.shape if norms is not None else (0, 0))
    spec = getattr(getattr(parts.model_def.merge(state.params, state.frozen), "model", None), "spec", None)
    if getattr(spec, "moe", None) is not None:  # MFU counts the parameters a token uses: top-k of the routed experts
        k, e = spec.moe.top_k, spec.moe.num_experts
        dense_extra = total - sum(int(np.prod(x.shape)) for x in jax.tree.leaves((state.params, state.frozen)))
        total = moe.param_counts({p: tuple(x.shape) for p, x in {**state.params, **state.frozen}.items()}, k, e)[1]
        total += dense_extra
        trainable = moe.param_counts({p: tuple(x.shape) for p, x in state.params.items()}, k, e)[1]
        num_layers, hidden = spec.num_layers, spec.hidden_size
    return model_flops_per_token(total, num_layers, hidden, config.data.seq_len, trainable)


def restore_training(workdir: str, step_index: int | None = None, mesh=None) -> tuple[Training, int]:
    """(the whole train state of a checkpoint, optimizer included, on `mesh` (default: one device),
    its step): what a run resumed on that mesh holds. For inference, `restore` reads less."""
    with _reading(workdir) as checkpointer:
        config, meta = _checked_meta(checkpointer, workdir, step_index)
        base = meta["base"]["path"]
        mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        training = build_training(config, mesh, base, load_tokenizer(config, base))
        found, restored, _, _ = checkpointer.restore(training.restore_target(), step_index)
    training.state = training.state.replace(**restored)
    return training, found


def saved_config(workdir: str, step_index: int | None = None):
    """The config a run's checkpoint was trained with (to build its mesh before restoring onto it)."""
    with _reading(workdir) as checkpointer:
        return _checked_meta(checkpointer, workdir, step_index)[0]


@contextlib.contextmanager
def _reading(workdir: str):
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        yield checkpointer
    finally:
        checkpointer.close()


def _checked_meta(checkpointer: ckpt_lib.Checkpointer, workdir: str, step_index: int | None) -> tuple[Any, dict]:
    """(config, meta) of checkpoint `step_index` (default: the newest), whose base must be unchanged."""
    steps = checkpointer.steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    if step_index is not None and step_index not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step_index} in {workdir}/checkpoints (steps: {steps})")
    meta = checkpointer.read_meta(step_index if step_index is not None else steps[-1])
    base = meta["base"]["path"]
    if not ckpt_lib.same_base(meta["base"]["fingerprint"], base):
        raise ResumeMismatchError(f"the base model at {base} changed since {workdir} was trained "
                                  "(its fingerprint differs): the checkpoint's adapters/updates no longer apply")
    return config_lib.from_plain(meta["config"]), meta


# ---- a run's checkpoint, for inference ------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    """A run's checkpoint restored for inference (export, eval, generate): the trainable params from
    the checkpoint, the frozen ones from the base; no optimizer state."""

    config: Any
    task: Task
    model_def: step.ModelDef
    params: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    step: int
    meta: dict

    def model(self):
        """The trained model (adapters attached, not merged)."""
        return self.model_def.merge(self.params, self.frozen)


def restore(workdir: str, step_index: int | None = None, mesh=None, config=None) -> Trained:
    """Checkpoint `step_index` (default: the newest) of the run in `workdir`, onto `mesh` (default:
    one device). The model is rebuilt from the checkpoint's own config, so it restores anywhere;
    params that the checkpoint holds are never read from the base (a full fine-tuning export holds
    the model once, not twice)."""
    with _reading(workdir) as checkpointer:
        saved_config, meta = _checked_meta(checkpointer, workdir, step_index)
        config, base = config or saved_config, meta["base"]["path"]
        task = tasks.get(config.task)
        mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        saved = set(meta["trainable"])
        tokenizer = load_tokenizer(config, base)
        model = load_model(config, task, base, mesh, tokenizer.pad_token_id, skip=saved)
        new_vocab = check_vocab(config, tokenizer, model.config.vocab_size, base)
        model, trainable = prepare_model(model, config, task, training=False, new_vocab=new_vocab)
        model_def, params, frozen = step.split_model(model, trainable)
        if set(params) != saved:
            raise ResumeMismatchError(f"{workdir}: the checkpoint's trainable params differ from what its config "
                                      f"builds: only in the checkpoint {sorted(saved - set(params))[:5]}, "
                                      f"only in the model {sorted(set(params) - saved)[:5]}")
        shardings = sharding.param_shardings(model_def.axes, {p: tuple(x.shape) for p, x in params.items()}, mesh)
        target = {p: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=shardings[p]) for p, x in params.items()}
        found, params = checkpointer.restore_params(target, step_index)
    return Trained(config, task, model_def, params, frozen, found, meta)
