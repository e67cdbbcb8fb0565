"""What train.freeze_first_layers costs: the gradient's matmul FLOPs, XLA's memory plan, optimizer
state and step time of one train step with the first N layers frozen, against every layer trained
and against the previous implementation (all layers differentiated, frozen rows masked afterwards).

    python benchmarks/freeze_cost.py --layers 8 --freeze 4 --out benchmarks/results/$(date +%F)-cpu-freeze-cost.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def measure(hf_config, args, split: int, optimizer_rows: int, trainable) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft import metrics, optim, step
    from jaxft.tasks.causal_lm import NextTokenLoss
    from jaxft.testing import train_batch

    model_def, params, frozen = step.split_model(jaxft.init_random(hf_config), trainable)
    optimizer = optim.make_optimizer(optim.OptimConfig(schedule="constant"), params, model_def.axes, optimizer_rows)
    state = step.init_state(params, frozen, optimizer)
    batch = {k: jnp.asarray(v) for k, v in train_batch(hf_config["vocab_size"], batch=args.batch, length=args.seq).items()}
    objective = NextTokenLoss()
    loss_fn = step.make_loss_fn(model_def, objective, split)
    grad = jax.grad(lambda p: loss_fn(p, frozen, batch, jnp.float32(1.0), jax.random.key(0))[0])
    train_step = jax.jit(step.make_train_step(model_def, optimizer, objective, step.StepConfig(freeze_first_layers=split)),
                         donate_argnums=0)
    compiled = train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, out = compiled(state, batch)
    jax.block_until_ready(out)
    return {"gradient_matmul_flops": metrics.matmul_flops(jax.make_jaxpr(grad)(params).jaxpr),
            "temp_bytes": int(memory.temp_size_in_bytes), "optimizer_state_bytes": int(opt_bytes),
            "step_seconds": (time.perf_counter() - start) / args.steps}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--freeze", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import jax

    hf_config = {"model_type": "llama", "vocab_size": 2048, "hidden_size": args.hidden,
                 "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 8,
                 "num_key_value_heads": 4}
    every = lambda path, v: True  # noqa: E731
    no_embed = lambda path, v: "embed_tokens" not in path  # noqa: E731
    runs = {
        "all_layers_trained": measure(hf_config, args, 0, 0, every),
        # The previous gradient path: every row differentiated, the frozen rows' gradients dropped after.
        "previous_gradient_path": measure(hf_config, args, 0, args.freeze, every),
        "frozen_prefix_split": measure(hf_config, args, args.freeze, args.freeze, every),
        "frozen_prefix_split_embeddings_frozen": measure(hf_config, args, args.freeze, args.freeze, no_embed),
    }
    base = runs["previous_gradient_path"]
    for run in runs.values():
        run["vs_previous"] = {k: run[k] / base[k] for k in ("gradient_matmul_flops", "temp_bytes", "step_seconds")}
    return emit({"benchmark": "freeze_cost", "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
                 "model": hf_config, "freeze_first_layers": args.freeze, "batch": args.batch, "seq": args.seq,
                 "runs": runs, "note": "previous_gradient_path runs today's optimizer (no moments for frozen rows); the "
                 "previous implementation kept moments for every row, i.e. all_layers_trained's optimizer_state_bytes"},
                args.out)


if __name__ == "__main__":
    main()
