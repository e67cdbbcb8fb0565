"""Mixture-of-experts LoRA train step: grouped (ragged_dot, dropless) vs dense one-hot experts, and
compile time vs depth, as JSON.

    python benchmarks/moe.py --out benchmarks/results/DATE-cpu-moe.json            # the CPU preset
    python benchmarks/moe.py --preset qwen3_30b_a3b --layers 48 --batch 8 --seq 2048  # the full shape (accelerator)

Presets keep Qwen3-30B-A3B's routing (128 experts, top-8: dense does 16× the expert work of grouped);
`qwen3_30b_a3b_cpu` narrows the width and depth so that a loaded CPU runs it in seconds. tokens/s is
measured after compilation, synchronized. `--compile-layers 2 24` also times the train step's
compilation at two depths of the same width: the layers are scanned, so the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

import jaxft
from jaxft import metrics, optim, presets, step
from jaxft.models import moe
from jaxft.peft import lora
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import train_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

PRESETS = {
    "qwen3_30b_a3b": dict(presets.HF_CONFIGS["Qwen/Qwen3-30B-A3B"]),
    "qwen3_30b_a3b_cpu": {**presets.HF_CONFIGS["Qwen/Qwen3-30B-A3B"], "vocab_size": 1024, "hidden_size": 256,
                          "intermediate_size": 512, "moe_intermediate_size": 96, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2},
    "tiny": {**presets.HF_CONFIGS["Qwen/Qwen3-30B-A3B"], "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
             "moe_intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
             "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2},
}


def _setup(hf_config: dict, implementation: str, batch: int, seq: int, rank: int, dtype: str):
    model = jaxft.init_random(hf_config, dtype=dtype)
    moe.set_moe_implementation(model, implementation)
    lora.apply_lora(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank))
    model_def, params, frozen = step.split_model(model, lora.is_lora_param)
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4), params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    data = {k: jnp.asarray(v) for k, v in train_batch(hf_config["vocab_size"], batch=batch, length=seq).items()}
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss(router_aux_loss_coef=0.001)),
                         donate_argnums=0)
    return state, data, train_step


def compile_seconds(hf_config: dict, num_layers: int, batch: int = 2, seq: int = 16, rank: int = 4) -> float:
    """Seconds to lower and compile the LoRA train step of `hf_config` at `num_layers` layers."""
    state, data, train_step = _setup({**hf_config, "num_hidden_layers": num_layers}, "grouped", batch, seq, rank,
                                     "float32")
    start = time.perf_counter()
    train_step.lower(state, data).compile()
    return time.perf_counter() - start


def throughput(hf_config: dict, implementation: str, batch: int, seq: int, steps: int, rank: int, dtype: str) -> dict:
    state, data, train_step = _setup(hf_config, implementation, batch, seq, rank, dtype)
    start = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_time = time.perf_counter() - start
    state, out = compiled(state, data)  # warm-up
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, data)
    jax.block_until_ready((state, out))
    seconds = (time.perf_counter() - start) / steps
    shapes = {p: tuple(x.shape) for p, x in {**state.params, **state.frozen}.items()}
    total, active = moe.param_counts(shapes, hf_config["num_experts_per_tok"], hf_config["num_experts"])
    trainable = moe.param_counts({p: tuple(x.shape) for p, x in state.params.items()}, hf_config["num_experts_per_tok"],
                                 hf_config["num_experts"])[1]
    flops = metrics.model_flops_per_token(active, hf_config["num_hidden_layers"], hf_config["hidden_size"], seq, trainable)
    tokens_per_second = batch * seq / seconds
    peak = metrics.device_peak_flops()
    return {"implementation": implementation, "compile_seconds": compile_time, "step_seconds": seconds,
            "tokens_per_second": tokens_per_second, "params": total, "active_params": active,
            "flops_per_token": flops, "mfu": tokens_per_second * flops / peak if peak else None,
            "final_loss": float(out["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3_30b_a3b_cpu", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--implementations", nargs="+", default=list(moe.IMPLEMENTATIONS))
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[2, 24])
    parser.add_argument("--out")
    args = parser.parse_args()
    hf_config = dict(PRESETS[args.preset])
    if args.layers:
        hf_config["num_hidden_layers"] = args.layers
    runs = [throughput(hf_config, name, args.batch, args.seq, args.steps, args.rank, args.dtype)
            for name in args.implementations]
    result = {"benchmark": "moe", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "preset": args.preset,
              "num_layers": hf_config["num_hidden_layers"], "batch": args.batch, "seq": args.seq, "rank": args.rank,
              "dtype": args.dtype, "runs": runs}
    by_name = {r["implementation"]: r for r in runs}
    if {"grouped", "dense"} <= set(by_name):
        result["grouped_vs_dense_tokens_per_second"] = (by_name["grouped"]["tokens_per_second"]
                                                        / by_name["dense"]["tokens_per_second"])
    if args.compile_layers:
        times = {n: compile_seconds(hf_config, n) for n in args.compile_layers}
        result["compile_seconds_by_layers"] = times
        result["compile_ratio_deepest_vs_shallowest"] = times[max(times)] / times[min(times)]
    emit(result, args.out)


if __name__ == "__main__":
    main()
