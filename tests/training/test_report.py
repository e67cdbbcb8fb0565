"""What a run leaves for people: metrics, TensorBoard events, the report with the task eval; early
stopping; and the CLI's errors."""

import glob
import json
import os
import subprocess
import sys

import pytest

from jaxft import config as config_lib
from jaxft import evaluate, train
from jaxft.demo import MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def test_run_writes_metrics_tensorboard_and_a_report_with_task_eval(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in [{"prompt": "The river runs past", "answer": "the old mill"},
                                                      {"prompt": "The train to the city leaves at", "answer": "seven"}]))
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path / 'run'}", "--config.train.steps=3",
                                    "--config.train.warmup_steps=0", f"--config.eval.task_file={task}",
                                    "--config.eval.max_new_tokens=4", "--config.checkpoint.async_save=False"])
    summary = train.train(config)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= set(r) for r in train_rows)
    assert any("eval_loss" in r for r in rows)
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert (run / "loss_curve.png").stat().st_size > 1000
    report = (run / "report.html").read_text()
    assert "Task evaluation" in report and "before training" in report and "after training" in report
    assert "The river runs past" in report
    saved = json.loads((run / "report.json").read_text())
    assert set(saved["task"]) == {"before", "after"} and 0.0 <= saved["task"]["after"]["exact_match"] <= 1.0
    assert summary["step"] == 3


def test_early_stopping_on_a_crafted_eval_curve():
    stopper = evaluate.EarlyStopping(patience=2)
    decisions = [stopper.update(loss) for loss in [3.0, 2.0, 2.5, 2.4, 1.0]]
    assert decisions == [False, False, False, True, False]  # 2.5 and 2.4 do not beat 2.0: stop at the 4th
    assert stopper.best == 1.0
    assert not any(evaluate.EarlyStopping(patience=0).update(x) for x in [1.0, 2.0, 3.0])  # 0 = off


def test_early_stopping_ends_a_diverging_run(tmp_path):
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path}", "--config.train.steps=20", "--config.train.warmup_steps=0",
                                    "--config.train.learning_rate=3.0", "--config.lora.rank=0", "--config.train.eval_every=1",
                                    "--config.eval.patience=2", "--config.checkpoint.async_save=False"])
    summary = train.train(config)
    evals = [json.loads(line)["eval_loss"] for line in open(tmp_path / "metrics.jsonl") if "eval_loss" in line]
    best = evals.index(min(evals))
    assert summary["stopped_early"] and "no eval-loss improvement" in summary["stopped_because"]
    assert summary["step"] == best + 1 + 2  # two evaluations after the best one


def cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxft.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_errors_name_the_problem(tmp_path):
    out = cli("train", "--config", DEMO, "--config.train.stepz=3")
    assert out.returncode != 0 and "unknown config key 'train.stepz'; did you mean train.steps" in out.stderr
    out = cli("train", "--config", DEMO, "--config.train.steps=many")
    assert out.returncode != 0 and "--config.train.steps=many" in out.stderr
    out = cli("train", "--config", DEMO, f"--config.workdir={tmp_path}", "--config.train.batch_size=6",
              "--config.mesh.shape={'data': 4, 'tensor': 2}")
    assert out.returncode != 0 and "micro-batch of 6 sequences" in out.stderr and "data-parallel size 4" in out.stderr
    out = cli("train", "--config", DEMO, "--bogus")
    assert out.returncode != 0 and "unrecognized arguments: --bogus" in out.stderr


def test_cli_export_writes_a_loadable_folder(tmp_path):
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path / 'run'}", "--config.train.steps=2",
                                    "--config.train.warmup_steps=0", "--config.checkpoint.async_save=False"])
    train.train(config)
    out = cli("export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf",
              "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr[-2000:]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert str(model.dtype) == "torch.bfloat16"
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    assert MODEL_DIR  # the base it came from is the bundled model


def test_cli_eval_of_a_run_and_of_an_hf_folder(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "The river runs past", "answer": "the old mill"}) + "\n")
    config = config_lib.load(DEMO, [f"--config.workdir={tmp_path / 'run'}", "--config.train.steps=2",
                                    "--config.train.warmup_steps=0", "--config.checkpoint.async_save=False"])
    train.train(config)
    out = cli("eval", "--config", DEMO, "--workdir", str(tmp_path / "run"), f"--task-file={task}")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["evaluated"].endswith("step 2") and result["eval_loss"] > 0 and 0 <= result["exact_match"] <= 1
    out = cli("eval", "--config", DEMO, "--model", MODEL_DIR)
    assert out.returncode == 0, out.stderr[-2000:]
    base = json.loads(out.stdout[out.stdout.index("{"):])
    assert base["eval_loss"] != result["eval_loss"]  # the trained run differs from its base
