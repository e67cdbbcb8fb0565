"""Peak host memory of `jaxft export` of a ~1 GB full fine-tuning checkpoint.

    python benchmarks/export_memory.py --out benchmarks/results/DATE-cpu-export-memory.json
    python benchmarks/export_memory.py --compare /path/to/another/jaxft/checkout   # its export too, same checkpoint

Writes the Llama-shaped bf16 base of benchmarks/load.py (~1 GB, with the demo's tokenizer), trains
it with this checkout's `jaxft train` (full fine-tuning, model.dtype=bfloat16, one step of 1 × 32
tokens, so the checkpoint holds the params and both AdamW moments: ~3 GB), then runs `jaxft
export --format hf` in a fresh process per checkout and reports the process's peak RSS
(getrusage's ru_maxrss of the child, which includes the Python + jax runtime, measured alone with
`--config-only` below). Linux/macOS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load as load_bench  # noqa: E402  (the same checkpoint shapes)
from common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_OF_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(command: list[str], cwd: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of `command` run in `cwd` (`python -m jaxft.cli` there imports
    that checkout's jaxft: the current directory comes first on sys.path)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], cwd=cwd, check=True, capture_output=True,
                         text=True)
    kib = int(out.stdout.strip().splitlines()[-1])
    return kib * (1 if sys.platform == "darwin" else 1024), time.perf_counter() - start


def _commit(tree: str) -> str:
    """The checkout's commit, with "+changes" when its working tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--compare", action="append", default=[], help="another jaxft checkout to export with")
    parser.add_argument("--out")
    args = parser.parse_args()
    from jaxft.demo import MODEL_DIR

    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        os.makedirs(base)
        info = load_bench.write_checkpoint(base, load_bench.layers_for_size(args.size_gb * 1e9), 4)
        for name in os.listdir(MODEL_DIR):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(MODEL_DIR, name), base)
        run = os.path.join(tmp, "run")
        train = [sys.executable, "-m", "jaxft.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
                 f"--config.workdir={run}", f"--config.model.path={base}", "--config.model.dtype=bfloat16",
                 "--config.lora.rank=0", "--config.train.steps=1", "--config.train.warmup_steps=0",
                 "--config.train.batch_size=1", "--config.data.seq_len=32", "--config.eval.task_file=None",
                 "--config.data.validation=None", "--config.checkpoint.async_save=False"]
        subprocess.run(train, cwd=ROOT, check=True, capture_output=True)
        run_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(run, "checkpoints"))
                               for f in fs)
        runtime, _ = peak_rss([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready()"],
                              ROOT)
        exports = []
        for tree in [ROOT, *args.compare]:
            out = os.path.join(tmp, f"export-{len(exports)}")
            peak, seconds = peak_rss([sys.executable, "-m", "jaxft.cli", "export", "--workdir", run, "--out", out,
                                      "--format", "hf"], os.path.abspath(tree))
            exports.append({"jaxft": "this checkout" if tree == ROOT else "compared", "commit": _commit(tree),
                            "peak_rss_bytes": peak, "seconds": seconds,
                            "peak_rss_over_params": peak / info["checkpoint_bytes"]})
            shutil.rmtree(out)
    import jax

    result = {"benchmark": "export_memory", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": os.cpu_count(), "device": jax.devices()[0].device_kind, **info,
              "run_checkpoint_bytes": run_bytes, "jax_runtime_peak_rss_bytes": runtime, "exports": exports}
    emit(result, args.out)


if __name__ == "__main__":
    main()
