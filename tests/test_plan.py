"""`jaxft plan`: per-device memory from shapes alone, checked against what XLA compiles, and the
preflight that stops `jaxft train` before compiling a run that cannot fit.

What the compiled comparison compares: XLA's memory_analysis() of the compiled train step counts,
per device, `argument` (the donated train state + the batch), `output` (the new state + metrics),
`alias` (outputs written in place into donated arguments: nearly all of `output`) and `temp`
(every other buffer live at the peak: activations, gradients, logits, the backward's scratch).
The step's peak is argument + output - alias + temp, and that is what the plan's total estimates
(its state rows ≈ argument; activations + logits + gradients + working set ≈ temp).
Measured on 2 CPU cores (XLA:CPU), demo model, batch 8 × 64 on one device, estimate/compiled:
remat none 1.02, full 1.01, dots 1.04, dots_no_batch 1.06; batch 32: 1.03; grad_accum 2: 1.00;
full fine-tuning 1.07; data=8: 0.96; fsdp=8: 1.06; fsdp=4 × tensor=2: 0.85. bfloat16 compute is
the exception on CPU (0.65): XLA:CPU computes bf16 in float32, TPUs and GPUs do not.
"""

import os

import pytest

from jaxft import cli, plan
from jaxft import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
GIB = 2**30
# Llama-3.1-8B, LoRA r16 (all linear), bf16 base, one v5e chip: the Colab case. Shapes from
# jaxft.presets: nothing is downloaded.
LLAMA_8B_ON_ONE_CHIP = [f"{CONFIGS}/llama3_8b_lora.py:h100", "--config.mesh.shape={'data': 1}",
                        "--config.train.batch_size=1", "--config.train.grad_accum=1", "--config.data.seq_len=2048"]


def _load(spec, *overrides):
    return config_lib.load(spec, list(overrides))


def test_llama3_8b_bf16_lora_does_not_fit_a_v5e_and_the_advice_does(capsys):
    config = _load(*LLAMA_8B_ON_ONE_CHIP)
    result = plan.plan(config, device="v5e")
    est = result.estimate
    # The bf16 base alone is 8.03e9 × 2 bytes ≈ 14.96 GiB of the chip's 16.
    assert abs(est.get("frozen base") - 8.03e9 * 2) < 0.01 * 8.03e9 * 2
    assert 0 < est.get("trainable") < 0.2 * GIB  # 42M float32 adapter params
    assert est.get("optimizer state") == pytest.approx(2 * est.get("trainable"), rel=0.01)  # AdamW's two moments
    assert est.get("logits") == 2048 * 128256 * 4  # [1, 2048, V] float32
    assert est.total > 16 * GIB and result.fits is False
    # The nearest fix quantizes the base (micro-batch is 1 and remat already full, so nothing else can).
    assert result.advice and result.advice.get("model.quantize") in ("int8", "nf4")
    assert result.tried[-1][1] <= 16 * GIB

    assert cli.main(["plan", "--config", *LLAMA_8B_ON_ONE_CHIP[:1], "--device", "v5e", *LLAMA_8B_ON_ONE_CHIP[1:]]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "nearest settings that fit: --config.model.quantize=" in out
    assert "14.96" in out  # the frozen base row, in GiB


def test_llama3_8b_qlora_nf4_fits_a_v5e(capsys):
    assert cli.main(["plan", "--config", *LLAMA_8B_ON_ONE_CHIP[:1], "--device", "v5e", *LLAMA_8B_ON_ONE_CHIP[1:],
                     "--config.model.quantize=nf4"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "NOT" not in out
    result = plan.plan(_load(*LLAMA_8B_ON_ONE_CHIP, "--config.model.quantize=nf4"), device="v5e")
    # ~7B Linear params at 0.5 byte + absmax, the bf16 embeddings and head (2 × 1.05 GB) unquantized.
    assert 4.5 * GIB < result.estimate.get("frozen base") < 6 * GIB
    assert result.fits and result.estimate.total < 16 * GIB


def test_fsdp_divides_the_base_over_the_mesh():
    one = plan.plan(_load(*LLAMA_8B_ON_ONE_CHIP), advise=False)
    eight = plan.plan(_load(*LLAMA_8B_ON_ONE_CHIP, "--config.mesh.shape={'fsdp': 8}", "--config.train.batch_size=8"),
                      advise=False)
    assert one.memory is None and one.fits is None  # CPU: no memory to compare with unless told
    assert eight.estimate.get("frozen base") == pytest.approx(one.estimate.get("frozen base") / 8, rel=0.01)
    assert eight.estimate.get("activations") == pytest.approx(one.estimate.get("activations"), rel=0.05)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_demo_estimate_is_within_20_percent_of_the_compiled_step(remat):
    config = _load(f"{CONFIGS}/demo.py", "--config.mesh.shape={'data': 1}", f"--config.train.remat={remat}")
    result = plan.plan(config, compile=True, num_devices=1)
    compiled = result.compiled
    assert compiled["alias"] > 0.9 * compiled["output"]  # the state is donated: updated in place
    assert compiled["estimate"] == result.estimate.total  # no --device: the estimate is for this backend
    assert 0.8 < result.estimate.total / compiled["peak"] < 1.2, result.table()
    # The state rows estimate XLA's arguments (the batch, ~10 KB, aside).
    state = sum(result.estimate.get(r) for r in ("frozen base", "trainable", "optimizer state"))
    assert state == pytest.approx(compiled["argument"], rel=0.01)


def test_train_stops_before_compiling_a_run_that_cannot_fit(tmp_path, monkeypatch, capsys):
    from jaxft import step

    def never(*args, **kwargs):
        raise AssertionError("the preflight should have stopped the run before compiling")

    monkeypatch.setattr(step, "compile_train_step", never)
    workdir = tmp_path / "run"
    # On the suite's 8 CPU devices the demo needs ~10 MiB per device; say a device has 7 MiB.
    rc = cli.main(["train", "--config", f"{CONFIGS}/demo.py", f"--config.workdir={workdir}",
                   "--config.train.device_memory_gb=0.007"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit" in err and "does NOT fit" in err and "train.preflight=False" in err
    assert "nearest settings that fit: --config.train.remat=" in err  # micro-batch is 1 already: remat it is
    assert not workdir.exists()  # stopped before anything was written, downloaded or compiled
    # The advice fits; the original does not.
    config = _load(f"{CONFIGS}/demo.py", "--config.train.device_memory_gb=0.007", "--config.train.remat=full")
    assert plan.preflight(config, _mesh()).fits
    config.train.remat = "none"
    with pytest.raises(plan.DoesNotFitError):
        plan.preflight(config, _mesh())


def _mesh():
    from jaxft import sharding

    return sharding.make_mesh({"data": -1})


def test_classification_plan_counts_its_head_and_matches_the_compiled_step():
    """task=classification: the plan is of the run that executes (jaxft.run builds both): the
    `score` head [4, 128] trains whole with its AdamW moments, and no vocabulary logits are kept."""
    overrides = ["--config.mesh.shape={'data': 1}"]
    classify = plan.plan(_load(f"{CONFIGS}/classify_demo.py", *overrides), compile=True, num_devices=1)
    as_lm = plan.plan(_load(f"{CONFIGS}/classify_demo.py", *overrides, "--config.task=causal_lm"), num_devices=1)
    head = 4 * 128 * 4  # float32; the same LoRA adapters otherwise (all-linear but the heads)
    assert classify.estimate.get("trainable") - as_lm.estimate.get("trainable") == head
    assert classify.estimate.get("optimizer state") - as_lm.estimate.get("optimizer state") == 2 * head
    assert classify.estimate.get("logits") == 0 < as_lm.estimate.get("logits")
    compiled = classify.compiled
    print(f"\n[plan, classify_demo] estimate {classify.estimate.total / 2**20:.2f} MiB, compiled "
          f"{compiled['peak'] / 2**20:.2f} MiB")
    assert 0.8 < classify.estimate.total / compiled["peak"] < 1.2, classify.table()
    state = sum(classify.estimate.get(r) for r in ("frozen base", "trainable", "optimizer state"))
    assert state == pytest.approx(compiled["argument"], rel=0.01)


@pytest.mark.parametrize("name", ["dpo_demo.py", "reward_demo.py"])
def test_preference_plans_match_the_compiled_step(name):
    """task=dpo / reward: the plan traces the objective on [B, 2, T] pairs (2B sequences; DPO's
    reference forward under stop_gradient keeps nothing for the backward pass)."""
    result = plan.plan(_load(f"{CONFIGS}/{name}", "--config.mesh.shape={'data': 1}"), compile=True, num_devices=1)
    print(f"\n[plan, {name}] estimate {result.estimate.total / 2**20:.2f} MiB, compiled {result.compiled['peak'] / 2**20:.2f} MiB")
    assert 0.8 < result.estimate.total / result.compiled["peak"] < 1.2, result.table()
    if name == "dpo_demo.py":
        assert "logits [32, 32, 1024]" in result.table()  # 16 pairs: 32 sequences
        full = plan.plan(_load(f"{CONFIGS}/{name}", "--config.mesh.shape={'data': 1}", "--config.lora.rank=0"),
                         num_devices=1)
        # Full fine-tuning: the frozen reference copy is as big as the trained params.
        assert full.estimate.get("frozen base") == full.estimate.get("trainable")


def test_context_parallelism_divides_the_sequence_activations():
    """configs/llama3_8b_lora_32k.py: context=8 splits the 32k sequence's activations (and the base,
    sharded along embed) 8 ways; the v5e-8 plan fits, where one chip could not hold the activations."""
    spec = f"{CONFIGS}/llama3_8b_lora_32k.py"
    eight = plan.plan(_load(spec), device="v5e", advise=False)
    one = plan.plan(_load(spec, "--config.mesh.shape={'data': 1}"), device="v5e", advise=False)
    assert eight.estimate.get("activations") == pytest.approx(one.estimate.get("activations") / 8, rel=0.02)
    assert eight.estimate.get("frozen base") == pytest.approx(one.estimate.get("frozen base") / 8, rel=0.01)
    assert eight.fits and one.fits is False
    assert "mesh context=8" in eight.table() and "/ context 8" in eight.table()
