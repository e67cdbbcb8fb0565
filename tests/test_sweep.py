"""`jaxft sweep`: Optuna over ordinary demo runs, killed and continued, two trials at once on 4+4 CPU devices.

Every sweep here runs as the user runs it: `python -m jaxft.cli sweep ...` in a child process, whose
trials are child processes of their own.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxft import config as config_lib
from jaxft import sweep as sweep_lib

pytest.importorskip("optuna")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
SHORT = ["--config.train.steps=20", "--config.train.eval_every=5", "--config.train.warmup_steps=2",
         "--config.eval.task_file=None", "--config.checkpoint.async_save=False"]
LEARNING_RATE = "train.learning_rate=loguniform(1e-5,1e-2)"


def _env(devices: int) -> dict:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def _sweep_command(workdir, *args, overrides=SHORT, space=(LEARNING_RATE,)):
    return [sys.executable, "-m", "jaxft.cli", "sweep", "--config", DEMO, *overrides,
            *(f"--space={s}" for s in space), "--workdir", str(workdir), *args]


def _sweep(workdir, *args, devices=1, **kwargs):
    out = subprocess.run(_sweep_command(workdir, *args, **kwargs), env=_env(devices), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _study(workdir):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return sweep_lib.Sweep.load(str(workdir)).study()


def test_sweep_finds_a_learning_rate_that_learns_and_prunes_the_rest(tmp_path):
    out = _sweep(tmp_path, "--trials", "6")
    study = _study(tmp_path)
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and states.count("PRUNED") >= 1, states
    best = json.load(open(tmp_path / "best.json"))
    assert best["params"]["train.learning_rate"] >= 1e-3, best
    assert best["value"] == min(t.value for t in study.trials if t.value is not None)
    assert f"--config.train.learning_rate={best['params']['train.learning_rate']!r}" in best["command"]
    # a pruned trial stopped at an eval before its 20 steps and kept its checkpoint
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    rows = {r["trial"]: r for r in sweep_lib.table(sweep_lib.Sweep.load(str(tmp_path)), study)}
    assert any(rows[t.number]["steps"] < 20 for t in pruned), rows
    for name in ("report.html", "history.png", "study.db", "sweep.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    html = open(tmp_path / "report.html").read()
    assert html.count("<tr>") == 7 and "PRUNED" in html and best["command"].split()[0] in html
    assert "best: trial" in out
    shown = subprocess.run([sys.executable, "-m", "jaxft.cli", "sweep", "--workdir", str(tmp_path), "--show"],
                           env=_env(1), capture_output=True, text=True, check=True).stdout
    assert len(shown.strip().splitlines()) == 7 and "PRUNED" in shown


def test_a_killed_sweep_continues_and_the_killed_trial_resumes(tmp_path):
    # long enough trials to kill one mid-way; no pruning, so that which trial finishes does not matter
    overrides = ["--config.train.steps=150", "--config.train.eval_every=50", "--config.checkpoint.every=10",
                 "--config.eval.task_file=None", "--config.checkpoint.async_save=False"]
    _sweep(tmp_path, "--trials", "1", "--pruner", "none", overrides=overrides)
    first = tmp_path / "trial-000" / "metrics.jsonl"
    first_rows, first_mtime = first.read_text(), first.stat().st_mtime

    process = subprocess.Popen(_sweep_command(tmp_path, "--trials", "2", "--pruner", "none", overrides=overrides),
                               env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "trial-001" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 20 for p in checkpoints.iterdir())):
        assert process.poll() is None and time.time() < deadline, "trial 1 never saved a checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(1.0)
    # the trial died with the sweep (no orphan keeps writing into trial-001)
    orphans = subprocess.run(["pgrep", "-f", f"workdir={tmp_path}/trial-001"], capture_output=True, text=True)
    assert orphans.stdout.strip() == "", orphans.stdout
    killed_at = max(json.loads(r)["step"] for r in (tmp_path / "trial-001" / "metrics.jsonl").read_text().splitlines())
    assert killed_at < 150

    out = _sweep(tmp_path, "--trials", "2", "--pruner", "none", overrides=overrides)
    assert "trial 1 was cut short" in out
    assert first.read_text() == first_rows and first.stat().st_mtime == first_mtime  # trial 0 did not run again
    report = json.load(open(tmp_path / "trial-001" / "report.json"))
    assert 20 <= report["resumed_from"] <= killed_at and report["step"] == 150, report
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].user_attrs["trial_dir"] == "trial-001"
    assert study.trials[2].params == study.trials[1].params
    assert not (tmp_path / "trial-002").exists()
    states = [r["state"] for r in sweep_lib.table(sweep_lib.Sweep.load(str(tmp_path)), study)]
    assert states == ["COMPLETE", "CUT_SHORT", "COMPLETE"]


def test_parallel_trials_run_at_once_on_their_own_devices(tmp_path):
    _sweep(tmp_path, "--trials", "2", "--parallel", "2", "--pruner", "none", devices=8)
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        report = json.load(open(tmp_path / trial.user_attrs["trial_dir"] / "report.json"))
        assert report["devices"] == 4, report
    a, b = (t.user_attrs for t in study.trials)
    assert a["started"] < b["ended"] and b["started"] < a["ended"], "the two trials did not overlap"


def test_space_errors_come_before_any_trial(tmp_path):
    config = config_lib.load(DEMO, [])
    assert sweep_lib.parse_space("lora.rank=choice(4, 8, 16)", config).args == (4, 8, 16)
    assert sweep_lib.parse_space("--config.train.learning_rate=fixed(1e-3)", config).key == "train.learning_rate"
    for entry, message in [("train.learnin_rate=uniform(0, 1)", "is not a config key"),
                           ("train.learning_rate=lognormal(1e-5, 1e-2)", "must look like"),
                           ("train.learning_rate=loguniform(1e-2, 1e-5)", "must be below"),
                           ("train.learning_rate=loguniform(0, 1e-2)", "positive low end"),
                           ("train.learning_rate=uniform(1e-5)", "takes 2"),
                           ("train.learning_rate=choice(a b)", "not Python literals"),
                           ("train.learning_rate", "must look like")]:
        with pytest.raises((ValueError, KeyError), match=message):
            sweep_lib.parse_space(entry, config)
    out = subprocess.run(_sweep_command(tmp_path, "--trials", "2", space=("lora.rnk=choice(4,8)",)), env=_env(1),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "'lora.rnk' is not a config key" in out.stderr
    assert not os.path.exists(tmp_path / "sweep.json") and not list(tmp_path.glob("trial-*"))


def test_the_same_workdir_refuses_another_sweep(tmp_path):
    sweep_lib.Sweep(workdir=str(tmp_path), config_spec=DEMO, space=(LEARNING_RATE,)).save_or_check()
    sweep_lib.Sweep(workdir=str(tmp_path), config_spec=DEMO, space=(LEARNING_RATE,)).save_or_check()
    with pytest.raises(ValueError, match="holds another sweep.*space"):
        sweep_lib.Sweep(workdir=str(tmp_path), config_spec=DEMO, space=("lora.rank=choice(4,8)",)).save_or_check()


def test_device_slots_split_the_host(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    slots, platform, share = sweep_lib.device_slots(4)
    assert platform == "cpu" and share == 2 and len(slots) == 4
    assert all(s["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2") for s in slots)
    with pytest.raises(ValueError, match="does not divide this host's 8 cpu devices"):
        sweep_lib.device_slots(3)
