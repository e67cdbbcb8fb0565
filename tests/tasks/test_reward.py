"""task=reward against TRL's RewardTrainer (trl 1.16): the same tokens, loss and metrics on a batch
(with margins and reward centering); the demo reward model reaches held-out accuracy >= 0.9 and its
exports score in transformers and PEFT as in jaxft; resume is exact."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import cli, hf
from jaxft import config as config_lib
from jaxft import train
from jaxft import run as run_lib
from jaxft.data.preference import PreferenceData
from jaxft.demo import MODEL_DIR
from jaxft.tasks.reward import BradleyTerry
from jaxft.testing import tiny_hf_model

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REWARD_DEMO = os.path.join(ROOT, "configs", "reward_demo.py")
ROWS = [{"prompt": "Q: What does Mira the baker do?\nA:", "chosen": " bakes fresh bread.", "rejected": " ploughs the field.",
         "margin": 0.5},
        {"prompt": "Q: Where is the mill?\nA:", "chosen": " by the river.", "rejected": " on the hill above the old town.",
         "margin": 0.0},
        {"prompt": "Q: Who sings at the inn?\nA:", "chosen": " the singer.", "rejected": " no one.", "margin": 1.5}]


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_loss_and_metrics_equal_trl(tmp_path, center):
    folder, torch_model = tiny_hf_model(tmp_path / "rm", "llama3_rope", vocab_size=1024, task="classification",
                                        num_labels=1, pad_token_id=0)
    hf.copy_tokenizer_files(MODEL_DIR, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                            bf16=False, center_rewards_coefficient=center or None, max_length=None)
    trainer = trl.RewardTrainer(model=copy.deepcopy(torch_model), args=args, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list(ROWS))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(inputs)).item()
    expected = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    config = config_lib.load(REWARD_DEMO, [f"--config.model.path={folder}", f"--config.data.train={path}",
                                           "--config.data.validation=None", "--config.train.batch_size=3",
                                           "--config.data.margin_field=margin", "--config.data.seq_len=24",
                                           f"--config.reward.center_rewards_coefficient={center}"])
    data = PreferenceData(config, tokenizer, causal=False, max_prompt_length=0)
    for i in range(3):  # the sequences TRL scores: prompt + completion + EOS, chosen rows then rejected rows
        for k in range(2):
            row = i + 3 * k
            n = int(inputs["attention_mask"][row].sum())
            np.testing.assert_array_equal(data.train["tokens"][i][k], inputs["input_ids"][row, :n].numpy())
    batch = {k: jnp.asarray(v) for k, v in data.batch("train", np.arange(3)).items()}
    objective = BradleyTerry(center)
    got_loss, got = objective.loss(jaxft.from_pretrained(folder), batch, objective.normalizer(batch))
    print(f"\n[reward] loss jaxft {float(got_loss):.7f} TRL {loss:.7f}; accuracy {float(got['accuracy'])} margin "
          f"{float(got['margin']):.5f} vs {expected['margin']:.5f}")
    assert abs(float(got_loss) - loss) <= 1e-5
    for name in ("accuracy", "margin", "mean_reward"):
        assert abs(float(got[name]) - expected[name]) <= 1e-5, (name, float(got[name]), expected[name])


def test_demo_reward_model_and_its_exports(tmp_path):
    workdir = tmp_path / "rm"
    assert cli.main(["train", "--config", REWARD_DEMO, f"--config.workdir={workdir}",
                     "--config.checkpoint.async_save=False"]) == 0
    evals = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "eval_loss" in r]
    print(f"\n[reward demo] held-out pair accuracy {[(r['step'], round(r['accuracy'], 3)) for r in evals]}")
    assert evals[0]["step"] == 0 and 0.3 < evals[0]["accuracy"] < 0.7  # a random head: a coin toss
    assert evals[-1]["accuracy"] >= 0.9

    config = config_lib.load(REWARD_DEMO)
    data = PreferenceData(config, transformers.AutoTokenizer.from_pretrained(MODEL_DIR), causal=False,
                          max_prompt_length=0)
    batch = next(data.eval_batches(batch_size=16))
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    mask = batch["attention_mask"].reshape(ids.shape)
    ours = np.asarray(run_lib.restore(str(workdir)).model().classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    torch_ids, torch_mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert merged.config.num_labels == 1 and type(merged).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        scores = merged(input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
    print(f"[reward demo] merged HF reward model vs jaxft: max |Δ| {np.abs(scores - ours).max():.2e}")
    assert np.abs(scores - ours).max() <= 1e-4

    import peft

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "adapter"), "--format", "peft"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=1, pad_token_id=0,
                                                                          dtype=torch.float32)
    with torch.no_grad():
        scores = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(
            input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()
    assert np.abs(scores - ours).max() <= 1e-4


def test_resume_is_exact(tmp_path):
    common = ["--config.train.schedule=constant", "--config.train.warmup_steps=0", "--config.lora.dropout=0.1",
              "--config.checkpoint.async_save=False", "--config.train.eval_every=0", "--config.eval.at_start=False"]
    load = lambda name, *more: config_lib.load(f"{REWARD_DEMO}:smoke", [f"--config.workdir={tmp_path / name}", *common,  # noqa: E731
                                                                         *more])
    straight = train.train(load("a"))
    train.train(load("b", "--config.train.steps=2"))
    resumed = train.train(load("b"))
    assert resumed["resumed_from"] == 2
    losses = lambda w: {r["step"]: r["loss"] for r in map(json.loads, open(w / "metrics.jsonl")) if "loss" in r}  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert resumed["eval"] == straight["eval"]
