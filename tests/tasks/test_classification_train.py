"""`jaxft train` with task=classification: configs/classify_demo.py reaches >= 95% validation
accuracy through the one train loop, resumes exactly, exports a PEFT adapter and an HF
*ForSequenceClassification folder that score as jaxft does, and names bad rows."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import cli
from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft import train
from jaxft.data import DataError
from jaxft.demo import MODEL_DIR
from jaxft.demo.topics import LABELS, TOPICS_VALID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "classify_demo.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("classify") / "run"
    assert cli.main(["train", "--config", CONFIG, f"--config.workdir={workdir}",
                     "--config.checkpoint.async_save=False"]) == 0
    return workdir


def test_cli_train_reaches_95_percent_and_reports_it(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]  # train.eval_every=20, and at the end
    print(f"\n[classify_demo] validation accuracy by step: {[(r['step'], r['accuracy']) for r in evals]}")
    assert evals[-1]["accuracy"] >= 0.95 and evals[-1]["f1"] >= 0.95
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    summary = json.loads((run_dir / "report.json").read_text())
    assert summary["eval"]["accuracy"] == evals[-1]["accuracy"] and summary["eval_loss"] == evals[-1]["eval_loss"]
    assert "final accuracy / macro-F1" in (run_dir / "report.html").read_text()


def test_cli_eval_of_the_run_gives_the_reported_scores(run_dir, capsys):
    assert cli.main(["eval", "--config", CONFIG, "--workdir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    reported = json.loads((run_dir / "report.json").read_text())["eval"]
    assert result["evaluated"].endswith("step 60")
    assert result["accuracy"] == reported["accuracy"] and abs(result["eval_loss"] - reported["eval_loss"]) < 1e-5


def _jaxft_logits(workdir, ids, mask):
    model = run_lib.restore(str(workdir)).model()
    return np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _validation_batch(count=32):
    from transformers import AutoTokenizer

    from jaxft.tasks import classification

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows = classification.read_rows(TOPICS_VALID)[:count]
    data = classification.encode(rows, tokenizer, LABELS, 32, tokenizer.pad_token_id)
    return data["input_ids"], data["attention_mask"]


def test_peft_and_hf_exports_score_as_jaxft(run_dir, tmp_path):
    import peft
    import torch
    import transformers

    ids, mask = _validation_batch()
    expected = _jaxft_logits(run_dir, ids, mask)
    torch_ids, torch_mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

    assert cli.main(["export", "--workdir", str(run_dir), "--out", str(tmp_path / "adapter"), "--format", "peft"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=len(LABELS),
                                                                          pad_token_id=0, dtype=torch.float32)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(
            input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
    print(f"\n[classify_demo] PEFT adapter vs jaxft: max |Δ logit| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()

    assert cli.main(["export", "--workdir", str(run_dir), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert [merged.config.id2label[i] for i in range(len(LABELS))] == LABELS
    with torch.no_grad():
        got = merged.eval()(input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
    print(f"[classify_demo] merged HF classifier vs jaxft: max |Δ logit| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(tmp_path):
    # A constant schedule, so that a run told to stop at 2 then continue to 4 is the same run as
    # 4 straight; dropout, so the step RNG must resume too; the data order must resume mid-epoch.
    common = ["--config.train.schedule=constant", "--config.train.warmup_steps=0", "--config.lora.dropout=0.1",
              "--config.checkpoint.async_save=False", "--config.train.eval_every=0"]
    straight = train.train(config_lib.load(f"{CONFIG}:smoke", [f"--config.workdir={tmp_path / 'a'}", *common]))
    train.train(config_lib.load(f"{CONFIG}:smoke", [f"--config.workdir={tmp_path / 'b'}", "--config.train.steps=2", *common]))
    resumed = train.train(config_lib.load(f"{CONFIG}:smoke", [f"--config.workdir={tmp_path / 'b'}", *common]))
    assert resumed["resumed_from"] == 2 and resumed["data"]["batches"] == straight["data"]["batches"] == 4
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert resumed["eval"] == straight["eval"]


def test_a_bad_label_names_its_file_line_and_value(tmp_path):
    rows = [{"text": "The sun was warm in Greywick.", "label": "weather"},
            {"text": "Mira the baker bakes fresh bread.", "label": 1},
            {"text": "Mira takes the train to Oakmere.", "label": "refund"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_lib.load(CONFIG, [f"--config.workdir={tmp_path / 'run'}", f"--config.data.train={path}"])
    with pytest.raises(DataError, match=rf"{path}:3: label 'refund' is neither one of \['weather', .*\]"):
        train.train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built


@pytest.mark.parametrize("override,message", [
    ("--config.task=regression", "task .regression. must be causal_lm, classification, dpo, reward, distill or grpo"),
    ("--config.classification.labels=('only',)", "classification.labels must be >= 2 distinct label names"),
    (f"--config.eval.task_file={CONFIG}", "eval.task_file .* does not apply to task=classification"),
    ("--config.data.validation_fraction=0.1", "data.validation_fraction and data.stages are for causal_lm"),
])
def test_validate_refuses_what_classification_cannot_do(override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.load(CONFIG, [override]))
