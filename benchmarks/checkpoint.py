"""Checkpoint save/restore time and export peak host memory on the ~1 GB Llama-shaped checkpoint.

    python benchmarks/checkpoint.py --out benchmarks/results/DATE-cpu-checkpoint.json

Full fine-tuning state of the benchmarks/load.py model (bf16 params, AdamW moments): time to save
it with jaxft.checkpoint (async write, until committed) and to restore it; then an HF export
(`save_pretrained`, the same writer `jaxft export --format hf` uses) of the loaded model, with its
peak RSS above what the process held before (VmHWM reset, Linux). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load as load_bench  # noqa: E402  (the same checkpoint shapes)
from common import emit  # noqa: E402


def measure_checkpoint(folder: str, workdir: str) -> dict:
    import jax

    import jaxft
    from jaxft import checkpoint, optim, sharding, step

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = jaxft.from_pretrained(folder, dtype="bfloat16", mesh=mesh)
    model_def, params, frozen = step.split_model(model)
    optimizer = optim.make_optimizer(optim.OptimConfig(), params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    saved = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    saved_bytes = sum(x.nbytes for x in jax.tree.leaves(saved))
    manager = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, keep_best=0, async_save=True)
    start = time.perf_counter()
    manager.save(1, saved, {}, {"bench": True}, force=True)
    blocking = time.perf_counter() - start
    manager.wait()
    save_seconds = time.perf_counter() - start
    shardings = jax.tree.map(lambda x: x.sharding, saved)
    start = time.perf_counter()
    _, restored, _, _ = manager.restore(checkpoint.abstract_target(saved, shardings), 1)
    jax.block_until_ready(restored)
    restore_seconds = time.perf_counter() - start
    manager.close()
    return {"state_bytes": saved_bytes, "save_blocking_seconds": blocking, "save_seconds": save_seconds,
            "restore_seconds": restore_seconds, "save_gb_per_s": saved_bytes / save_seconds / 1e9,
            "restore_gb_per_s": saved_bytes / restore_seconds / 1e9}


def measure_export(folder: str, out: str) -> dict:
    import jax

    import jaxft

    model = jaxft.from_pretrained(folder, dtype="bfloat16")
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    load_bench._reset_peak_rss()
    before = load_bench._rss("VmRSS")
    start = time.perf_counter()
    jaxft.save_pretrained(model, out, max_shard_size=256 * 2**20)
    seconds = time.perf_counter() - start
    return {"export_seconds": seconds, "export_rss_before_bytes": before,
            "export_peak_rss_bytes": load_bench._rss("VmHWM"),
            "export_overhead_bytes": load_bench._rss("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--out")
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    parser.add_argument("--_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._mode:
        fn = {"checkpoint": measure_checkpoint, "export": measure_export}[args._mode]
        print(json.dumps(fn(*args._args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "base")
        os.makedirs(folder)
        info = load_bench.write_checkpoint(folder, load_bench.layers_for_size(args.size_gb * 1e9), 4)
        results = {}
        for mode, extra in (("checkpoint", [os.path.join(tmp, "run")]), ("export", [os.path.join(tmp, "export")])):
            proc = subprocess.run([sys.executable, __file__, "--_mode", mode, "--_args", folder, *extra],
                                  check=True, capture_output=True, text=True)
            results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    import jax

    result = {"benchmark": "checkpoint", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": os.cpu_count(), "device": jax.devices()[0].device_kind, **info, **results,
              "export_overhead_vs_largest_tensor": results["export_overhead_bytes"] / info["largest_tensor_bytes"]}
    emit(result, args.out)


if __name__ == "__main__":
    main()
