"""Train-step compile time vs depth (scanned layers), and steady-state steps/s, as JSON.

    python benchmarks/train_compile.py --layers 2 32 --out benchmarks/results/DATE-cpu-train-compile.json

Scanning the layers compiles one layer body however deep the model is, so 32 layers should compile
in about the time of 2. steps/s is measured after compilation, synchronized, on the given batch.
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
from jaxft import optim, step
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import train_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def measure(num_layers: int, hidden: int, batch: int, seq: int, steps: int, remat: str) -> dict:
    hf_config = {"model_type": "llama", "vocab_size": 128, "hidden_size": hidden, "intermediate_size": hidden * 3 // 2,
                 "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "max_position_embeddings": 512}
    model = jaxft.init_random(hf_config)
    model_def, params, frozen = step.split_model(model, remat=remat)
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    data = {k: jnp.asarray(v) for k, v in train_batch(128, batch=batch, length=seq).items()}
    jitted = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss(), step.StepConfig(remat=remat)),
                     donate_argnums=0)
    start = time.perf_counter()
    compiled = jitted.lower(state, data).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    return {"num_layers": num_layers, "params": sum(x.size for x in jax.tree.leaves((params, frozen))),
            "compile_seconds": compile_seconds, "steps_per_second": steps / seconds,
            "tokens_per_second": steps * batch * seq / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--out")
    args = parser.parse_args()
    runs = [measure(n, args.hidden, args.batch, args.seq, args.steps, args.remat) for n in args.layers]
    result = {"benchmark": "train_compile", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "hidden": args.hidden,
              "batch": args.batch, "seq": args.seq, "remat": args.remat, "runs": runs,
              "compile_ratio_deepest_vs_shallowest": runs[-1]["compile_seconds"] / runs[0]["compile_seconds"]}
    emit(result, args.out)


if __name__ == "__main__":
    main()
