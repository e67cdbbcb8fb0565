"""jaxft vs transformers + PEFT on the same workload, one invocation: both JSONs and the ratios.

    python benchmarks/compare.py --preset llama3.1-8b --mode lora --rank 16 --batch 4 --seq 2048 --remat full \\
        --out benchmarks/results/$(date +%F)-h100-llama8b-lora.json

Each side runs in its own process (no shared allocator or compile cache). Goals (issue 8, one
H100): full FT of llama3.2-1b at seq 2048 >= 55% MFU; LoRA r=16 on llama3.1-8b at seq 2048 >= 2.5x
transformers+PEFT tokens/s at no more peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import emit  # noqa: E402
from train_throughput import parser  # noqa: E402


def run_side(script: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout[out.stdout.index("{"):])


def combine(jaxft_result: dict, baseline: dict) -> dict:
    """compare.py's JSON: both sides and jaxft / baseline ratios of tokens/s and peak memory."""
    ratios = {}
    if "error" not in jaxft_result and "error" not in baseline:
        ratios["tokens_per_second"] = jaxft_result["tokens_per_second"] / baseline["tokens_per_second"]
        if jaxft_result.get("peak_memory_bytes") and baseline.get("peak_memory_bytes"):
            ratios["peak_memory"] = jaxft_result["peak_memory_bytes"] / baseline["peak_memory_bytes"]
    return {"benchmark": "compare", "jaxft": jaxft_result, "transformers_peft": baseline, "ratios": ratios}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    side_argv = [a for i, a in enumerate(argv) if not (a == "--out" or (i and argv[i - 1] == "--out") or a.startswith("--out="))]
    return emit(combine(run_side("train_throughput.py", side_argv), run_side("hf_peft_baseline.py", side_argv)), args.out)


if __name__ == "__main__":
    main()
