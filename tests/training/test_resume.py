"""Exact resume after SIGTERM and kill -9, corrupted checkpoints, restore on other meshes, refusal
of mismatched resumes, and the non-finite policies."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxft import checkpoint as ckpt_lib
from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")
BASE = ["--config.train.steps=12", "--config.checkpoint.every=3", "--config.train.log_every=1",
        "--config.lora.dropout=0.1"]  # dropout: the RNG must resume exactly too


def start(workdir, *overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxft.cli", "train", "--config", DEMO, f"--config.workdir={workdir}", *BASE, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def committed_steps(workdir) -> set[int]:
    folder = os.path.join(workdir, "checkpoints")
    return {int(n) for n in os.listdir(folder) if n.isdigit()} if os.path.isdir(folder) else set()


def saving_in_progress(workdir) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any("tmp" in n for n in os.listdir(folder))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    finish(start(workdir))
    return workdir


def final_params(workdir):
    trained = run_lib.restore(str(workdir))
    return trained.step, jax.device_get(trained.params)


def test_sigterm_then_restart_repeats_the_same_losses(straight, tmp_path):
    proc = start(tmp_path)
    assert wait_for(lambda: len(losses(tmp_path)) >= 5 if os.path.exists(tmp_path / "metrics.jsonl") else False, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "stopped early" in out
    stopped_at = max(losses(tmp_path))
    assert stopped_at < 12 and stopped_at in committed_steps(tmp_path)  # it saved where it stopped
    out = finish(start(tmp_path))
    assert f"resumed from step {stopped_at}" in out
    assert losses(tmp_path) == losses(straight)  # bit for bit, step for step (shuffled data, dropout)


def test_kill_9_loses_no_committed_step_and_ends_where_a_straight_run_does(straight, tmp_path):
    rng = random.Random(0)
    for trial in range(3):
        proc = start(tmp_path, "--config.checkpoint.every=1")
        if trial == 0:  # kill while an async save is being written
            assert wait_for(lambda: saving_in_progress(tmp_path), proc)
        else:
            time.sleep(rng.uniform(2.0, 6.0))
        committed = committed_steps(tmp_path)
        proc.kill()
        proc.wait()
        if proc.returncode == 0:
            break  # the run finished before the kill
        after = committed_steps(tmp_path)
        assert committed <= after or max(after, default=0) >= max(committed, default=0), (committed, after)
    out = finish(start(tmp_path, "--config.checkpoint.every=1"))
    assert losses(tmp_path) == losses(straight)
    step_a, params_a = final_params(straight)
    step_b, params_b = final_params(tmp_path)
    assert step_a == step_b == 12
    for path in params_a:
        np.testing.assert_array_equal(params_a[path], params_b[path], err_msg=path)
    assert "resumed from step" in out or losses(tmp_path)


def test_corrupted_checkpoint_is_skipped_with_a_warning(straight, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    newest = max(committed_steps(workdir))
    # Damage every array file of the newest checkpoint's state.
    state_dir = workdir / "checkpoints" / str(newest) / "state"
    damaged = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            if not name.startswith(("_METADATA", "_CHECKPOINT_METADATA", "_sharding")):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
                damaged += 1
    assert damaged
    (workdir / "checkpoints" / "99.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save: never listed
    config = config_lib.load(DEMO, [f"--config.workdir={workdir}", *BASE, "--config.train.steps=13"])
    with caplog.at_level("WARNING"):
        summary = train.train(config)
    previous = max(s for s in committed_steps(straight) if s < newest)
    assert summary["resumed_from"] == previous
    assert any(f"skipping checkpoint {workdir}/checkpoints/{newest}" in r.getMessage() for r in caplog.records)


def test_resume_from_another_runs_workdir_continues_it_exactly(straight, tmp_path):
    """checkpoint.resume_from: a new workdir starts from another run's newest checkpoint (here step 9
    of the straight run), leaves that run untouched, and ends where the straight run ends."""
    earlier = tmp_path / "earlier"
    shutil.copytree(straight, earlier)
    shutil.rmtree(earlier / "checkpoints" / "12")  # the earlier run as it was at step 9
    assert max(committed_steps(earlier)) == 9
    before = sorted(os.listdir(earlier / "checkpoints"))
    out = finish(start(tmp_path / "new", f"--config.checkpoint.resume_from={earlier}"))
    assert "resumed from step 9" in out
    assert losses(tmp_path / "new") == {s: loss for s, loss in losses(straight).items() if s > 9}
    step_a, params_a = final_params(straight)
    step_b, params_b = final_params(tmp_path / "new")
    assert step_a == step_b == 12
    for path in params_a:
        np.testing.assert_array_equal(params_a[path], params_b[path], err_msg=path)
    assert sorted(os.listdir(earlier / "checkpoints")) == before  # nothing written into the other run


def test_checkpoint_from_8_devices_restores_on_1_and_on_data2_tensor4(tmp_path):
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path}", "--config.train.steps=2", "--config.lora.rank=0",
                                    "--config.train.warmup_steps=0",
                                    "--config.mesh.shape={'fsdp': 8}", "--config.checkpoint.async_save=False"])
    train.train(config)
    runs = {"one device": run_lib.restore_training(str(tmp_path))[0],
            "data2 x tensor4": run_lib.restore_training(str(tmp_path), mesh=sharding.make_mesh({"data": 2, "tensor": 4}))[0],
            "fsdp8": run_lib.restore_training(str(tmp_path), mesh=sharding.make_mesh({"fsdp": 8}))[0]}
    reference = jax.device_get(runs["fsdp8"].state.params)
    for name, run in runs.items():
        some = run.state.params["model.layers.mlp.gate_proj.weight"]
        assert len(some.sharding.device_set) == (1 if name == "one device" else 8), name
        for path, value in jax.device_get(run.state.params).items():
            np.testing.assert_array_equal(value, reference[path], err_msg=f"{name}: {path}")
        mu = jax.tree.leaves(run.state.opt_state)
        assert all(np.isfinite(np.asarray(x)).all() for x in mu)


def test_resume_with_other_data_settings_is_refused(tmp_path):
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path}", "--config.train.steps=2",
                                    "--config.train.warmup_steps=0", "--config.checkpoint.async_save=False"])
    train.train(config)
    changed = config_lib.load(DEMO, [f"--config.workdir={tmp_path}", "--config.train.steps=4", "--config.data.seq_len=32",
                                     "--config.train.warmup_steps=0",
                                     "--config.train.batch_size=16"])
    with pytest.raises(run_lib.ResumeMismatchError, match=r"data\.seq_len: 64 → 32\n  train\.batch_size: 8 → 16"):
        train.train(changed)
    allowed = config_lib.load(DEMO, [f"--config.workdir={tmp_path}", "--config.train.steps=4", "--config.data.seq_len=32",
                                     "--config.train.warmup_steps=0",
                                     "--config.checkpoint.allow_changes=True"])
    assert train.train(allowed)["resumed_from"] == 2


def test_non_finite_loss_aborts_naming_the_step_or_is_skipped(tmp_path):
    blow_up = ["--config.train.learning_rate=1e30", "--config.train.warmup_steps=0", "--config.lora.rank=0",
               "--config.train.clip_norm=0", "--config.checkpoint.every=1", "--config.checkpoint.async_save=False",
               "--config.train.steps=4", "--config.checkpoint.keep=10"]
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path / 'abort'}", *blow_up])
    with pytest.raises(train.NonFiniteLossError, match=r"step 2: loss .* is not finite"):
        train.train(config)
    assert committed_steps(tmp_path / "abort") == {1}  # nothing saved for the bad step

    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path / 'skip'}", *blow_up, "--config.train.on_nonfinite=skip"])
    assert train.train(config)["step"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl") if '"loss"' in line]
    assert rows[0]["finite"] and not any(r["finite"] for r in rows[1:])
    after_1 = jax.device_get(run_lib.restore(str(tmp_path / "skip"), 1).params)
    after_4 = jax.device_get(run_lib.restore(str(tmp_path / "skip"), 4).params)
    for path in after_1:
        np.testing.assert_array_equal(after_1[path], after_4[path], err_msg=path)
