"""Exports load in PyTorch as they are and give the trained model's logits."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxft import config as config_lib
from jaxft import export, hf, train
from jaxft import run as run_lib
from jaxft.demo import MODEL_DIR
from jaxft.testing import demo_batch, torch_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def trained(workdir, *overrides):
    # A high learning rate so that 3 steps move every trained weight well away from its init.
    config = config_lib.load(DEMO, [f"--config.workdir={workdir}", "--config.train.steps=3",
                                    "--config.train.warmup_steps=0", "--config.train.learning_rate=0.05",
                                    "--config.checkpoint.async_save=False", *overrides])
    train.train(config)
    # The whole train state, as a resumed run holds it: not the path the exports take (run.restore).
    training, _ = run_lib.restore_training(str(workdir))
    return training.model_def.merge(training.state.params, training.state.frozen)


def batch():
    return demo_batch(["The river runs past the old mill", "Question: what does the baker sell?"])


def jax_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_exports_match_the_trained_model(tmp_path, kind):
    overrides = {"lora": [], "dora": ["--config.lora.use_dora=True"], "full": ["--config.lora.rank=0"]}[kind]
    model = trained(tmp_path / "run", *overrides)
    ids, mask, positions = batch()
    valid = mask.astype(bool)
    expected = jax_logits(model, ids, mask)

    export.export(str(tmp_path / "run"), str(tmp_path / "hf"), format="hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    merged_logits = torch_logits(merged, ids, mask, positions)
    # Merging W + s·BA rounds once in fp32; on the demo model's logits (|x| up to ~20) that is ~1e-5.
    assert np.abs(merged_logits - expected)[valid].max() <= 1e-4
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # the tokenizer travels with it

    if kind == "full":
        with pytest.raises(ValueError, match="full fine-tuning run .* no adapter"):
            export.export(str(tmp_path / "run"), str(tmp_path / "peft"), format="peft")
        return
    import peft

    export.export(str(tmp_path / "run"), str(tmp_path / "peft"), format="peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["use_dora"] == (kind == "dora")
    assert adapter_config["modules_to_save"] is None
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapter_logits = torch_logits(with_adapter, ids, mask, positions)
    assert np.abs(adapter_logits - expected)[valid].max() <= 1e-4
    assert np.abs(adapter_logits - merged_logits)[valid].max() <= 1e-4
    # The adapter is not a no-op: the base model's logits differ.
    base_logits = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval(),
                               ids, mask, positions)
    assert np.abs(base_logits - expected)[valid].max() > 1e-2


def test_export_builds_no_optimizer_state_and_reads_no_weight_twice(tmp_path, monkeypatch):
    """A full fine-tuning export restores only the checkpoint's params (no optimizer, no Adam
    moments restored) and reads none of the base weights that those params replace."""
    from jaxft import optim, pretrained, step

    model = trained(tmp_path / "run", "--config.lora.rank=0")
    trained(tmp_path / "lora")
    ids, mask, positions = batch()
    expected = jax_logits(model, ids, mask)

    def refuse(*args, **kwargs):
        raise AssertionError("export built training state")

    for module, name in ((step, "init_state"), (optim, "make_optimizer"), (step, "make_train_step")):
        monkeypatch.setattr(module, name, refuse)
    base_reads = []
    real_load = pretrained._load_param
    monkeypatch.setattr(pretrained, "_load_param", lambda checkpoint, rule, *a: base_reads.append(rule.param) or
                        real_load(checkpoint, rule, *a))
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"), format="hf")
    assert base_reads == []  # every param of a full fine-tuning run comes from its checkpoint
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert np.abs(torch_logits(merged, ids, mask, positions) - expected)[mask.astype(bool)].max() <= 1e-4

    base_reads.clear()  # a LoRA run's frozen base is read from the base folder, once
    run_lib.restore(str(tmp_path / "lora"))
    assert "model.embed_tokens.weight" in base_reads and len(base_reads) == len(set(base_reads))


@pytest.mark.parametrize("variant", [[], ["--config.lora.use_dora=True", "--config.lora.use_rslora=True"]],
                         ids=["lora", "dora_rslora"])
def test_phi3_adapters_export_onto_its_fused_modules(tmp_path, variant):
    """Phi-3's checkpoint fuses qkv_proj and gate_up_proj; jaxft adapts q/k/v and gate/up apart. The
    PEFT export fuses the adapters (rank k·r, block-diagonal B) and PEFT then computes the same model
    (DoRA and rsLoRA too: rsLoRA's scale written as plain lora_alpha / r)."""
    import peft

    from jaxft.testing_families import tiny_family_model

    folder, _ = tiny_family_model(tmp_path / "phi3", "phi3_4k_partial", vocab_size=1024)
    hf.copy_tokenizer_files(MODEL_DIR, str(folder))  # the demo's tokenizer (vocab 1024) for the demo's data
    model = trained(tmp_path / "run", f"--config.model.path={folder}", "--config.eval.task_file=None", *variant)
    ids, mask, positions = batch()
    expected = jax_logits(model, ids, mask)

    export.export(str(tmp_path / "run"), str(tmp_path / "adapter"), format="peft")
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert {"qkv_proj", "gate_up_proj"} <= set(config["target_modules"]) and "q_proj" not in config["target_modules"]
    # One rank for every module (qkv_proj's three rank-8 parts; the others padded with zeros) and one
    # lora_alpha / r: readers that ignore rank/alpha patterns (llama.cpp, older vLLM) read it the same.
    assert config["r"] == 3 * 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    got = torch_logits(with_adapter, ids, mask, positions)
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4
