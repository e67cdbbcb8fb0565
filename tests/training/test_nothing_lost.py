"""Nothing lost, nothing silently wrong: exports that replace whole, refuse the base and the
checkpoints, a base changed anywhere is noticed, a checkpoint whose bytes changed is set aside,
config values that would destroy checkpoints are refused, and CLI errors are one line.

Each test here reproduced a bad behaviour of the code before it (see the closing note of issue 18)."""

import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from jaxft import checkpoint as ckpt_lib
from jaxft import cli, export, train
from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft.demo import MODEL_DIR
from jaxft.testing import demo_batch, torch_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _train(workdir, base, *overrides):
    config = config_lib.load(f"{DEMO}:smoke", [f"--config.workdir={workdir}", f"--config.model.path={base}",
                                               "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
                                               "--config.train.learning_rate=0.05", "--config.eval.task_file=None",
                                               *overrides])
    return train.train(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step LoRA run (checkpoints at 2 and 4) on a copy of the demo model."""
    root = tmp_path_factory.mktemp("nothing_lost")
    base = str(root / "base")
    shutil.copytree(MODEL_DIR, base)
    _train(root / "run", base)
    return {"workdir": str(root / "run"), "base": base}


def _digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _logits_agree(folder):
    """jaxft and transformers load the same weights from `folder` (no stale file wins in either)."""
    ids, mask, positions = demo_batch(["The river runs past the old mill", "Question: what does the baker sell?"])
    ours = np.asarray(jaxft.from_pretrained(folder, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    theirs = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                          ids, mask, positions)
    return np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4, ours


# ---- export ---------------------------------------------------------------------------------------
def test_a_re_export_replaces_an_earlier_sharded_one_whole(run, tmp_path, monkeypatch):
    out = str(tmp_path / "hf")
    with monkeypatch.context() as patch:  # the first export in shards of ~100 KB: an index and many files
        patch.setattr(export, "save_pretrained", functools.partial(export.save_pretrained, max_shard_size=100_000))
        export.export(run["workdir"], out, format="hf", step=2)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    _, from_step_2 = _logits_agree(out)

    export.export(run["workdir"], out, format="hf", step=4)  # one file now
    files = set(os.listdir(out))
    assert "model.safetensors" in files and not any(name.startswith("model-0") for name in files), files
    assert "model.safetensors.index.json" not in files  # before: the old index stayed, and jaxft read the old shards
    agree, from_step_4 = _logits_agree(out)
    assert agree and np.abs(from_step_4 - from_step_2).max() > 1e-3
    assert json.load(open(os.path.join(out, export.EXPORT_MARKER)))["step"] == 4
    assert not glob.glob(str(tmp_path / ".hf.*"))  # no staging or retired folder left behind


def test_export_refuses_the_base_folder_and_the_checkpoints(run):
    before = _digest(run["base"])
    for out, named in [(run["base"], "base model folder"), (os.path.join(run["base"], "merged"), "base model folder"),
                       (os.path.dirname(run["base"]), "base model folder"),
                       (run["workdir"], "checkpoints"), (os.path.join(run["workdir"], "checkpoints", "x"), "checkpoints")]:
        with pytest.raises(ValueError, match=named):
            export.export(run["workdir"], out, format="hf")
    assert _digest(run["base"]) == before  # before: the merged weights replaced the base, and a resume applied LoRA twice


def test_export_refuses_a_folder_it_did_not_write_unless_overwrite(run, tmp_path):
    out = tmp_path / "somebody_else"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no earlier jaxft export.*--overwrite"):
        export.export(run["workdir"], str(out), format="peft")
    assert (out / "notes.txt").read_text() == "mine"
    export.export(run["workdir"], str(out), format="peft", overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "adapter_config.json").exists()


def test_a_failed_export_leaves_the_earlier_one_untouched(run, tmp_path, monkeypatch):
    out = str(tmp_path / "hf")
    export.export(run["workdir"], out, format="hf")
    before = _digest(out)

    def half_written(model, folder, **kwargs):
        open(os.path.join(folder, "model.safetensors"), "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        export.export(run["workdir"], out, format="hf")
    assert _digest(out) == before and not glob.glob(str(tmp_path / ".hf.*"))


# ---- the base and the checkpoints -----------------------------------------------------------------
def test_a_base_changed_past_its_first_64k_is_noticed(tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(MODEL_DIR, base)
    _train(tmp_path / "run", base, "--config.train.steps=2")
    weights = os.path.join(base, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # one weight's bytes near the end of the file: the header stays valid
        f.seek(size - 1000)
        byte = f.read(1)
        f.seek(size - 1000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(run_lib.ResumeMismatchError, match="changed since"):
        run_lib.restore(str(tmp_path / "run"))
    with pytest.raises(run_lib.ResumeMismatchError, match="base weights fingerprint"):
        _train(tmp_path / "run", base, "--config.train.steps=4")


def test_the_base_fingerprint_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    base = str(tmp_path / "base")
    shutil.copytree(MODEL_DIR, base)
    first = ckpt_lib.base_fingerprint(base)
    assert first.startswith(ckpt_lib.FINGERPRINT_PREFIX)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (reads.append(str(path)), real_open(path, *a, **k))[1])
    assert ckpt_lib.base_fingerprint(base) == first
    assert not any(path.endswith(".safetensors") for path in reads)  # unchanged: the cache answered
    monkeypatch.setattr("builtins.open", real_open)
    os.utime(os.path.join(base, "model.safetensors"), ns=(0, 12345))  # touched: hashed again (same bytes)
    assert ckpt_lib.base_fingerprint(base) == first


def test_a_checkpoint_with_flipped_bytes_is_set_aside(run, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(run["workdir"], workdir)
    # The largest data file of step 4 holds the adapters' arrays; flip one bit in the middle of it.
    data = max(glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "d", "*"), recursive=True),
               key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x04]))
    with caplog.at_level(logging.WARNING, logger="jaxft.checkpoint"):
        trained, _ = run_lib.restore_training(workdir)  # read-only (export, eval): skipped, left in place
    assert int(trained.state.step) == 2  # before: step 4 was restored with the flipped value, without a word
    assert "does not match the checksum saved with it" in caplog.text
    summary = _train(workdir, run["base"], "--config.train.steps=6")  # a resume sets it aside and goes on
    assert summary["resumed_from"] == 2 and summary["step"] == 6
    assert glob.glob(os.path.join(workdir, "checkpoints", "4.unreadable-*"))


# ---- config values that would lose work -----------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),  # before: each checkpoint deleted right after its save
    ("checkpoint.keep_best=-1", "checkpoint.keep_best must be >= 0"),
    ("train.log_every=0", "train.log_every must be > 0"),
    ("workdir=''", "workdir is empty"),
    ("workdir='  '", "workdir is empty"),
])
def test_config_values_that_would_lose_work_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.load(DEMO, [f"--config.{override}"]))


def test_a_config_arg_the_file_does_not_know_is_an_error():
    assert config_lib.load(f"{DEMO}:smoke").train.steps == 4
    with pytest.raises(ValueError, match=r"demo\.py: unknown config arg 'smok'; this file knows 'smoke'"):
        config_lib.load(f"{DEMO}:smok")  # before: silently the default config
    with pytest.raises(ValueError, match="knows no args"):
        config_lib.load(os.path.join(ROOT, "configs", "llama32_1b_full.py") + ":v5e")


def test_a_lora_rank_above_a_layer_dimension_warns(caplog):
    from jaxft.peft.lora import LoraConfig, apply_lora

    model = jaxft.from_pretrained(MODEL_DIR, dtype="float32")  # hidden 128; k/v project to 2 heads x 32 = 64
    with caplog.at_level(logging.WARNING, logger="jaxft.lora"):
        apply_lora(model, LoraConfig(rank=96, alpha=96, targets=("q_proj", "k_proj", "v_proj")))
    assert "lora.rank=96 exceeds the smallest dimension of k_proj (64), v_proj (64)" in caplog.text
    assert "q_proj" not in caplog.text


# ---- the CLI ---------------------------------------------------------------------------------------
def _jaxft(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    out = _jaxft("info", "--model", str(tmp_path / "missing"))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"jaxft info: error: model folder '{tmp_path / 'missing'}' does not exist"]  # before: a full traceback
    for debug in (["--debug"], []):
        out = _jaxft("info", "--model", str(tmp_path / "missing"), *debug, env={} if debug else {"JAXFT_DEBUG": "1"})
        assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    bug = tmp_path / "bug.py"
    bug.write_text("def get_config():\n    return None + 1\n")
    out = _jaxft("train", "--config", str(bug))
    line, = out.stderr.strip().splitlines()
    assert line.startswith("jaxft train: error: TypeError: unsupported operand") and "--debug" in line
    out = _jaxft("train", "--config", DEMO, "--config.train.stepz=3")
    line, = out.stderr.strip().splitlines()
    assert line.startswith("jaxft train: error: unknown config key 'train.stepz'; did you mean train.steps")


@pytest.fixture
def jaxft_log_level():
    yield
    logging.getLogger("jaxft").setLevel(logging.NOTSET)  # as before cli.main set it


def test_a_bad_config_json_is_named_by_jaxft_not_by_transformers(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(MODEL_DIR, base)
    hf_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**hf_config, "rope_scaling": {"rope_type": "linear"}}))
    out = _jaxft("train", "--config", f"{DEMO}:smoke", f"--config.workdir={tmp_path / 'run'}", f"--config.model.path={base}")
    # before: transformers' tokenizer loading read config.json first and raised its KeyError naming no file
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        f"jaxft train: error: {base}/config.json: rope_scaling.factor: missing: linear RoPE needs it (a number >= 1)")


def test_info_messages_show_unless_quiet(run, caplog, jaxft_log_level):
    with caplog.at_level(logging.DEBUG):
        assert cli.main(["train", "--config", f"{DEMO}:smoke", f"--config.workdir={run['workdir']}",
                         f"--config.model.path={run['base']}", "--config.checkpoint.every=2",
                         "--config.eval.task_file=None", "--config.train.learning_rate=0.05"]) == 0
    assert "resuming from" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="root"):
        assert cli.main(["train", "--quiet", "--config", f"{DEMO}:smoke", f"--config.workdir={run['workdir']}",
                         f"--config.model.path={run['base']}", "--config.checkpoint.every=2",
                         "--config.eval.task_file=None", "--config.train.learning_rate=0.05"]) == 0
    assert "resuming from" not in caplog.text
