"""The accelerator suite runs every part on tiny presets on CPU and writes every field the first
accelerator run will report; its budget skips parts with a note, and a hanging part is killed at
its own timeout instead of eating the budget."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accelerator_suite  # noqa: E402  (imports no jax: the suite's parent process never does)

SIDE_FIELDS = {"device", "preset", "mode", "batch", "seq", "remat", "attention", "tokens_per_second", "mfu",
               "peak_memory_bytes", "compile_seconds", "step_seconds", "compiled_memory"}


def suite(tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"), "--results-dir",
                    str(tmp_path / "results"), *args], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    (path,) = glob.glob(str(tmp_path / "results" / "*-suite.json"))
    return json.load(open(path))


def test_smoke_run_reports_every_part_with_every_field(tmp_path):
    result = suite(tmp_path, "--smoke", "--budget", "1500")
    parts = result["parts"]
    assert list(parts) == list(accelerator_suite.PLAN)
    assert {k: p["status"] for k, p in parts.items()} == {k: "ok" for k in parts}, {k: p.get("note") for k, p in parts.items()}
    assert result["smoke"] and result["backend"] == "cpu" and result["elapsed_seconds"] <= 1500

    tests = parts["attention_tests"]["result"]
    assert tests["skipped"] == 16 and tests["failed"] == tests["errors"] == 0  # the cuDNN tests skip off a GPU
    assert tests["passed"] >= 1 and "JAXFT_TEST_BACKEND=cpu" in tests["command"]

    parity = parts["parity"]["result"]
    assert parity["all_fp32_within_tolerance"] and 1e-4 < parity["worst_bf16_relative"] < 5e-2
    assert {"fp32", "fp32_highest", "bf16"} <= set(parity["cases"][0])

    for name in ("full_ft_1b", "lora_8b"):
        compare = parts[name]["result"]
        assert SIDE_FIELDS <= set(compare["jaxft"]), name
        assert compare["transformers_peft"]["tokens_per_second"] > 0
        assert compare["ratios"]["tokens_per_second"] == pytest.approx(
            compare["jaxft"]["tokens_per_second"] / compare["transformers_peft"]["tokens_per_second"])
        assert compare["best_settings"] in [t["settings"] for t in compare["sweep"] if "tokens_per_second" in t]
    assert len(parts["full_ft_1b"]["result"]["sweep"]) == 2

    qlora = parts["qlora_8b"]["result"]
    assert qlora["quantize"] == "nf4" and qlora["mode"] == "lora" and qlora["batch"] == 1
    assert qlora["peak_memory_measured_bytes"] == qlora["compiled_memory"]["peak_bytes"] > 0  # CPU: XLA's buffer plan

    profile = parts["profile"]["result"]
    assert profile["settings"] == parts["full_ft_1b"]["result"]["best_settings"]
    assert profile["ops"] and 0 < profile["ops"][0]["share"] <= 1 and "all ops" in profile["table"]

    assert [g["part"] for g in result["goals"]] == ["full_ft_1b", "lora_8b", "qlora_8b"]
    assert all(name in result["summary"] for name in parts)
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "Latest suite summary" in readme and result["summary"] in readme
    out = sorted(os.listdir(tmp_path / "out"))
    assert len(out) <= 8 and "suite.log" in out and len(out) == 8  # 6 parts + the suite + the log


def test_budget_skips_parts_with_a_note(tmp_path):
    result = suite(tmp_path, "--smoke", "--budget", "3")
    assert all(p["status"] == "skipped" and "budget" in p["note"] for p in result["parts"].values())
    assert all(g["value"] is None for g in result["goals"])


def test_a_hanging_part_is_killed_at_its_timeout():
    runner = accelerator_suite.Runner(budget=60, env=dict(os.environ), log=lambda m: None)
    started = time.monotonic()
    code, _, _, seconds = runner.run([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '30']);"
                                      " time.sleep(30)"], timeout=2)
    assert code is None and seconds < 10 and time.monotonic() - started < 10
    assert runner.left() > 45  # the budget lost only the part's own timeout


def test_the_lora_pick_respects_the_baseline_memory():
    fast_but_big = {"tokens_per_second": 200.0, "peak_memory_bytes": 11, "settings": ["a"]}
    slower_within = {"tokens_per_second": 150.0, "peak_memory_bytes": 9, "settings": ["b"]}
    baseline = {"peak_memory_bytes": 10}
    assert accelerator_suite.pick_best("lora_8b", [fast_but_big, slower_within], baseline)["settings"] == ["b"]
    assert accelerator_suite.pick_best("full_ft_1b", [fast_but_big, slower_within], baseline)["settings"] == ["a"]
