"""Checkpoint load speed and host memory: jaxft.from_pretrained vs a raw read of the same files.

    python benchmarks/load.py                      # ~1 GB bf16 Llama-shaped checkpoint, 4 files
    python benchmarks/load.py --size-gb 0.05 --out benchmarks/results/x.json

Writes a random Llama-shaped checkpoint (sharded safetensors + index), reads every file once to
warm the page cache, then times (a) a raw read of all files into memory and (b) `from_pretrained`
(until every parameter is ready on the device), each in a fresh process. Peak host RSS of the load
is measured in its process: `overhead_bytes` is what the load held beyond the interpreter's baseline
and the loaded parameters themselves (on CPU the "device" is host RAM, so the parameters count
there too). Prints one JSON object.
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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

# Llama-shaped presets: hidden, intermediate, heads, kv heads, vocab.
PRESETS = {"llama-2048": (2048, 5632, 16, 4, 32000), "tiny": (128, 256, 4, 2, 1000)}
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = PRESETS["llama-2048"]


def llama_config(num_layers: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": num_layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def tensor_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def layers_for_size(size_bytes: float) -> int:
    fixed = sum(np.prod(s) for s in tensor_shapes(0).values()) * 2
    per_layer = (sum(np.prod(s) for s in tensor_shapes(1).values()) * 2) - fixed
    return max(1, int(round((size_bytes - fixed) / per_layer)))


def write_checkpoint(folder: str, num_layers: int, num_files: int) -> dict:
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxft import hf

    shapes = tensor_shapes(num_layers)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    shards = hf.plan_shards([(k, int(np.prod(s)) * 2) for k, s in shapes.items()], -(-total // num_files))
    names = hf.shard_file_names(len(shards))
    rng = np.random.default_rng(0)
    weight_map = {}
    for name, keys in zip(names, shards):
        tensors = {k: (rng.standard_normal(shapes[k], np.float32) * 0.02).astype(ml_dtypes.bfloat16) for k in keys}
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    hf.write_index(folder, weight_map, total)
    hf.write_json(folder, "config.json", llama_config(num_layers))
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    return {"files": len(names), "checkpoint_bytes": total, "largest_tensor_bytes": largest}


def raw_read(folder: str, fresh: bool, huge_pages: bool = False) -> float:
    """Seconds to read every weight file into memory.

    fresh=True: into newly allocated memory, all held until the end, as a loader must (the loaded
    weights need memory of their own; on this VM first-touching pages costs more than the copy).
    huge_pages: that fresh memory from the allocator jaxft's CPU loader uses (hf.host_buffer:
    transparent huge pages), so the comparison is not won by the allocator alone.
    fresh=False: into one reused, already-touched buffer: the pure page-cache copy speed.
    """
    from jaxft.hf import host_buffer

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    reused = None if fresh else bytearray(max(os.path.getsize(os.path.join(folder, f)) for f in files))
    held = []
    start = time.perf_counter()
    for name in files:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        buffer = (host_buffer((size,), np.uint8) if huge_pages else np.empty(size, np.uint8)) if fresh else reused
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buffer)
            while (n := f.readinto(view)):
                view = view[n:]
        held.append(buffer)
    seconds = time.perf_counter() - start
    del held
    return seconds


def measure_load(folder: str) -> dict:
    """Runs in a fresh process: baseline RSS after imports, then from_pretrained and its peak RSS."""
    import jax
    from flax import nnx

    import jaxft

    jax.devices()  # start the backend before taking the baseline
    _reset_peak_rss()
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    model = jaxft.from_pretrained(folder, dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    param_bytes = sum(p.nbytes for p in params)
    return {"load_seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": _rss("VmHWM"),
            "param_bytes": param_bytes, "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


def measure_floor(folder: str) -> dict:
    """Runs in a fresh process: raw read into fresh memory, then device_put of those bytes.

    The floor of a loader that reads into host memory and then copies into device buffers (on CPU,
    XLA adopts a numpy buffer without a copy only when it is 64-byte aligned, which np.fromfile's
    are not; jaxft's CPU loader reads into aligned buffers and skips this copy).
    """
    import jax

    jax.devices()
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    start = time.perf_counter()
    arrays = []
    for name in files:
        buffer = np.fromfile(os.path.join(folder, name), np.uint8)
        arrays.append(jax.device_put(buffer))
        del buffer
    jax.block_until_ready(arrays)
    return {"read_and_device_put_seconds": time.perf_counter() - start}


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak covers the load alone, not imports."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _in_subprocess(flag: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, __file__, flag, folder], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-2048", help="tensor shapes")
    parser.add_argument("--files", type=int, default=4, help="about this many weight files (split at tensor boundaries)")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temp folder, removed after)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    parser.add_argument("--_floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure_load(args._measure)))
        return
    if args._floor:
        print(json.dumps(measure_floor(args._floor)))
        return

    global HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB
    HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        num_layers = layers_for_size(args.size_gb * 1e9)
        info = write_checkpoint(folder, num_layers, args.files)
        raw_read(folder, fresh=False)  # warm the page cache: all measurements read from memory, not disk
        raw_seconds = min(raw_read(folder, fresh=True) for _ in range(args.repeats))
        huge_seconds = min(raw_read(folder, fresh=True, huge_pages=True) for _ in range(args.repeats))
        warm_seconds = min(raw_read(folder, fresh=False) for _ in range(args.repeats))
        loads = [_in_subprocess("--_measure", folder) for _ in range(args.repeats)]
        best = min(loads, key=lambda r: r["load_seconds"])
        floor_seconds = min(_in_subprocess("--_floor", folder)["read_and_device_put_seconds"] for _ in range(args.repeats))
    size = info["checkpoint_bytes"]
    growth = best["peak_rss_bytes"] - best["baseline_rss_bytes"]
    on_host = best["backend"] == "cpu"  # then the loaded parameters themselves live in host RAM
    overhead = growth - (best["param_bytes"] if on_host else 0)
    result = {
        "benchmark": "load", "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
        "device": best["device"], "backend": best["backend"], "preset": args.preset, "num_layers": num_layers, **info,
        "raw_read_seconds": raw_seconds, "raw_read_gb_per_s": size / raw_seconds / 1e9,
        "raw_read_into_reused_buffer_gb_per_s": size / warm_seconds / 1e9,
        "raw_read_huge_pages_gb_per_s": size / huge_seconds / 1e9,
        "load_seconds": best["load_seconds"], "load_gb_per_s": size / best["load_seconds"] / 1e9,
        "load_vs_raw_read": raw_seconds / best["load_seconds"],
        "load_vs_raw_read_into_reused_buffer": warm_seconds / best["load_seconds"],
        "load_vs_raw_read_huge_pages": huge_seconds / best["load_seconds"],
        "raw_read_and_device_put_seconds": floor_seconds,
        "load_vs_raw_read_and_device_put": floor_seconds / best["load_seconds"],
        "baseline_rss_bytes": best["baseline_rss_bytes"], "peak_rss_bytes": best["peak_rss_bytes"],
        "rss_growth_bytes": growth, "param_bytes": best["param_bytes"], "overhead_bytes": overhead,
        "overhead_vs_largest_tensor": overhead / info["largest_tensor_bytes"],
        "all_load_seconds": [r["load_seconds"] for r in loads],
        "goals": {"load_vs_raw_read": ">= 0.7", "overhead_vs_largest_tensor": "< 2"},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
