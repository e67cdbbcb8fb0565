"""QLoRA runs end to end on the bundled demo: nf4 learns the 48 facts, exports load in transformers
and PEFT, the int8 variant trains and exports, and a resumed QLoRA run is exact."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxft import config as config_lib
from jaxft import export, sharding, train
from jaxft import run as run_lib
from jaxft.demo import MODEL_DIR
from jaxft.testing import demo_batch, torch_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def demo_config(workdir, *overrides):
    return config_lib.load(DEMO, [f"--config.workdir={workdir}", "--config.checkpoint.async_save=False", *overrides])


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """The demo as it ships (LoRA r8, 60 steps), on an NF4 base: (workdir, summary, seconds)."""
    workdir = str(tmp_path_factory.mktemp("qlora") / "nf4")
    started = time.perf_counter()
    summary = train.train(demo_config(workdir, "--config.model.quantize=nf4"))
    return workdir, summary, time.perf_counter() - started


def batch():
    return demo_batch(["The river runs past the old mill", "Q: Where does Hialan Riareal live?\nA:"])


def jaxft_logits(workdir):
    """Logits of the run's own model: quantized base + unmerged float32 adapters."""
    trained = run_lib.restore(workdir)
    ids, mask, _ = batch()
    return np.asarray(trained.model()(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), trained


def test_nf4_qlora_learns_the_demo_facts(nf4_run):
    workdir, summary, seconds = nf4_run
    before, after = summary["task"]["before"]["exact_match"], summary["task"]["after"]["exact_match"]
    print(f"nf4 QLoRA demo: exact match {before:.2f} → {after:.2f}, eval loss {summary['eval_loss']:.4f}, "
          f"{seconds:.1f} s wall ({summary['seconds']:.1f} s in the loop)")
    assert after >= 0.95
    # Only the adapters train (and have optimizer moments); the NF4 base is frozen storage.
    run, _ = run_lib.restore_training(workdir)
    assert all(".adapter." in p for p in run.state.params)
    assert run.state.frozen["model.layers.self_attn.q_proj.weight.codes"].dtype == jnp.uint8
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
    assert moments and all(jnp.issubdtype(x.dtype, jnp.floating) for x in moments)
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in run.state.params.values())  # Adam: m and v


def test_nf4_merged_export_loads_in_transformers_with_the_run_logits(nf4_run, tmp_path):
    workdir = nf4_run[0]
    expected, _ = jaxft_logits(workdir)
    ids, mask, positions = batch()
    valid = mask.astype(bool)

    # float32 export (the demo's model.dtype): the dequantized W is the same float32 number in both,
    # so only the merge W + s·BA rounds (once, in float32): the usual 1e-4 of the LoRA export test.
    export.export(workdir, str(tmp_path / "fp32"), format="hf")
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    fp32_diff = np.abs(torch_logits(fp32, ids, mask, positions) - expected)[valid].max()
    assert fp32_diff <= 1e-4

    # bfloat16 export, loaded in float32 so that only the weight rounding differs: every weight is
    # rounded to 8 significant bits (relative error ≤ 2^-9 ≈ 0.2%); those errors are independent and
    # mostly average out in each dot product, so logits move by a fraction of a percent of their range.
    # The bound, 1% of max |logit| (~5x the unit roundoff on the largest logit), leaves room for 4
    # layers of growth; greedy tokens agree wherever the top two logits are not within that margin.
    export.export(workdir, str(tmp_path / "bf16"), format="hf", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    got = torch_logits(bf16, ids, mask, positions)
    bf16_diff = np.abs(got - expected)[valid].max()
    scale = np.abs(expected[valid]).max()
    print(f"nf4 export vs the QLoRA model: fp32 max |Δlogit| {fp32_diff:.2e}; bf16 {bf16_diff:.2e} "
          f"({bf16_diff / scale:.2%} of max |logit| {scale:.1f})")
    assert bf16_diff <= 0.01 * scale
    top2 = np.sort(expected, -1)[..., -2:]
    clear = valid & (top2[..., 1] - top2[..., 0] > 2 * bf16_diff)
    assert np.array_equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_nf4_peft_export_is_for_the_original_base(nf4_run, tmp_path):
    import peft

    workdir = nf4_run[0]
    export.export(workdir, str(tmp_path / "peft"), format="peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == MODEL_DIR
    assert "quantization_config" not in adapter_config
    # The adapters on the unquantized base, in jaxft and in PEFT, agree as in the plain LoRA export test.
    trained = run_lib.restore(workdir)
    dense_config = config_lib.from_plain(run_meta(workdir)["config"])
    dense_config.model.quantize = "none"
    dense = run_lib.restore(workdir, config=dense_config)  # the same adapters on the unquantized base
    model = dense.model_def.merge(trained.params, dense.frozen)
    ids, mask, positions = batch()
    expected = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert np.abs(torch_logits(with_adapter, ids, mask, positions) - expected)[mask.astype(bool)].max() <= 1e-4


def run_meta(workdir):
    from jaxft import checkpoint as ckpt_lib

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    return checkpointer.read_meta(checkpointer.steps()[-1])


def test_int8_qlora_trains_and_exports(tmp_path):
    workdir = str(tmp_path / "int8")
    summary = train.train(demo_config(workdir, "--config.model.quantize=int8", "--config.train.steps=3",
                                      "--config.train.warmup_steps=0", "--config.train.learning_rate=0.05",
                                      "--config.eval.task_file=None"))
    assert summary["step"] == 3
    losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]
    assert losses[-1] < losses[0]
    expected, run = jaxft_logits(workdir)
    assert run.frozen["model.layers.mlp.down_proj.weight.codes"].dtype == jnp.int8
    export.export(workdir, str(tmp_path / "hf"), format="hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask, positions = batch()
    assert np.abs(torch_logits(merged, ids, mask, positions) - expected)[mask.astype(bool)].max() <= 1e-4


def test_a_resumed_qlora_run_is_exact(tmp_path):
    """The quantized base is not checkpointed: it is re-quantized from the base folder on resume,
    deterministically, so 2 + 2 resumed steps equal 4 straight ones bit for bit."""
    overrides = ["--config.model.quantize=nf4", "--config.train.steps=4", "--config.train.warmup_steps=1",
                 "--config.checkpoint.every=2", "--config.eval.task_file=None", "--config.lora.dropout=0.1"]
    workdir = str(tmp_path / "run")
    train.train(demo_config(workdir, *overrides))
    straight = run_lib.restore(workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if killed right after the step-2 save
    assert train.train(demo_config(workdir, *overrides))["resumed_from"] == 2
    resumed = run_lib.restore(workdir)
    assert resumed.step == 4
    for path, value in straight.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.params[path]), np.asarray(value), err_msg=path)
