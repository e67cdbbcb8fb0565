"""The training loop, top to bottom: setup → restore → loop (log, eval, save) → finish.

    jaxft train --config configs/demo.py --config.train.steps=50
    python -c "import jaxft.train, jaxft.config as c; cfg = c.default_config(); ...; jaxft.train.train(cfg)"

Writes into `config.workdir`: metrics.jsonl (one JSON row per logged step: step, loss,
learning_rate, tokens_per_second, grad_norm; eval rows carry eval_loss), TensorBoard events in
tensorboard/, checkpoints/, and at the end loss_curve.png, report.html and report.json (with the
task eval before/after training when eval.task_file is set).
`task = "classification"` trains a sequence classifier through this same loop: the data come from
jaxft.tasks.classification_run.TrainData instead of DataPipeline, and eval rows carry accuracy and
f1 beside eval_loss (jaxft train --config configs/classify_demo.py).
SIGTERM or SIGINT finishes the current step, saves, waits for the write, and returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from jaxft import checkpoint as ckpt_lib
from jaxft import config as config_lib
from jaxft import distributed, evaluate, hf, optim, sharding, step
from jaxft.metrics import MetricsWriter, model_flops_per_token
from jaxft.models import attention as attn_lib
from jaxft.pretrained import from_pretrained
from jaxft.report import write_report

log = logging.getLogger("jaxft.train")


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient and train.on_nonfinite is "abort"."""


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was made with a different model, data, or batch setup."""


def train(config) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config`; returns a summary dict."""
    # ---- setup ----------------------------------------------------------------------------------
    config_lib.validate(config)
    distributed.initialize(config.mesh.coordinator, config.mesh.num_processes, config.mesh.process_id)
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    sharding.check_batch(config.train.batch_size, config.train.grad_accum, mesh)
    if config.train.preflight:  # shapes only: a run that cannot fit stops here, with advice, not at an OOM
        from jaxft import plan

        plan.preflight(config, mesh)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    source = hf.resolve(config.model.path, config.model.revision)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    pipeline = _data(config, tokenizer)  # read (and checked) before anything compiles

    run = build(config, mesh, source.path)
    state, compiled_step, eval_step = run.state, run.compiled_step, run.eval_step

    plain_config = config_lib.to_plain(config)
    meta = {"config": plain_config, "jaxft_version": _version(),
            "base": {"path": source.path, "repo_id": source.repo_id, "revision": source.revision,
                     "fingerprint": ckpt_lib.base_fingerprint(source.path)},
            "trainable": sorted(state.params)}
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                         keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)

    # ---- restore: the one resume policy ---------------------------------------------------------
    saved_shardings = _saved(run.state_shardings)
    start_step, restored, data_state = resume(checkpointer, config, meta, ckpt_lib.abstract_target(_saved(state), saved_shardings))
    if restored is not None:
        state = state.replace(**restored)
    batches = pipeline.train_iterator()
    if data_state:
        batches.set_state(data_state)
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), after_step=start_step)  # rows logged past the last save
    writer = MetricsWriter(workdir, config.train.steps, start_step, flops_per_token=_flops_per_token(run, config),
                           use_wandb=config.train.wandb, config=plain_config)
    task = evaluate.read_task(config.eval.task_file) if config.eval.task_file else None
    report: dict[str, Any] = {"model": source.repo_id or source.path, "resumed_from": start_step}
    if task and start_step == 0:
        report["task"] = {"before": _task_eval(run, state, tokenizer, task, config)}
        writer.eval(0, {"task_exact_match": report["task"]["before"]["exact_match"]})

    # ---- loop -----------------------------------------------------------------------------------
    stop = _StopRequest()
    stopper = evaluate.EarlyStopping(config.eval.patience)
    last_eval = None
    step_index = start_step
    started = time.perf_counter()
    with stop.installed(), sharding.activate(mesh):
        while step_index < config.train.steps:
            step_started = time.perf_counter()
            local = next(batches)
            state, metrics = compiled_step(state, sharding.global_batch(local, mesh))
            step_index += 1
            if config.train.on_nonfinite == "abort" and not bool(metrics["finite"]):
                writer.close()
                raise NonFiniteLossError(f"step {step_index}: loss {float(metrics['loss'])} / grad_norm "
                                         f"{float(metrics['grad_norm'])} is not finite; nothing was saved for this step "
                                         "(set train.on_nonfinite=skip to drop such updates instead)")
            if step_index % config.train.log_every == 0 or step_index == config.train.steps:
                tokens = int(np.sum(local["attention_mask"])) * jax.process_count()
                writer.train(step_index, {"loss": float(metrics["loss"]), "learning_rate": float(metrics["learning_rate"]),
                                          "grad_norm": float(metrics["grad_norm"]),
                                          "tokens_per_second": tokens / (time.perf_counter() - step_started),
                                          "finite": bool(metrics["finite"])})
            at_end = step_index == config.train.steps
            eval_loss, early_stop = None, False
            if (config.train.eval_every and step_index % config.train.eval_every == 0) or at_end:
                scores = _eval_scores(config, run, state, pipeline, mesh)
                if scores is not None:
                    eval_loss = last_eval = scores["eval_loss"]
                    report["eval"] = scores
                    writer.eval(step_index, scores)
                    early_stop = stopper.update(eval_loss) and not at_end
            stopping = stop.requested() or early_stop
            if step_index % config.checkpoint.every == 0 or at_end or stopping:
                checkpointer.save(step_index, _saved(state), batches.get_state(), {**meta, "step": step_index},
                                  eval_loss=eval_loss, force=True)
            if stopping:
                reason = f"no eval-loss improvement in {config.eval.patience} evaluations" if early_stop else "stop requested"
                log.warning("%s: saved step %d, stopping", reason, step_index)
                report["stopped_because"] = reason
                break

    # ---- finish ---------------------------------------------------------------------------------
    checkpointer.close()
    batches.close()
    writer.close()
    finished = step_index == config.train.steps or report.get("stopped_because", "").startswith("no eval")
    if task and finished:
        report.setdefault("task", {})["after"] = _task_eval(run, state, tokenizer, task, config)
    report.update({"step": step_index, "stopped_early": step_index < config.train.steps, "eval_loss": last_eval,
                   "workdir": workdir, "seconds": time.perf_counter() - started, "data": batches.stats()})
    if jax.process_index() == 0:
        write_report(workdir, report)
    return report


def _data(config, tokenizer):
    """The train/validation data of config.task: DataPipeline, or its classification counterpart."""
    if config.task == "classification":
        from jaxft.tasks.classification_run import TrainData

        return TrainData(config, tokenizer)
    from jaxft.data import DataPipeline

    return DataPipeline(config, tokenizer)


def _eval_scores(config, run, state, data, mesh) -> dict | None:
    """One validation pass: {"eval_loss", ...} (None without validation data)."""
    if config.task == "classification":
        return data.evaluate(run.eval_step, state.params, state.frozen, mesh)  # + accuracy, f1
    loss = evaluate.eval_loss(run.eval_step, state.params, state.frozen, data.validation_batches(), mesh)
    return None if loss is None else {"eval_loss": loss, "eval_perplexity": evaluate.perplexity(loss)}


def _task_eval(run, state, tokenizer, task, config) -> dict:
    model = run.model_def.merge(state.params, state.frozen)
    return evaluate.task_accuracy(model, tokenizer, task, config.eval.max_new_tokens, samples=config.eval.samples)


def _flops_per_token(run, config) -> float:
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((run.state.params, run.state.frozen)))
    if config.model.quantize != "none":  # a quantized weight computes as its dense shape, not its stored parts
        from jaxft.peft import quant

        model = run.model_def.merge(run.state.params, run.state.frozen)
        for linear in quant.base_linears(model).values():
            if quant.is_quantized(linear):
                stored = sum(int(np.prod(p.shape)) for p in linear.weight.parts().values())
                total += int(np.prod(linear.weight.shape)) - stored
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))
    layers = run.state.frozen.get("model.layers.input_layernorm.weight", run.state.params.get("model.layers.input_layernorm.weight"))
    num_layers, hidden = (layers.shape if layers is not None else (0, 0))
    return model_flops_per_token(total, num_layers, hidden, config.data.seq_len, trainable)


@dataclasses.dataclass
class Run:
    """What a config builds: the model split into static def + params, its optimizer and steps."""

    model_def: step.ModelDef
    optimizer: Any
    state: step.TrainState  # placed on the mesh
    state_shardings: Any
    compiled_step: Any
    eval_step: Any


def build(config, mesh, model_path: str) -> Run:
    """The model (with LoRA if configured), optimizer, train state and compiled steps for `mesh`."""
    model = from_pretrained(model_path, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype, mesh=mesh,
                            quantize=config.model.quantize, **_head(config, model_path))
    model_def, optimizer, train_step, state = _training_parts(model, config)
    compiled_step, state_shardings = step.compile_train_step(train_step, state, optimizer, model_def, mesh)
    if config.task == "classification":
        from jaxft.tasks.classification_run import make_eval_step

        eval_step = make_eval_step(model_def, mesh)  # pooled class logits, for accuracy/F1 as well as loss
    else:
        eval_step = jax.jit(step.make_eval_step(model_def))
    return Run(model_def=model_def, optimizer=optimizer, state=jax.device_put(state, state_shardings),
               state_shardings=state_shardings, compiled_step=compiled_step, eval_step=eval_step)


def _head(config, model_path: str) -> dict:
    """from_pretrained's classifier arguments for task=classification. The pad id is the tokenizer's:
    the head pools the last token that is not it, and TrainData pads with it."""
    if config.task != "classification":
        return {}
    from transformers import AutoTokenizer

    return {"labels": tuple(config.classification.labels),
            "pad_token_id": AutoTokenizer.from_pretrained(model_path).pad_token_id}


def abstract_state(config, hf_config: dict) -> tuple[step.ModelDef, step.TrainState]:
    """The train state a config would build, as shapes only (jax.eval_shape): nothing is allocated,
    nothing downloaded. For checking configs of big models, and planning their memory."""
    from flax import nnx

    from jaxft.pretrained import init_random

    holder = {}

    def make():
        head = {}
        if config.task == "classification":  # shapes only: any pad id will do
            head = {"labels": tuple(config.classification.labels), "pad_token_id": hf_config.get("pad_token_id") or 0}
        model = init_random(hf_config, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype, **head)
        if config.model.quantize != "none":
            from jaxft.peft import quant

            quant.quantize_model(model, config.model.quantize)
        holder["parts"] = _training_parts(model, config)
        return holder["parts"][3]

    state = jax.eval_shape(make)
    return holder["parts"][0], state


def _training_parts(model, config):
    # Before split_model: the implementation is static graph data that the ModelDef keeps.
    attn_lib.set_attention_implementation(model, config.model.attention)
    trainable = _trainable_filter(model, config)
    model_def, params, frozen = step.split_model(model, trainable, remat=config.train.remat)
    optim_cfg = optim.OptimConfig(
        name=config.train.optimizer, learning_rate=config.train.learning_rate, schedule=config.train.schedule,
        warmup_steps=config.train.warmup_steps, total_steps=config.train.steps,
        weight_decay=config.train.weight_decay, clip_norm=config.train.clip_norm or None)
    optimizer = optim.make_optimizer(optim_cfg, params, model_def.axes, config.train.freeze_first_layers)
    step_cfg = step.StepConfig(grad_accum=config.train.grad_accum, z_loss=config.train.z_loss,
                               remat=config.train.remat, skip_nonfinite=config.train.on_nonfinite == "skip",
                               loss_chunk=config.train.loss_chunk)
    train_step = step.make_train_step(model_def, optimizer, step_cfg, optim.make_schedule(optim_cfg))
    return model_def, optimizer, train_step, step.init_state(params, frozen, optimizer, seed=config.train.seed)


def restore_run(workdir: str, step_index: int | None = None, mesh=None, config=None) -> tuple[Run, int, dict]:
    """A run's checkpoint restored onto `mesh` (default: one device): (Run, step, meta).

    The state is rebuilt from the checkpoint's own config, so it can be restored anywhere.
    """
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    steps = checkpointer.steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    meta = checkpointer.read_meta(step_index if step_index is not None else steps[-1])
    config = config or config_lib.from_plain(meta["config"])
    if ckpt_lib.base_fingerprint(meta["base"]["path"]) != meta["base"]["fingerprint"]:
        raise ResumeMismatchError(f"the base model at {meta['base']['path']} changed since {workdir} was trained "
                                  "(its fingerprint differs): the checkpoint's adapters/updates no longer apply")
    mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    run = build(config, mesh, meta["base"]["path"])
    target = ckpt_lib.abstract_target(_saved(run.state), _saved(run.state_shardings))
    found, restored, _, meta = checkpointer.restore(target, step_index)
    run.state = run.state.replace(**restored)
    return run, found, meta


def _trainable_filter(model, config):
    classify = config.task == "classification"
    if config.lora.rank:
        from jaxft.peft import lora

        targets = config.lora.targets if isinstance(config.lora.targets, str) else tuple(config.lora.targets)
        if classify and targets == "all-linear":
            from jaxft.tasks.classification import lora_targets

            targets = lora_targets(model)  # every Linear but the new head, which trains whole
        lora.apply_lora(model, lora.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                                               dropout=config.lora.dropout, targets=targets,
                                               use_rslora=config.lora.use_rslora, use_dora=config.lora.use_dora),
                        seed=config.train.seed)
        trainable = lora.is_lora_param
    else:
        frozen = optim.frozen_by_pattern
        patterns = tuple(config.train.freeze)
        trainable = lambda path, variable: not frozen([path], patterns)  # noqa: E731
    if classify:  # the head starts random: it must train in LoRA runs (PEFT's modules_to_save) and in full FT
        from jaxft.tasks.classification import with_head

        return with_head(trainable)
    return trainable


def resume(checkpointer: ckpt_lib.Checkpointer, config, meta: dict, target) -> tuple[int, dict | None, dict | None]:
    """Where a run starts, decided in this one place:
    1. a checkpoint in this run's workdir (the run was interrupted: continue it);
    2. else `checkpoint.resume_from`, another run's workdir (warm start from its newest checkpoint);
    3. else the base model, step 0.
    A checkpoint made with a different model, data, sequence length or batch size is refused,
    listing what changed, unless `checkpoint.allow_changes`.
    """
    source = checkpointer
    if not checkpointer.steps():
        if not config.checkpoint.resume_from:
            return 0, None, None
        source = ckpt_lib.Checkpointer(os.path.join(config.checkpoint.resume_from, "checkpoints"), read_only=True)
    step_index, restored, data_state, saved_meta = source.restore(target)
    changes = ckpt_lib.config_changes(saved_meta["config"], meta["config"])
    if saved_meta["base"]["fingerprint"] != meta["base"]["fingerprint"]:
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


def _saved(state):
    """What a checkpoint holds: everything but the frozen base, which is reloaded from its folder."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def _truncate_metrics(path: str, after_step: int) -> None:
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
    with open(path, "w") as f:
        f.writelines(rows)


class _StopRequest:
    """SIGTERM/SIGINT → finish the step, save, exit. All processes stop at the same step."""

    def __init__(self):
        self._flag = False

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def handlers():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        return handlers()

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))


def _version() -> str:
    import jaxft

    return jaxft.__version__
