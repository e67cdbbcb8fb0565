"""benchmarks/load.py runs end to end on a tiny preset and reports every field it promises."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_load_benchmark_reports_throughput_and_memory(tmp_path):
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "load.py"), "--preset", "tiny", "--size-gb", "0.01",
                    "--files", "3", "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["files"] >= 3 and result["preset"] == "tiny"  # sharded, with an index
    for field in ("raw_read_gb_per_s", "load_gb_per_s", "load_vs_raw_read", "load_vs_raw_read_and_device_put",
                  "peak_rss_bytes", "overhead_vs_largest_tensor", "device", "num_layers"):
        assert field in result, field
    assert result["load_gb_per_s"] > 0 and result["raw_read_gb_per_s"] > 0
    # The loaded parameters are exactly the checkpoint's bytes (bf16 in, bf16 out).
    assert result["param_bytes"] == result["checkpoint_bytes"]
    assert abs(result["checkpoint_bytes"] - 0.01e9) < 0.5 * 0.01e9
