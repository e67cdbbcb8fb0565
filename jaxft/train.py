"""The training loop, top to bottom: setup → restore → loop (log, eval, save) → finish.

    jaxft train --config configs/demo.py --config.train.steps=50
    python -c "import jaxft.train, jaxft.config as c; jaxft.train.train(c.load('configs/demo.py'))"

The objective is config.task's (jaxft.tasks): its data, loss, eval and metrics; this loop never
names one. Writes into `config.workdir`: metrics.jsonl (one JSON row per logged step: step, loss,
learning_rate, tokens_per_second, grad_norm and the objective's own metrics; eval rows carry
eval_loss and the task's eval metrics), TensorBoard events in tensorboard/, checkpoints/, and at
the end loss_curve.png, report.html and report.json (with the generation exact match before/after
training when eval.task_file is set). SIGTERM or SIGINT finishes the current step, saves, waits
for the write, and returns.
"""

from __future__ import annotations

import contextlib
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
from jaxft import distributed, evaluate, hf, plan, sharding, tasks
from jaxft import run as run_lib
from jaxft.metrics import MetricsWriter
from jaxft.pretrained import read_model_config
from jaxft.report import write_report

log = logging.getLogger("jaxft.train")


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient and train.on_nonfinite is "abort"."""


def train(config) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config`; returns a summary dict."""
    # ---- setup ----------------------------------------------------------------------------------
    config_lib.validate(config)  # the shared keys, then the task's own section
    distributed.initialize(config.mesh.coordinator, config.mesh.num_processes, config.mesh.process_id)
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    sharding.check_batch(config.train.batch_size, config.train.grad_accum, mesh)
    if config.train.preflight:  # shapes only: a run that cannot fit stops here, with advice, not at an OOM
        plan.preflight(config, mesh)
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    source = hf.resolve(config.model.path, config.model.revision)
    hf_config = read_model_config(source.path)[0]  # config.json checked in jaxft's terms before transformers reads it
    tokenizer = run_lib.load_tokenizer(config, source.path)  # with model.add_tokens and data.chat_template
    run_lib.check_vocab(config, tokenizer, hf_config["vocab_size"], source.path)  # before the data is read
    task = tasks.get(config.task)
    data = task.data(config, tokenizer)  # read and checked before the model loads or anything compiles
    training = run_lib.build_training(config, mesh, source.path, tokenizer)
    task.before_training(training, data, mesh, workdir)  # at the initial state (e.g. DPO's precomputed reference)
    state = training.state
    meta = run_lib.run_meta(config, source, state.params)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                         keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)

    # ---- restore: the one resume policy ---------------------------------------------------------
    start_step, restored, data_state = run_lib.resume(checkpointer, config, meta, training.restore_target())
    if restored is not None:
        state = state.replace(**restored)
    batches = data.train_iterator()
    if data_state:
        batches.set_state(data_state)
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), after_step=start_step)  # rows logged past the last save
    writer = MetricsWriter(workdir, config.train.steps, start_step, use_wandb=config.train.wandb,
                           flops_per_token=run_lib.flops_per_token(training, config), config=meta["config"])
    questions = evaluate.read_task(config.eval.task_file) if config.eval.task_file else None
    report: dict[str, Any] = {"model": source.repo_id or source.path, "resumed_from": start_step, "devices": mesh.size}
    if getattr(data, "warnings", None) is not None:  # counts of trained unknown tokens, boundaries inside a token
        report["data_warnings"] = data.warnings
    if questions and start_step == 0:
        report["task"] = {"before": _exact_match(training, state, tokenizer, questions, config)}
        writer.eval(0, {"task_exact_match": report["task"]["before"]["exact_match"]})
    if config.eval.at_start and start_step == 0:
        with sharding.activate(mesh):
            scores = task.evaluate(training.eval_step, state.params, state.frozen, data, mesh)
            report["examples"] = {"before": task.examples(training.eval_step, state.params, state.frozen, data, mesh,
                                                          config.eval.samples)}
        if scores is not None:
            report["eval_before"] = scores
            writer.eval(0, scores)

    # ---- loop -----------------------------------------------------------------------------------
    stop = _StopRequest()
    stopper = evaluate.EarlyStopping(config.eval.patience)
    last_eval = None
    step_index = start_step
    started = time.perf_counter()
    with stop.installed(), sharding.activate(mesh):
        while step_index < config.train.steps:
            step_started = time.perf_counter()
            local = task.step_batch(training, data, state, next(batches), step_index + 1)
            state, metrics = training.compiled_step(state, sharding.global_batch(local, mesh))
            step_index += 1
            if config.train.on_nonfinite == "abort" and not bool(metrics["finite"]):
                writer.close()
                raise NonFiniteLossError(f"step {step_index}: loss {float(metrics['loss'])} / grad_norm "
                                         f"{float(metrics['grad_norm'])} is not finite; nothing was saved for this step "
                                         "(set train.on_nonfinite=skip to drop such updates instead)")
            at_end = step_index == config.train.steps
            if step_index % config.train.log_every == 0 or at_end:
                tokens = task.num_tokens(local) * jax.process_count()
                row = {k: (bool(v) if k == "finite" else float(v)) for k, v in jax.device_get(metrics).items()}
                writer.train(step_index, {**row, "tokens_per_second": tokens / (time.perf_counter() - step_started)})
            eval_loss, early_stop = None, False
            if (config.train.eval_every and step_index % config.train.eval_every == 0) or at_end:
                scores = task.evaluate(training.eval_step, state.params, state.frozen, data, mesh)
                if scores is not None:
                    last_eval = scores["eval_loss"]
                    eval_loss = _watched(scores, config.eval.early_stopping_metric)
                    report["eval"] = scores
                    writer.eval(step_index, scores)
                    early_stop = stopper.update(eval_loss) and not at_end
            stopping = stop.requested() or early_stop
            if step_index % config.checkpoint.every == 0 or at_end or stopping:
                checkpointer.save(step_index, training.saved(state), batches.get_state(), {**meta, "step": step_index},
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
    if questions and finished:
        report.setdefault("task", {})["after"] = _exact_match(training, state, tokenizer, questions, config)
    if finished and config.eval.samples:
        with sharding.activate(mesh):
            after = task.examples(training.eval_step, state.params, state.frozen, data, mesh, config.eval.samples)
        if after:
            report.setdefault("examples", {})["after"] = after
    report.update({"step": step_index, "stopped_early": step_index < config.train.steps, "eval_loss": last_eval,
                   "workdir": workdir, "seconds": time.perf_counter() - started, "data": batches.stats()})
    if jax.process_index() == 0:
        write_report(workdir, report)
    return report


def _watched(scores: dict, metric: str) -> float:
    """The eval metric that early stopping and the best checkpoint follow (eval.early_stopping_metric)."""
    if metric not in scores:
        raise KeyError(f"eval.early_stopping_metric {metric!r} is not one of this run's eval metrics {sorted(scores)}")
    return scores[metric]


def _exact_match(training, state, tokenizer, questions, config) -> dict:
    """eval.task_file: greedy answers to its prompts, scored by exact match (tasks that do not
    generate refuse eval.task_file in their validate)."""
    model = training.model_def.merge(state.params, state.frozen)
    return evaluate.task_accuracy(model, tokenizer, questions, config.eval.max_new_tokens, samples=config.eval.samples)


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

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))
