"""task=dpo against TRL (trl 1.16): the same tokens from the same rows, the same log-probs, losses
and reward metrics for every loss type, the same LoRA step as PEFT + TRL in torch; the reference
costs no second copy of the base; the demo learns; resume is exact; bad rows are named."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import cli, hf, plan, sharding
from jaxft import config as config_lib
from jaxft import train
from jaxft import run as run_lib
from jaxft.data import DataError
from jaxft.data.preference import PreferenceData
from jaxft.demo import MODEL_DIR
from jaxft.demo.build import CHATML_TEMPLATE
from jaxft.peft import lora
from jaxft.tasks.dpo import LOSS_TYPES, PreferenceLoss
from jaxft.testing import copy_adapters, tiny_hf_model

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DPO_DEMO = os.path.join(ROOT, "configs", "dpo_demo.py")
BETA, RANK, ALPHA = 0.1, 4, 8
ROWS = [{"prompt": "Q: What does Mira the baker do?\nA:", "chosen": " bakes fresh bread.", "rejected": " ploughs the field."},
        {"prompt": "Q: Where is the mill?\nA:", "chosen": " by the river.", "rejected": " on the hill above the old town."},
        {"prompt": "Q: Who sings at the inn?\nA:", "chosen": " the singer.", "rejected": " no one."}]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": "What does Mira the baker do?"}],
              "chosen": [{"role": "assistant", "content": "She bakes fresh bread."}],
              "rejected": [{"role": "assistant", "content": "She ploughs the field."}]},
             {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is the mill?"}],
              "chosen": [{"role": "assistant", "content": "By the river."}],
              "rejected": [{"role": "assistant", "content": "On the hill above the old town, past the church."}]}]


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the demo's tokenizer (vocab 1024, chat template), and its rows."""
    tmp = tmp_path_factory.mktemp("dpo")
    folder, torch_model = tiny_hf_model(tmp / "base", "llama3_rope", vocab_size=1024)
    hf.copy_tokenizer_files(MODEL_DIR, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, torch_model, tokenizer, write_rows(tmp / "rows.jsonl", ROWS), write_rows(tmp / "chat.jsonl", CHAT_ROWS)


def dpo_config(folder, rows, *overrides):
    return config_lib.load(DPO_DEMO, [f"--config.model.path={folder}", f"--config.data.train={rows}",
                                      "--config.data.validation=None", "--config.train.batch_size=3",
                                      "--config.data.seq_len=40", f"--config.lora.rank={RANK}",
                                      f"--config.lora.alpha={ALPHA}", *overrides])


def trl_trainer(trainer_cls, config_cls, torch_model, tokenizer, rows, **kwargs):
    """A TRL trainer with a new LoRA adapter (so its reference is the base, adapters off), its B
    randomized so that the policy differs from the reference."""
    args = config_cls(output_dir="/tmp/jaxft-trl", per_device_train_batch_size=len(rows), report_to=[], beta=BETA,
                      use_cpu=True, bf16=False, **kwargs)  # TRL trains in bf16 autocast by default: fp32 here
    trainer = trainer_cls(model=copy.deepcopy(torch_model), args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer,
                          peft_config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return trainer


def jaxft_policy(folder, torch_peft):
    model = jaxft.from_pretrained(folder)
    lora.apply_lora(model, lora.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"))
    copy_adapters(torch_peft, model)
    return model


def test_pairs_are_the_tokens_trl_trains_on(tiny):
    """Standard and conversational rows: input ids and completion masks equal TRL's DPO data path."""
    folder, torch_model, tokenizer, rows, chat = tiny
    tokenizer.chat_template = CHATML_TEMPLATE
    for path, raw in ((rows, ROWS), (chat, CHAT_ROWS)):
        trainer = trl_trainer(trl.DPOTrainer, trl.DPOConfig, torch_model, tokenizer, raw, max_length=None)
        expected = trainer.data_collator([trainer.train_dataset[i] for i in range(len(raw))])
        data = PreferenceData(dpo_config(folder, path, f"--config.train.batch_size={len(raw)}", "--config.data.seq_len=64"),
                              tokenizer, causal=True,
                              max_prompt_length=0)
        for i in range(len(raw)):
            for k in range(2):  # TRL's batch: the chosen rows, then the rejected rows
                row = i + k * len(raw)
                n = int(expected["attention_mask"][row].sum())
                np.testing.assert_array_equal(data.train["tokens"][i][k], expected["input_ids"][row, :n].numpy())
                np.testing.assert_array_equal(data.train["masks"][i][k], expected["completion_mask"][row, :n].numpy() == 1)
    assert data.train["masks"][1][1].sum() > data.train["masks"][1][0].sum()  # completions of their own lengths


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_log_probs_loss_and_metrics_equal_trl(tiny, loss_type):
    folder, torch_model, tokenizer, rows, _ = tiny
    data = PreferenceData(dpo_config(folder, rows), tokenizer, causal=True, max_prompt_length=0)
    batch = {k: jnp.asarray(v) for k, v in data.batch("train", np.arange(len(ROWS))).items()}
    if loss_type in ("sigmoid", "ipo", "hinge"):  # trl/trainer/dpo_trainer.py
        trainer = trl_trainer(trl.DPOTrainer, trl.DPOConfig, torch_model, tokenizer, ROWS, loss_type=[loss_type],
                              max_length=None)
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, inputs, False).item()
        expected = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    else:  # trl/experimental: CPO (loss_type="simpo", cpo_alpha=0) and ORPO, fed the same tokens
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        cls, config_cls, kwargs = ((CPOTrainer, CPOConfig, dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5))
                                   if loss_type == "simpo" else (ORPOTrainer, ORPOConfig, {}))
        trainer = trl_trainer(cls, config_cls, torch_model, tokenizer, ROWS, max_length=64, **kwargs)
        loss, expected = trainer.get_batch_loss_metrics(trainer.model, _legacy_batch(data))
        loss = loss.item()
    objective = PreferenceLoss(loss_type=loss_type, beta=BETA, simpo_gamma=0.5,
                               reference="none" if loss_type in ("simpo", "orpo") else "adapters_off")
    got_loss, got = objective.loss(jaxft_policy(folder, trainer.model), batch, objective.normalizer(batch))
    print(f"\n[dpo {loss_type}] loss jaxft {float(got_loss):.7f} TRL {loss:.7f}; logps/chosen {float(got['logps/chosen']):.5f}"
          f" vs {expected['logps/chosen']:.5f}")
    assert abs(float(got_loss) - loss) <= 1e-5
    # (CPO's nll_loss is its cpo_alpha term, 0 here: SimPO has none.)
    extra = ("nll_loss", "log_odds_ratio", "log_odds_chosen") if loss_type == "orpo" else ()
    names = [k for k in expected if k.startswith(("rewards/", "logps/")) or k in extra]
    assert len(names) >= 6
    worst = max(abs(float(got[name]) - expected[name]) for name in names)
    print(f"[dpo {loss_type}] largest metric difference {worst:.1e} over {names}")
    for name in names:
        assert abs(float(got[name]) - expected[name]) <= 1e-5, (name, float(got[name]), expected[name])


def _legacy_batch(data):
    """TRL's CPO/ORPO batch ({chosen,rejected}_{input_ids,attention_mask,labels}) of our tokens."""
    out = {}
    for k, side in enumerate(("chosen", "rejected")):
        tokens = [data.train["tokens"][i][k] for i in range(len(ROWS))]
        masks = [data.train["masks"][i][k] for i in range(len(ROWS))]
        length = max(len(t) for t in tokens)
        pad = lambda x, value: np.pad(x, (0, length - len(x)), constant_values=value)  # noqa: E731
        out[f"{side}_input_ids"] = torch.tensor(np.stack([pad(t, 0) for t in tokens]), dtype=torch.long)
        out[f"{side}_attention_mask"] = torch.tensor(np.stack([pad(np.ones_like(t), 0) for t in tokens]))
        out[f"{side}_labels"] = torch.tensor(np.stack([pad(np.where(m, t, -100), -100) for t, m in zip(tokens, masks)]),
                                             dtype=torch.long)
    return out


def test_conservative_dpo_is_its_formula(tiny):
    """TRL's sigmoid loss has no label smoothing: cDPO (Mitchell 2023; DPO paper's ε-smoothed
    objective) is checked against −(1 − ε) log σ(βΔ) − ε log σ(−βΔ), written here with numpy."""
    folder, torch_model, tokenizer, rows, _ = tiny
    data = PreferenceData(dpo_config(folder, rows), tokenizer, causal=True, max_prompt_length=0)
    batch = {k: jnp.asarray(v) for k, v in data.batch("train", np.arange(len(ROWS))).items()}
    trainer = trl_trainer(trl.DPOTrainer, trl.DPOConfig, torch_model, tokenizer, ROWS, max_length=None)
    model = jaxft_policy(folder, trainer.model)
    policy, reference, _ = PreferenceLoss().log_probs(model, batch)
    policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    delta = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    eps = 0.2
    expected = np.mean(-(1 - eps) * log_sigmoid(BETA * delta) - eps * log_sigmoid(-BETA * delta))
    objective = PreferenceLoss(label_smoothing=eps, beta=BETA)
    got, _ = objective.loss(model, batch, objective.normalizer(batch))
    assert abs(float(got) - expected) <= 1e-6 and abs(delta).max() > 0.1  # a margin that smoothing changes


def test_one_lora_step_equals_peft_and_trl(tiny, tmp_path):
    """One SGD step of LoRA DPO (clip 1.0): the updated adapters equal TRL's + PEFT's within 1e-5."""
    folder, torch_model, tokenizer, rows, _ = tiny
    lr = 0.5
    trainer = trl_trainer(trl.DPOTrainer, trl.DPOConfig, torch_model, tokenizer, ROWS, max_length=None, optim="sgd",
                          learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=1, seed=0,
                          dataloader_drop_last=False, logging_steps=1)
    before = copy.deepcopy(trainer.model)
    config = dpo_config(folder, rows, "--config.train.optimizer=sgd", f"--config.train.learning_rate={lr}",
                        "--config.train.schedule=constant", "--config.train.warmup_steps=0",
                        "--config.train.clip_norm=1.0", "--config.lora.dropout=0.0", "--config.train.steps=1")
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    training = run_lib.build_training(config, mesh, folder, tokenizer)
    model = training.model_def.merge(training.state.params, training.state.frozen)
    copy_adapters(before, model)  # the same initial adapters as PEFT's
    params = {p: v for p, v in nnx_flat(model).items() if p in training.state.params}
    initial = jax.device_get(params)  # the step donates its state
    state = training.state.replace(params=jax.device_put(params, training.state_shardings.params))
    data = PreferenceData(config, tokenizer, causal=True, max_prompt_length=0)
    with sharding.activate(mesh):
        state, metrics = training.compiled_step(state, sharding.global_batch(data.batch("train", np.arange(3)), mesh))
    trainer.train()
    updated = jaxft.from_pretrained(folder)
    lora.apply_lora(updated, lora.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"))
    copy_adapters(trainer.model, updated)
    expected = {p: v for p, v in nnx_flat(updated).items() if p in state.params}
    moved = 0.0
    for path, value in expected.items():
        np.testing.assert_allclose(np.asarray(state.params[path]), np.asarray(value), atol=1e-5, err_msg=path)
        moved = max(moved, float(np.abs(np.asarray(value) - initial[path]).max()))
    assert moved > 1e-3, f"the step barely moved the adapters ({moved:.1e}): the comparison would prove nothing"


def nnx_flat(model):
    from jaxft.pretrained import flat_params

    return {p: v[...] for p, v in flat_params(model)[1].items()}


def test_lora_dpo_holds_no_second_copy_of_the_base():
    """The compiled LoRA DPO step of B pairs needs what the SFT step of 2B sequences needs (the
    reference is the base with adapters off); a full fine-tuning DPO step carries its frozen copy."""
    hf_config = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1024,
                 "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 64}
    common = ["--config.model.path=unused", "--config.data.seq_len=16", "--config.mesh.shape={'data': 1}",
              "--config.lora.rank=8"]
    dpo = config_lib.load(DPO_DEMO, [*common, "--config.train.batch_size=2"])
    sft = config_lib.load(os.path.join(ROOT, "configs", "demo.py"), [*common, "--config.train.batch_size=4"])
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    dpo_peak = plan.compiled_memory(dpo, hf_config, sizes)["peak"]
    sft_peak = plan.compiled_memory(sft, hf_config, sizes)["peak"]
    params = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(run_lib.abstract_training(sft, hf_config).state.frozen))
    print(f"\n[dpo memory] LoRA DPO step {dpo_peak / 2**20:.1f} MiB vs SFT step {sft_peak / 2**20:.1f} MiB "
          f"(base {params / 2**20:.1f} MiB)")
    assert abs(dpo_peak / sft_peak - 1) <= 0.10
    full = config_lib.with_values(dpo, {"lora.rank": 0})
    full_peak = plan.compiled_memory(full, hf_config, sizes)["peak"]
    assert full_peak > dpo_peak + 2 * params  # the frozen copy, the trained params and Adam's moments on top


def test_demo_learns_and_the_export_prefers_the_chosen(tmp_path):
    workdir = tmp_path / "dpo"
    assert cli.main(["train", "--config", DPO_DEMO, f"--config.workdir={workdir}",
                     "--config.checkpoint.async_save=False"]) == 0
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert abs(train_rows[0]["loss"] - np.log(2)) <= 1e-4  # policy = reference at step 0
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0.0  # every margin is 0
    print(f"\n[dpo demo] held-out reward accuracy {[(r['step'], round(r['eval_rewards/accuracies'], 3)) for r in evals]}")
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    report = json.loads((workdir / "report.json").read_text())
    assert report["examples"]["before"] and report["examples"]["after"]
    assert "Examples" in (workdir / "report.html").read_text()

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = config_lib.load(DPO_DEMO)
    data = PreferenceData(config, transformers.AutoTokenizer.from_pretrained(MODEL_DIR), causal=True, max_prompt_length=0)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    margin = {name: _torch_margins(model, data) for name, model in (("merged", merged), ("base", base))}
    better = float(np.mean(margin["merged"] > margin["base"]))
    print(f"[dpo demo] the export widens the chosen-over-rejected log-prob margin on {better:.1%} of held-out pairs")
    assert better >= 0.9


def _torch_margins(model, data) -> np.ndarray:
    """log p(chosen) − log p(rejected) of every validation pair, in transformers."""
    batch = next(data.eval_batches(batch_size=len(data.validation["tokens"])))
    ids = torch.as_tensor(batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1]), dtype=torch.long)
    mask = torch.as_tensor(batch["attention_mask"].reshape(ids.shape))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    log_probs = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(batch["targets"].reshape(ids.shape),
                                                                          dtype=torch.long)[..., None])[..., 0]
    sums = (log_probs.numpy() * batch["loss_mask"].reshape(ids.shape)).sum(-1).reshape(-1, 2)
    return sums[:, 0] - sums[:, 1]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}


@pytest.mark.parametrize("variant", [[], ["--config.lora.rank=0", "--config.dpo.precompute_reference=True"]],
                         ids=["lora", "full_precomputed"])
def test_resume_is_exact(tmp_path, variant):
    common = ["--config.train.schedule=constant", "--config.train.warmup_steps=0", "--config.lora.dropout=0.1",
              "--config.checkpoint.async_save=False", "--config.train.eval_every=0", "--config.eval.at_start=False",
              "--config.train.learning_rate=1e-3", *variant]
    load = lambda name, *more: config_lib.load(f"{DPO_DEMO}:smoke", [f"--config.workdir={tmp_path / name}", *common,  # noqa: E731
                                                                      *more])
    straight = train.train(load("a"))
    train.train(load("b", "--config.train.steps=2"))
    resumed = train.train(load("b"))
    assert resumed["resumed_from"] == 2 and resumed["data"]["batches"] == 4
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert resumed["eval"] == straight["eval"]
    if variant:  # the reference log-probs were computed once, by the first run of the workdir, and reused
        assert os.path.exists(tmp_path / "b" / "reference_logps.npz")


def test_precomputed_reference_equals_the_frozen_copy(tmp_path):
    """Full fine-tuning: reference log-probs computed before training give the losses the frozen
    copy gives, step for step."""
    common = ["--config.lora.rank=0", "--config.checkpoint.async_save=False", "--config.train.eval_every=0",
              "--config.eval.at_start=False", "--config.train.learning_rate=1e-3"]
    for name, extra in (("copy", []), ("pre", ["--config.dpo.precompute_reference=True"])):
        train.train(config_lib.load(f"{DPO_DEMO}:smoke", [f"--config.workdir={tmp_path / name}", *common, *extra]))
    copy_losses, pre_losses = _losses(tmp_path / "copy"), _losses(tmp_path / "pre")
    assert copy_losses.keys() == pre_losses.keys() and copy_losses[1] == pytest.approx(np.log(2), abs=1e-4)
    for step in copy_losses:
        assert abs(copy_losses[step] - pre_losses[step]) <= 1e-5, (step, copy_losses[step], pre_losses[step])
    assert os.path.exists(tmp_path / "pre" / "reference_logps.npz")
    assert not os.path.exists(tmp_path / "copy" / "reference_logps.npz")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Q: x?\nA:", "chosen": " yes."}, r":2: missing field 'rejected' \(data\.rejected_field\)"),
    ({"prompt": "Q: x?\nA:", "chosen": 3, "rejected": " no."}, r":2: field 'chosen' must be a string, as the prompt is, got int"),
    ({"prompt": [{"role": "user", "content": "x?"}], "chosen": [{"role": "assistant", "content": "yes"}],
      "rejected": [{"role": "assistant", "content": "no"}, {"role": "user", "content": "and?"}]},
     r":2: field 'rejected': its last message is from 'user', not from the assistant"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [ROWS[0], row])
    config = config_lib.load(DPO_DEMO, [f"--config.data.train={path}", "--config.data.validation=None"])
    with pytest.raises(DataError, match=f"{path}{message}"):
        PreferenceData(config, transformers.AutoTokenizer.from_pretrained(MODEL_DIR), causal=True, max_prompt_length=0)


def test_long_pairs_cut_the_prompt_first_and_identical_pairs_are_dropped(tmp_path):
    long_prompt = "Q: " + " ".join(["the old mill by the river"] * 12) + "?\nA:"
    rows = [ROWS[0], {"prompt": long_prompt, "chosen": " bakes fresh bread.", "rejected": " no."},
            {"prompt": "Q: y?\nA:", "chosen": " same.", "rejected": " same."}]
    path = write_rows(tmp_path / "long.jsonl", rows)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    config = config_lib.load(DPO_DEMO, [f"--config.data.train={path}", "--config.data.validation=None",
                                        "--config.train.batch_size=2", "--config.data.seq_len=24"])
    data = PreferenceData(config, tokenizer, causal=True, max_prompt_length=8)
    counts = data.report["train"]
    assert counts["pairs"] == 2 and counts["truncated"] == 1 and counts["identical_pair"] == 1
    chosen = data.train["tokens"][1][0]
    assert len(chosen) <= 25 and tokenizer.decode(chosen).endswith("bakes fresh bread.<|eos|>")
    assert tokenizer.decode(chosen[:8]).endswith("\nA:")  # the prompt's end is kept
    config.data.overlong = "drop"
    assert PreferenceData(config, tokenizer, causal=True, max_prompt_length=8).report["train"]["dropped_overlong"] == 1


def test_chunked_log_probs_equal_the_whole_sequence(tiny):
    """train.loss_chunk: the pairs' log-probs over sequence chunks (no [2B, T, V] logits held) give
    the same loss and gradients as over the whole sequence."""
    from jaxft import step

    folder, torch_model, tokenizer, rows, _ = tiny
    data = PreferenceData(dpo_config(folder, rows), tokenizer, causal=True, max_prompt_length=0)
    batch = {k: jnp.asarray(v) for k, v in data.batch("train", np.arange(len(ROWS))).items()}
    trainer = trl_trainer(trl.DPOTrainer, trl.DPOConfig, torch_model, tokenizer, ROWS, max_length=None)
    model_def, params, frozen = step.split_model(jaxft_policy(folder, trainer.model), lora.is_lora_param)
    results = {}
    for chunk in (0, 8):
        objective = PreferenceLoss(loss_type="orpo", chunk=chunk)  # both masks: the completion and the sequence
        loss_fn = step.make_loss_fn(model_def, objective)
        results[chunk] = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, objective.normalizer(batch), None)
    (loss, _), grads = results[0]
    (chunked, _), chunked_grads = results[8]
    np.testing.assert_allclose(chunked, loss, rtol=1e-6)
    for path in grads:
        np.testing.assert_allclose(chunked_grads[path], grads[path], atol=1e-6, err_msg=path)
