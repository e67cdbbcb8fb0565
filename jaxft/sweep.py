"""Hyperparameter sweeps with Optuna, each trial an ordinary jaxft run on its own share of the devices.

    jaxft sweep --config configs/demo.py --space 'train.learning_rate=loguniform(1e-5,1e-2)' \\
        --space 'lora.rank=choice(4,8,16)' --trials 12 --parallel 2 --workdir sweeps/demo
    jaxft sweep --workdir sweeps/demo --show          # the trials table

The study (TPE sampler; a median or Hyperband pruner fed by each trial's eval rows) lives in
SWEEP/study.db (SQLite), so the same command again continues it: finished trials are kept, and a
trial cut short (the sweep killed) runs again from its own checkpoint. Trial N is `jaxft train` in
SWEEP/trial-NNN/ (metrics, report, checkpoints, as any run) with the sampled --config overrides,
started as a child process that dies with the sweep. `--parallel K` runs K trials at once, each on
its own K-th of this host's devices (CUDA_VISIBLE_DEVICES on GPUs; the host-platform device count
on CPU); on TPU or several hosts, trials run one after another on the whole mesh. At the end:
SWEEP/report.html (trials table, optimization history and parameter importances as PNG) and
SWEEP/best.json (the best overrides and the command that re-runs them).

Distributions: uniform(a, b), loguniform(a, b), int(a, b), choice(v1, v2, ...), fixed(v). A space
key that is not a config key, or a distribution that does not parse, is an error before any trial.
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import html
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "fixed")
STUDY = "jaxft-sweep"


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    args: tuple

    def suggest(self, trial) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(self.key, *self.args)
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, *self.args, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.args)
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.args))
        return self.args[0]  # fixed


def parse_space(entry: str, config) -> Dimension:
    """'train.learning_rate=loguniform(1e-5,1e-2)' → Dimension; errors name the entry."""
    from jaxft import config as config_lib

    key, sep, text = entry.partition("=")
    key, text = key.strip().removeprefix("--").removeprefix("config."), text.strip()
    kind, _, rest = text.partition("(")
    if not sep or kind not in DISTRIBUTIONS or not rest.endswith(")"):
        raise ValueError(f"--space {entry!r} must look like KEY=DIST(ARGS) with DIST one of {', '.join(DISTRIBUTIONS)}")
    try:
        args = ast.literal_eval(f"({rest[:-1]},)")
    except (ValueError, SyntaxError):
        raise ValueError(f"--space {entry!r}: the arguments {rest[:-1]!r} are not Python literals") from None
    if config_lib.get(config, key, _Missing) is _Missing:
        raise KeyError(f"--space {entry!r}: {key!r} is not a config key")
    arity = {"uniform": 2, "loguniform": 2, "int": 2, "fixed": 1}.get(kind)
    if (arity and len(args) != arity) or (kind == "choice" and not args):
        raise ValueError(f"--space {entry!r}: {kind} takes {arity or 'at least one'} argument(s), got {len(args)}")
    if kind in ("uniform", "loguniform", "int") and not args[0] < args[1]:
        raise ValueError(f"--space {entry!r}: the low end {args[0]} must be below the high end {args[1]}")
    if kind == "loguniform" and args[0] <= 0:
        raise ValueError(f"--space {entry!r}: loguniform needs a positive low end, got {args[0]}")
    return Dimension(key, kind, args)


class _Missing:
    pass


def device_slots(parallel: int) -> tuple[list[dict[str, str]], str, int]:
    """(one environment update per slot, platform, devices per slot). The devices are counted in a
    child process, so that this one never takes an accelerator."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count(), "
                          "jax.process_count())"], capture_output=True, text=True, check=True)
    platform, count, processes = out.stdout.split()[-3:]
    count, processes = int(count), int(processes)
    if parallel == 1:
        return [{}], platform, count
    if platform == "tpu" or processes > 1:
        raise ValueError(f"--parallel {parallel}: on {platform} with {processes} process(es) trials run one after "
                         "another on the whole mesh (use --parallel 1)")
    if count % parallel:
        raise ValueError(f"--parallel {parallel} does not divide this host's {count} {platform} devices")
    share = count // parallel
    if platform == "cpu":
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
        return [{"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={share}".strip()}] * parallel, platform, share
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    return ([{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * share:(i + 1) * share])} for i in range(parallel)],
            platform, share)


def _die_with_parent() -> None:
    """A trial's process ends when the sweep does, whatever kills it (Linux: PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _value(value) -> str:
    return repr(value) if not isinstance(value, str) else value


@dataclasses.dataclass
class Sweep:
    workdir: str
    config_spec: str = ""
    overrides: tuple = ()
    space: tuple = ()  # the --space entries as given
    metric: str = "eval_loss"
    direction: str = "minimize"
    pruner: str = "median"
    seed: int = 0

    @property
    def definition_path(self) -> str:
        return os.path.join(self.workdir, "sweep.json")

    def save_or_check(self) -> None:
        """The first run writes SWEEP/sweep.json; a later one must ask for the same sweep."""
        mine = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if k != "workdir"}
        if os.path.exists(self.definition_path):
            saved = json.load(open(self.definition_path))
            changed = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
            if changed:
                raise ValueError(f"{self.workdir} holds another sweep (saved → asked): {changed}; use a new --workdir")
            return
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.definition_path, "w") as f:
            json.dump(mine, f, indent=2)

    @classmethod
    def load(cls, workdir: str) -> "Sweep":
        saved = json.load(open(os.path.join(workdir, "sweep.json")))
        return cls(workdir=workdir, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})

    def study(self):
        import optuna

        pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
                  "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}[self.pruner]
        storage = f"sqlite:///{os.path.abspath(os.path.join(self.workdir, 'study.db'))}"
        return optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True, direction=self.direction,
                                   sampler=optuna.samplers.TPESampler(seed=self.seed), pruner=pruner)

    def command(self, workdir: str, params: dict[str, Any]) -> list[str]:
        return ["jaxft", "train", "--config", self.config_spec, *self.overrides, f"--config.workdir={workdir}",
                *(f"--config.{k}={_value(v)}" for k, v in params.items())]


def run(sweep: Sweep, trials: int, parallel: int = 1, log=print) -> dict:
    """Runs (or continues) `sweep` until `trials` trials have finished (complete or pruned)."""
    import optuna
    from optuna.trial import TrialState

    from jaxft import config as config_lib

    config = config_lib.load(sweep.config_spec, list(sweep.overrides))
    dimensions = [parse_space(entry, config) for entry in sweep.space]  # every error before any trial
    sweep.save_or_check()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = sweep.study()
    for trial in study.trials:  # cut short by a killed sweep: run it again, in its workdir, from its checkpoint
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, "cut_short", True)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"trial_dir": trial.user_attrs["trial_dir"],
                                                          "resumes": trial.number})
            log(f"trial {trial.number} was cut short: it runs again from its checkpoint")
    slots, platform, per_slot = device_slots(parallel)
    free = list(range(len(slots)))
    lock = threading.Lock()

    def objective(trial) -> float:
        with lock:
            slot = free.pop()
        try:
            return _run_trial(sweep, trial, dimensions, slots[slot], log)
        finally:
            with lock:
                free.append(slot)

    finished = lambda: sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)  # noqa: E731
    remaining = trials - finished()
    if remaining > 0:
        log(f"sweep {sweep.workdir}: {remaining} trial(s) to run, {parallel} at a time on {per_slot} {platform} "
            f"device(s) each")
        study.optimize(objective, n_trials=remaining, n_jobs=parallel, catch=(RuntimeError,))
    return write_report(sweep, study)


def _run_trial(sweep: Sweep, trial, dimensions: list[Dimension], env: dict[str, str], log) -> float:
    import optuna

    params = {d.key: d.suggest(trial) for d in dimensions}
    name = trial.user_attrs.get("trial_dir") or f"trial-{trial.number:03d}"
    trial.set_user_attr("trial_dir", name)  # relative: the sweep folder may move
    workdir = os.path.join(sweep.workdir, name)
    command = [sys.executable, "-m", "jaxft.cli", *sweep.command(workdir, params)[1:]]
    os.makedirs(workdir, exist_ok=True)
    log(f"trial {trial.number}: {' '.join(f'{k}={v}' for k, v in params.items())}")
    trial.set_user_attr("started", time.time())
    with open(os.path.join(workdir, "sweep_trial.log"), "ab") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_die_with_parent)
        seen, last, pruned = 0, None, False
        metrics = os.path.join(workdir, "metrics.jsonl")
        while True:
            done = process.poll() is not None
            rows = _eval_rows(metrics, sweep.metric)
            for step, value in rows[seen:]:
                trial.report(value, step)
                last = value
                if trial.should_prune():
                    pruned = True
            seen = len(rows)
            if pruned and not done:
                process.send_signal(signal.SIGTERM)  # it saves and stops: a pruned trial keeps its checkpoint
                process.wait()
                done = True
            if done:
                break
            time.sleep(0.5)
    trial.set_user_attr("ended", time.time())
    if pruned:
        log(f"trial {trial.number}: pruned at {sweep.metric} {last:.4f}")
        raise optuna.TrialPruned()
    if process.returncode != 0 or last is None:
        tail = open(os.path.join(workdir, "sweep_trial.log"), errors="replace").read()[-1500:]
        what = f"exit {process.returncode}" if process.returncode else f"no eval row with {sweep.metric!r}"
        raise RuntimeError(f"trial {trial.number} ({workdir}) failed ({what}): {tail}")
    log(f"trial {trial.number}: {sweep.metric} {last:.4f}")
    return last


def _eval_rows(path: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of the run's eval rows carrying `metric`, in order (a resumed run's file holds
    its earlier rows too)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                break
            if metric in row:
                rows.append((row["step"], float(row[metric])))
    return rows


def _steps_run(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((row["step"] for row in map(json.loads, f) if "loss" in row), default=0)


def table(sweep: Sweep, study) -> list[dict]:
    """One row per trial. A trial cut short by a killed sweep shows as CUT_SHORT: a later trial with the
    same workdir carried it on from its checkpoint."""
    out = []
    for trial in study.trials:
        workdir = os.path.join(sweep.workdir, trial.user_attrs.get("trial_dir", ""))
        state = "CUT_SHORT" if trial.user_attrs.get("cut_short") else trial.state.name
        out.append({"trial": trial.number, "state": state, "value": trial.value, "params": trial.params,
                    "steps": _steps_run(workdir), "workdir": workdir,
                    "seconds": (trial.user_attrs["ended"] - trial.user_attrs["started"]
                                if "ended" in trial.user_attrs else None)})
    return out


def write_report(sweep: Sweep, study) -> dict:
    """SWEEP/best.json, SWEEP/report.html and its two plots; returns the best trial's summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    rows = table(sweep, study)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        trial = study.best_trial
        best = {"trial": trial.number, "value": trial.value, "metric": sweep.metric, "params": trial.params,
                "workdir": os.path.join(sweep.workdir, trial.user_attrs["trial_dir"]),
                "command": " ".join(sweep.command(f"{sweep.workdir}/best", trial.params))}
        with open(os.path.join(sweep.workdir, "best.json"), "w") as f:
            json.dump(best, f, indent=2)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    def shown(t):  # a pruned trial: its last reported value
        if t.value is not None:
            return t.value
        return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None

    values = [(t.number, shown(t), t.state.name) for t in study.trials]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(n, v) for n, v, s in values if s == state and v is not None]
        if points:
            ax.plot(*zip(*points), marker, label=state.lower(), ls="none")
    if complete:
        running, best_so_far = [], None
        for t in sorted(complete, key=lambda t: t.number):
            better = best_so_far is None or (t.value < best_so_far if sweep.direction == "minimize" else t.value > best_so_far)
            best_so_far = t.value if better else best_so_far
            running.append((t.number, best_so_far))
        ax.plot(*zip(*running), "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(sweep.metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(sweep.workdir, "history.png"))
    plt.close(fig)
    importances = {}
    if len(complete) >= 2:
        import optuna

        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError):  # a single distinct value, ...
            importances = {}
    if importances:
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.4 * len(importances)), dpi=110)
        ax.barh(list(importances), list(importances.values()))
        ax.set_xlabel("importance (fANOVA)")
        fig.tight_layout()
        fig.savefig(os.path.join(sweep.workdir, "importance.png"))
        plt.close(fig)
    e = html.escape
    keys = sorted({k for r in rows for k in r["params"]})
    parts = ["<!doctype html><meta charset='utf-8'><title>jaxft sweep</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{padding:4px 10px;"
             "border-bottom:1px solid #ddd;text-align:left}</style>",
             f"<h1>jaxft sweep: {e(sweep.workdir)}</h1><p>{e(sweep.direction)} {e(sweep.metric)} over "
             f"{e(', '.join(sweep.space))}</p>"]
    if best:
        parts.append(f"<p>best: trial {best['trial']}, {e(sweep.metric)} {best['value']:.4f}<br><code>{e(best['command'])}</code></p>")
    parts.append("<table><tr><th>trial</th><th>state</th><th>" + "</th><th>".join(map(e, keys)) +
                 f"</th><th>{e(sweep.metric)}</th><th>steps run</th></tr>")
    for r in rows:
        cells = "".join(f"<td>{e(str(r['params'].get(k, '')))}</td>" for k in keys)
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        parts.append(f"<tr><td>{r['trial']}</td><td>{r['state']}</td>{cells}<td>{value}</td><td>{r['steps']}</td></tr>")
    parts.append("</table><h2>History</h2><img src='history.png' width='700'>")
    if importances:
        parts.append("<h2>Parameter importance</h2><img src='importance.png' width='700'>")
    with open(os.path.join(sweep.workdir, "report.html"), "w") as f:
        f.write("\n".join(parts))
    return {"best": best, "trials": rows}


def show(workdir: str, log=print) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = Sweep.load(workdir)
    rows = table(sweep, sweep.study())
    log(f"{'trial':>5}  {'state':<9} {sweep.metric:>12}  steps  params")
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        log(f"{r['trial']:>5}  {r['state']:<9} {value:>12}  {r['steps']:>5}  "
            + " ".join(f"{k}={v}" for k, v in r["params"].items()))
    return 0
