"""The throughput harness runs on a tiny preset with every field; the MFU arithmetic matches a hand
count; the README table regenerates from the results."""

import json
import os
import subprocess
import sys

import pytest

from jaxft import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"device", "preset", "mode", "batch", "seq", "remat", "attention", "attention_resolved", "params", "trainable_params",
          "flops_per_token", "tokens_per_second", "mfu", "peak_memory_bytes", "compile_seconds", "step_seconds"}


def run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.parametrize("mode,objective", [("full", "sft"), ("lora", "sft"), ("lora", "dpo")])
def test_harness_reports_every_field_on_a_tiny_preset(mode, objective):
    result = run("train_throughput.py", "--preset", "tiny", "--mode", mode, "--rank", "4", "--steps", "2", "--warmup", "1",
                 "--param-dtype", "float32", "--compute-dtype", "float32", "--objective", objective)
    assert FIELDS <= set(result)
    if objective == "dpo":  # 2 pairs of 64-token completions per step, a step of policy and reference
        assert result["final_loss"] == pytest.approx(0.6931, abs=1e-3) and result["objective"] == "dpo"
    assert result["tokens_per_second"] > 0 and result["compile_seconds"] > 0
    assert result["params"] == 106816  # tiny preset: 2 layers, hidden 64, vocab 256, untied
    assert (result["trainable_params"] < result["params"]) == (mode == "lora")


def test_mfu_arithmetic_matches_a_hand_count():
    # Full FT: 6 N + attention 12·L·d·T / 2.  N=1000, L=2, d=8, T=16 → 6000 + 1536.
    assert metrics.model_flops_per_token(1000, 2, 8, 16) == 6000 + 12 * 2 * 8 * 16 / 2 == 7536
    # LoRA: 4 N (no weight gradients for the frozen base) + 6 N_adapter + attention.
    assert metrics.model_flops_per_token(1000, 2, 8, 16, trainable_params=50) == 4000 + 300 + 1536
    # Llama-3.2-1B-shaped at seq 2048: 6·1.236e9 + 12·16·2048·2048/2 per token.
    assert metrics.model_flops_per_token(1_235_814_400, 16, 2048, 2048) == pytest.approx(7.8175e9, rel=1e-4)
    assert metrics.PEAK_FLOPS["H100"] == 989e12


def test_readme_table_regenerates(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_readme.py"), str(tmp_path / "README.md")],
                   check=True)
    table = (tmp_path / "README.md").read_text()
    assert table == open(os.path.join(ROOT, "benchmarks", "README.md")).read(), "run benchmarks/make_readme.py"
    for name in os.listdir(os.path.join(ROOT, "benchmarks", "results")):
        assert name in table


def test_rollout_benchmark_runs_both_sides():
    result = run("rollout.py", "--preset", "tiny", "--batch", "2", "--new", "3", "--runs", "1")
    assert result["jaxft"]["tokens_per_second"] > 0 and result["transformers"]["tokens_per_second"] > 0
    assert result["ratio_tokens_per_second"] == pytest.approx(
        result["jaxft"]["tokens_per_second"] / result["transformers"]["tokens_per_second"])
