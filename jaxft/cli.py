"""The `jaxft` command.

    jaxft train --config configs/demo.py [--config.KEY=VALUE ...]
    jaxft export --workdir DIR --out OUT --format hf|peft [--step N] [--dtype bfloat16]
    jaxft eval --config configs/demo.py --workdir DIR     # or --model PATH; the task's eval + exact match
    jaxft demo                                  # the embedded default: fine-tune the bundled tiny model
    jaxft info --model PATH_OR_HUB_ID           # what a checkpoint is, as jaxft reads it
    jaxft generate --model PATH --prompt "..."  # greedy continuation
    jaxft plan --config configs/llama3_8b_lora.py:h100 --device v5e   # will it fit? from shapes alone
    jaxft make-student --model PATH --layers 2 --out OUT   # the first layers of a model (task=distill)
    jaxft sweep --config configs/demo.py --space 'train.learning_rate=loguniform(1e-5,1e-2)' --trials 8 --workdir S
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _load(model: str, dtype: str):
    import jaxft

    start = time.perf_counter()
    loaded = jaxft.from_pretrained(model, dtype=dtype)
    return loaded, time.perf_counter() - start


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def cmd_info(args) -> int:
    import jax

    model, seconds = _load(args.model, args.dtype)
    config = model.config
    params = sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    print(f"model      {args.model}  ({model.source.repo_id or model.source.path}"
          f"{'@' + model.source.revision if model.source.revision else ''})")
    print(f"family     {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"heads {config.num_attention_heads}/{config.num_key_value_heads} kv, head_dim {config.head_dim}, "
          f"vocab {config.vocab_size}")
    print(f"rope       {config.rope.rope_type} theta={config.rope.theta:g} {dict(config.rope.params) or ''}")
    windows = sorted({w for w in config.sliding_windows if w})
    print(f"attention  {'sliding windows ' + str(windows) if windows else 'global'}; tied embeddings: "
          f"{config.tie_word_embeddings}")
    print(f"params     {params:,} ({args.dtype}), loaded in {seconds:.2f}s on {jax.devices()[0].device_kind}")
    return 0


def cmd_generate(args) -> int:
    from jaxft.generate import chat_prompt, generate, prompt_ids

    model, _ = _load(args.model, args.dtype)
    tokenizer = _tokenizer(model.source.path)
    prompts = args.prompt
    if args.chat:
        ids = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    outputs = generate(model, ids, args.max_new_tokens, eos_id=eos, pad_id=tokenizer.pad_token_id or 0,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(prompts, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        print(text if args.chat else prompt + text)
    return 0


def cmd_demo(args, overrides: list[str]) -> int:
    """The embedded default end to end: LoRA fine-tune of the bundled model, report, HF export, reload."""
    import jaxft
    from jaxft import config as config_lib
    from jaxft import evaluate, export
    from jaxft.demo.config import get_config
    from jaxft.report import read_metrics
    from jaxft.train import train

    if args.variant == "distill":
        return _demo_distill(args, overrides)
    config = get_config(args.variant)
    config.workdir = args.workdir
    for item in overrides:
        config_lib.apply_override(config, item)
    print(f"Fine-tuning the bundled demo model ({config.model.path}) with LoRA r{config.lora.rank} "
          f"for {config.train.steps} steps → {config.workdir}")
    summary = train(config)
    train_rows, _ = read_metrics(summary["workdir"])
    if train_rows:
        print(f"train loss {train_rows[0]['loss']:.3f} (step {train_rows[0]['step']}) → "
              f"{train_rows[-1]['loss']:.4f} (step {train_rows[-1]['step']}) in {summary['seconds']:.1f}s")
    task = summary.get("task", {})
    for when in ("before", "after"):
        if when in task:
            print(f"exact match on {config.eval.task_file} {when} training: {task[when]['exact_match']:.0%}")
    print(f"report: {summary['workdir']}/report.html")
    if summary["stopped_early"]:
        print("stopped early; run `jaxft demo` again to continue")
        return 0

    # The merged export is an ordinary HF folder: reload it (transformers loads it the same way).
    out = export.export(summary["workdir"], f"{summary['workdir']}/hf", format="hf")
    reloaded = jaxft.from_pretrained(out, dtype="float32")
    rows = evaluate.read_task(config.eval.task_file)
    check = evaluate.task_accuracy(reloaded, _tokenizer(out), rows, config.eval.max_new_tokens, samples=3)
    print(f"merged HF export: {out} (reloaded: exact match {check['exact_match']:.0%})")
    for sample in check["samples"]:
        print(f"  {sample['prompt']!r} → {sample['output']!r} (expected {sample['answer']!r})")
    print("Next: jaxft generate --model " + out + " --prompt 'Q: ...?\\nA:'  |  "
          "jaxft export --workdir " + summary["workdir"] + " --out adapter --format peft")
    return 0


def _demo_distill(args, overrides: list[str]) -> int:
    """jaxft demo --variant distill: the teacher and the student made if absent, then the distillation."""
    from jaxft import config as config_lib
    from jaxft import export
    from jaxft.demo import distill
    from jaxft.train import train

    workdir = args.workdir if args.workdir != "workdir/demo" else distill.WORKDIR
    where = distill.prepare(workdir)
    config = distill.get_config("", workdir)
    for item in overrides:
        config_lib.apply_override(config, item)
    print(f"Distilling {where['teacher']} (4 layers) into {where['student']} (2 layers) for {config.train.steps} steps")
    summary = train(config)
    before, after = summary.get("eval_before", {}), summary.get("eval", {})
    if before and after:
        print(f"student's KL to the teacher on held-out sentences {before['distill_loss']:.3f} → "
              f"{after['distill_loss']:.3f} ({1 - after['distill_loss'] / before['distill_loss']:.0%} lower)")
    task = summary.get("task", {})
    if "before" in task and "after" in task:
        print(f"student's exact match on the facts {task['before']['exact_match']:.0%} → {task['after']['exact_match']:.0%}")
    if not summary["stopped_early"]:
        out = export.export(summary["workdir"], f"{summary['workdir']}/hf", format="hf")
        print(f"the student, merged: {out}")
    print(f"report: {summary['workdir']}/report.html")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from jaxft import config as config_lib
    from jaxft.plan import DoesNotFitError
    from jaxft.train import train

    config = config_lib.load(args.config, overrides)
    try:
        summary = train(config)
    except DoesNotFitError as e:  # the preflight's table and advice, not a traceback
        print(e, file=sys.stderr)
        return 2
    print(f"trained to step {summary['step']} in {summary['workdir']}"
          + (f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else "")
          + (" (stopped early on a signal; run again to continue)" if summary["stopped_early"] else ""))
    return 0


def cmd_eval(args, overrides: list[str]) -> int:
    """The task's eval on the config's validation data (causal_lm: eval loss/perplexity;
    classification: eval loss, accuracy, macro-F1), and exact match of generated answers if a task
    file is given (eval.task_file or --task-file)."""
    import json

    import jax

    from jaxft import config as config_lib
    from jaxft import evaluate, sharding, step, tasks
    from jaxft import run as run_lib

    if args.lm_eval:
        return _lm_eval(args)
    config = config_lib.load(args.config, overrides) if args.config else config_lib.default_config()
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    if args.workdir:
        trained = run_lib.restore(args.workdir, args.step, mesh=mesh)
        model_def, params, frozen = trained.model_def, trained.params, trained.frozen
        model_path, what = trained.meta["base"]["path"], f"{args.workdir} step {trained.step}"
    else:
        model_path = args.model or config.model.path
        model_def, params, frozen = step.split_model(_load(model_path, args.dtype)[0])
        what = model_path
    result = {"evaluated": what}
    # A run's tokenizer has its model.add_tokens and data.chat_template.
    tokenizer = run_lib.load_tokenizer(trained.config, model_path) if args.workdir else _tokenizer(model_path)
    task = tasks.get(config.task)
    task_file = args.task_file or (config.eval.task_file if args.config else None)
    if args.config:  # its section, and whether generation applies to it (a classifier refuses a task file)
        task.validate(config_lib.with_values(config, {"eval.task_file": task_file}))
    if args.config and (config.data.train or config.data.validation):
        with sharding.activate(mesh):
            scores = task.evaluate(task.eval_step(model_def, mesh, config), params, frozen,
                                   task.data(config, tokenizer), mesh)
        result.update(scores or {})
    if task_file:
        accuracy = evaluate.task_accuracy(model_def.merge(params, frozen), tokenizer, evaluate.read_task(task_file),
                                          config.eval.max_new_tokens)
        result.update(exact_match=accuracy["exact_match"], contains=accuracy["contains"], samples=accuracy["samples"])
    print(json.dumps(result, indent=2))
    return 0


def cmd_plan(args, overrides: list[str]) -> int:
    """Per-device memory from shapes alone; exit status 1 when the run does not fit (scripts can check)."""
    from jaxft import config as config_lib
    from jaxft import plan

    config = config_lib.load(args.config, overrides)
    result = plan.plan(config, device=args.device, memory_bytes=int(args.memory_gb * plan.GIB) if args.memory_gb else None,
                       num_devices=args.devices, compile=args.compile, name=args.config)
    print(result.table())
    return 1 if result.fits is False else 0


def _lm_eval(args) -> int:
    """lm-evaluation-harness tasks on a run's checkpoint (adapters unmerged, on the run's mesh shape)
    or an HF folder (on all devices, data-parallel); results in WORKDIR/lm_eval/ (or --out)."""
    import json

    try:
        from jaxft import harness
    except ImportError as e:
        raise ImportError(f"jaxft eval --lm-eval needs lm-evaluation-harness: pip install 'jaxft[eval]' ({e})") from None
    from jaxft import report, sharding
    from jaxft import run as run_lib
    from jaxft.hf import read_config

    if args.workdir:
        config = run_lib.saved_config(args.workdir, args.step)
        mesh = sharding.make_mesh(dict(config.mesh.shape))
        trained = run_lib.restore(args.workdir, args.step, mesh=mesh)
        if trained.task.name in ("classification", "reward"):
            raise ValueError(f"{args.workdir} trained task={trained.task.name}: lm-eval needs a causal LM")
        model, model_path = trained.model(), trained.meta["base"]["path"]
        out = args.out or os.path.join(args.workdir, "lm_eval")
    else:
        if not args.model:
            raise ValueError("jaxft eval --lm-eval needs --workdir or --model")
        mesh = sharding.make_mesh({"data": -1})
        import jaxft

        model_path = args.model
        model = jaxft.from_pretrained(model_path, dtype=args.dtype, mesh=mesh)
        model_path = model.source.path  # a hub id's local snapshot
        out = args.out or os.path.join("lm_eval", os.path.basename(os.path.normpath(args.model)))
    tokenizer = run_lib.load_tokenizer(config, model_path) if args.workdir else _tokenizer(model_path)
    lm = harness.JaxftLM(model, tokenizer, mesh, batch_size=args.batch_size, max_length=args.max_length,
                         hf_config=read_config(model_path))
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    results = harness.evaluate(lm, tasks, include=args.lm_eval_include, limit=args.limit,
                               num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template, out_dir=out)
    table = harness.summary_table(results)
    for row in table:
        stderr = "" if row["stderr"] is None else f" ± {row['stderr']:.4f}"
        print(f"{row['task']:<24} {row['metric']:<16} {row['filter']:<12} {row['value']:.4f}{stderr}")
    print(f"results: {out}/results.json")
    if args.workdir and os.path.exists(os.path.join(args.workdir, "report.json")):  # the run's report gains the table
        summary = json.load(open(os.path.join(args.workdir, "report.json")))
        report.write_report(args.workdir, {**summary, "lm_eval": table})
    return 0


def cmd_export(args) -> int:
    from jaxft import export

    out = export.export(args.workdir, args.out, format=args.format, step=args.step, dtype=args.dtype,
                        overwrite=args.overwrite)
    print(f"wrote {args.format} export to {out}")
    return 0


def cmd_sweep(args, overrides: list[str]) -> int:
    """Optuna over ordinary runs: see jaxft/sweep.py."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ImportError("jaxft sweep needs Optuna: pip install 'jaxft[sweep]'") from None
    from jaxft import sweep

    if args.show:
        return sweep.show(args.workdir)
    if not args.config or not args.space:
        raise ValueError("jaxft sweep needs --config and at least one --space (or --show)")
    definition = sweep.Sweep(workdir=args.workdir, config_spec=args.config, overrides=tuple(overrides),
                             space=tuple(args.space), metric=args.metric, direction=args.direction, pruner=args.pruner,
                             seed=args.seed)
    summary = sweep.run(definition, args.trials, parallel=args.parallel)
    best = summary["best"]
    if best:
        print(f"best: trial {best['trial']}, {best['metric']} {best['value']:.4f} with {best['params']}")
        print(f"  {best['command']}")
    print(f"report: {args.workdir}/report.html")
    return 0


def cmd_make_student(args) -> int:
    from jaxft.student import first_layers

    out = first_layers(args.model, args.layers, args.out)
    print(f"wrote the first {args.layers} layers of {args.model} to {out}")
    return 0


def _setup_logging(quiet: bool) -> None:
    """jaxft's INFO lines (resuming from step N, skipped rows with file:line) show unless --quiet;
    other libraries stay at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("jaxft").setLevel(logging.WARNING if quiet else logging.INFO)


def _report_error(command: str, error: BaseException) -> None:
    """`jaxft <command>: error: <message>` on one line. Our errors name what and where, so the message
    is the whole story; any other exception (a bug, or a library's own complaint) keeps its type name
    and says how to see the traceback."""
    message = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    ours = type(error).__module__.startswith("jaxft") or type(error) in _PLAIN_ERRORS
    if not ours or not message:
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    print(f"jaxft {command}: error: {message}", file=sys.stderr)


# Built-in exceptions that jaxft raises with its own what-and-where message. Exactly these types:
# a UnicodeDecodeError or JSONDecodeError (ValueError subclasses) is a library's, and keeps its name.
_PLAIN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                 PermissionError, RuntimeError, ImportError, ModuleNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Runs a command; a failure is one line on stderr and exit status 1 (--debug or JAXFT_DEBUG=1:
    the traceback instead)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the traceback (also JAXFT_DEBUG=1)")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="hide jaxft's INFO messages (warnings and errors still show)")
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune open LLMs in JAX.", parents=[common])
    commands = _Subcommands(parser.add_subparsers(dest="command", required=True), common)

    train = commands.add_parser("train", help="fine-tune: --config configs/NAME.py[:ARG] [--config.KEY=VALUE ...]")
    train.add_argument("--config", required=True, help="a config file (get_config(arg)), optionally :ARG")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="eval loss and task exact match of a run's checkpoint or an HF folder")
    evaluate.add_argument("--config", help="config whose data (validation) and eval.* settings to use")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--workdir", help="a run's workdir: evaluate its checkpoint")
    source.add_argument("--model", help="an HF folder or hub id (default: the config's model.path)")
    evaluate.add_argument("--step", type=int, default=None)
    evaluate.add_argument("--task-file", help="JSONL of {prompt, answer} for exact match")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    evaluate.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated "
                                                             "(pip install 'jaxft[eval]')")
    evaluate.add_argument("--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    evaluate.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    evaluate.add_argument("--batch-size", type=int, default=16, help="lm-eval: rows per scoring/generation batch")
    evaluate.add_argument("--max-length", type=int, default=None, help="lm-eval: context window (default: the model's)")
    evaluate.add_argument("--apply-chat-template", action="store_true", help="lm-eval: render with the chat template")
    evaluate.add_argument("--out", help="lm-eval: results folder (default WORKDIR/lm_eval)")
    evaluate.set_defaults(run=cmd_eval)

    export = commands.add_parser("export", help="write a run's checkpoint as an HF folder or a PEFT adapter")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--format", choices=["hf", "peft"], default="hf")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights' dtype in the export (default: the model's)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out that is not an earlier jaxft export")
    export.set_defaults(run=cmd_export)

    demo = commands.add_parser("demo", help="the embedded default: LoRA fine-tune of the bundled tiny model, "
                                            "report, HF export (no download, ~30 s on CPU)")
    demo.add_argument("--workdir", default="workdir/demo", help="where the run, its report and export go")
    demo.add_argument("--variant", default="", choices=["", "smoke", "distill"],
                      help="smoke: 4 steps through every part; distill: a 2-layer student learns a 4-layer teacher")
    demo.set_defaults(run=cmd_demo)

    plan = commands.add_parser("plan", help="per-device memory of a config's train step, from shapes alone; "
                                            "whether it fits and, if not, the nearest settings that do")
    plan.add_argument("--config", required=True, help="a config file (get_config(arg)), optionally :ARG")
    plan.add_argument("--device", help="compare with this device's memory: v5e, v4, v5p, v6e, h100, h200, ... "
                                       "(default: what the runtime reports; unknown on CPU)")
    plan.add_argument("--memory-gb", type=float, default=None, help="compare with this many GiB per device instead")
    plan.add_argument("--devices", type=int, default=None, help="devices for a -1 in mesh.shape (default: those here)")
    plan.add_argument("--compile", action="store_true", help="also compile the step and show XLA's count (small models)")
    plan.set_defaults(run=cmd_plan)

    sweep = commands.add_parser("sweep", help="hyperparameter search (Optuna): trials are ordinary runs in SWEEP/trial-NNN")
    sweep.add_argument("--config", help="a config file (get_config(arg)), optionally :ARG")
    sweep.add_argument("--space", action="append", default=[], help="KEY=DIST(ARGS): uniform, loguniform, int, choice, fixed")
    sweep.add_argument("--trials", type=int, default=10, help="finished trials to reach (the study continues)")
    sweep.add_argument("--metric", default="eval_loss", help="an eval row metric")
    sweep.add_argument("--direction", default="minimize", choices=["minimize", "maximize"])
    sweep.add_argument("--parallel", type=int, default=1, help="trials at once, each on its share of the devices")
    sweep.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    sweep.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    sweep.add_argument("--workdir", required=True)
    sweep.add_argument("--show", action="store_true", help="print the trials table of SWEEP and stop")
    sweep.set_defaults(run=cmd_sweep)

    student = commands.add_parser("make-student", help="a smaller student for task=distill: the first N decoder "
                                                       "layers of an HF folder, with its tokenizer")
    student.add_argument("--model", required=True, help="an HF folder (safetensors)")
    student.add_argument("--layers", type=int, required=True, help="decoder layers to keep")
    student.add_argument("--out", required=True)
    student.set_defaults(run=cmd_make_student)

    info = commands.add_parser("info", help="describe a checkpoint (local folder or hub id)")
    info.add_argument("--model", required=True)
    info.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    info.set_defaults(run=cmd_info)

    generate = commands.add_parser("generate", help="greedy continuation of a prompt")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    generate.set_defaults(run=cmd_generate)

    args, extra = parser.parse_known_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("JAXFT_DEBUG", "") not in ("", "0")
    _setup_logging(getattr(args, "quiet", False))
    takes_overrides = args.command in ("train", "eval", "demo", "plan", "sweep")
    unknown = [a for a in extra if not (takes_overrides and a.startswith("--config."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + (" (overrides look like --config.KEY=VALUE)" if takes_overrides else ""))
    try:
        return args.run(args, extra) if takes_overrides else args.run(args)
    except KeyboardInterrupt:
        print(f"jaxft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place errors become a line for the user
        if debug:
            raise
        _report_error(args.command, error)
        return 1


class _Subcommands:
    """add_subparsers' action, giving every command the common flags (--debug, --quiet)."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)


if __name__ == "__main__":
    sys.exit(main())
