"""Training throughput of one jaxft train step: tokens/s, MFU, peak device memory, compile time.

    python benchmarks/train_throughput.py --preset llama3.2-1b --mode full --batch 8 --seq 2048 --remat dots_no_batch
    python benchmarks/train_throughput.py --preset llama3.1-8b --mode lora --rank 16 --batch 4 --seq 2048
    python benchmarks/train_throughput.py --preset tiny --steps 3           # what CI runs
    python benchmarks/train_throughput.py --preset llama3.2-1b --mode lora --objective dpo --batch 4 --seq 1024

--objective dpo: a DPO step (jaxft.tasks.dpo, sigmoid) on --batch pairs, chosen and rejected of
--seq tokens each, so 2 × batch sequences; with LoRA the reference is the base with adapters off
(a second, gradient-free forward), with full fine-tuning precomputed log-probs ride in the batch.
tokens/s counts every sequence; MFU counts the policy's FLOPs, not the reference forward.

Random weights of the preset's real shapes (jaxft.presets; nothing downloaded). Steady state: the
step is compiled, run `--warmup` times, then `--steps` times, synchronized. MFU follows DESIGN.md
(jaxft.metrics.model_flops_per_token ÷ the device's bf16 peak). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

PRESETS = {
    "tiny": {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    # ~34M params: big enough that the step, not the Python around it, is what a CPU comparison times.
    "small": {"model_type": "llama", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408,
              "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4},
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
}


def hf_config_for(preset: str) -> dict:
    from jaxft import presets

    value = PRESETS[preset]
    return dict(presets.HF_CONFIGS[value] if isinstance(value, str) else value)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft import metrics, optim, step
    from jaxft.testing import train_batch

    hf_config = hf_config_for(args.preset)
    if args.quantize != "none":
        if args.mode != "lora":
            raise SystemExit("--quantize (QLoRA) needs --mode lora: the quantized base is frozen")
        model = random_quantized_model(hf_config, args)
    else:
        model = jaxft.init_random(hf_config, dtype=args.param_dtype, compute_dtype=args.compute_dtype)
    trainable = lambda path, v: True  # noqa: E731
    if args.mode == "lora":
        from jaxft.peft import lora

        lora.apply_lora(model, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="all-linear"))
        trainable = lora.is_lora_param
    from jaxft.models.attention import set_attention_implementation

    attention = set_attention_implementation(model, args.attention)  # "auto" resolved for this device and dtype
    model_def, params, frozen = step.split_model(model, trainable, remat=args.remat)
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5, schedule="constant"), params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    batch = {k: jnp.asarray(v) for k, v in train_batch(hf_config["vocab_size"], batch=args.batch, length=args.seq).items()}
    batch["loss_mask"] = jnp.ones_like(batch["loss_mask"])
    batch["attention_mask"] = jnp.ones_like(batch["attention_mask"])
    batch["positions"] = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))
    batch["segment_ids"] = jnp.ones_like(batch["segment_ids"])
    from jaxft.tasks.causal_lm import NextTokenLoss

    if args.objective == "dpo":
        from jaxft.tasks.dpo import PreferenceLoss  # imports jaxft.data (grain): only when asked
  # --batch pairs: each row is the chosen, the next row (rolled) the rejected
        batch = {k: jnp.stack([v, jnp.roll(v, 1, axis=0)], axis=1) for k, v in batch.items()
                 if k in ("input_ids", "targets", "loss_mask", "attention_mask")}
        batch.update(sequence_mask=batch["attention_mask"].astype(jnp.float32), weight=jnp.ones((args.batch,)),
                     ref_logps=-jnp.ones((args.batch, 2)) * args.seq)
        objective = PreferenceLoss(reference="adapters_off" if args.mode == "lora" else "precomputed",
                                   chunk=args.loss_chunk)
    else:
        objective = NextTokenLoss(chunk=args.loss_chunk)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, objective, step.StepConfig(
        remat=args.remat, grad_accum=args.grad_accum)), donate_argnums=0)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(args.warmup):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(args.steps):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    seconds = (time.perf_counter() - start) / args.steps
    profile = None
    if args.profile:  # a few more steps under the profiler, after the timed ones: the numbers above stay clean
        from profile_summary import summarize

        with jax.profiler.trace(args.profile):
            for _ in range(args.profile_steps):
                state, out = compiled(state, batch)
            jax.block_until_ready((state, out))
        profile = summarize(args.profile)
        profile["steps"] = args.profile_steps
    # Parameters of the model, not of its storage (a quantized weight counts as its dense shape).
    from flax import nnx

    from jaxft.pretrained import flat_params

    dense = flat_params(nnx.eval_shape(lambda: jaxft.init_random(hf_config, dtype=args.param_dtype)))[1]
    total = sum(int(np.prod(v.shape)) for v in dense.values())
    trained = sum(int(np.prod(x.shape)) for x in params.values())
    flops = metrics.model_flops_per_token(total, hf_config["num_hidden_layers"], hf_config["hidden_size"], args.seq,
                                          None if args.mode == "full" else trained)
    tokens_per_second = args.batch * args.seq * (2 if args.objective == "dpo" else 1) / seconds
    device = jax.devices()[0]
    peak = metrics.device_peak_flops(device)
    memory = device.memory_stats() or {}
    return {
        "benchmark": "train_throughput", "framework": "jaxft", "date": time.strftime("%Y-%m-%d"),
        "device": device.device_kind, "backend": jax.default_backend(), "host": platform.node(),
        "jax_version": jax.__version__, **{k: getattr(args, k) for k in ("preset", "mode", "objective", "rank", "batch",
                                                                          "seq", "remat",
                                                                          "attention", "param_dtype", "compute_dtype",
                                                                          "grad_accum", "loss_chunk", "steps", "warmup")},
        "attention_resolved": attention, "params": total, "trainable_params": trained, "flops_per_token": flops,
        "step_seconds": seconds, "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops / peak if peak else None, "device_peak_flops": peak,
        "peak_memory_bytes": memory.get("peak_bytes_in_use"), "compile_seconds": compile_seconds,
        "quantize": args.quantize, "compiled_memory": compiled_memory(compiled), "final_loss": float(out["loss"]),
        **({"profile": profile} if profile else {}),
    }


def compiled_memory(compiled) -> dict | None:
    """XLA's buffer assignment for the step: what it needs on the device whatever ran before it
    (the allocator's peak also counts model init). peak = arguments + outputs - donated + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports one
        return None
    if m is None:
        return None
    fields = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    fields["peak_bytes"] = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
    return fields


def random_quantized_model(hf_config: dict, args):
    """A random model whose decoder Linears are quantized (QLoRA) without the dense model ever on
    the device: each layer of each weight is drawn, quantized and stacked in turn, as
    jaxft.from_pretrained(..., quantize=) does from a checkpoint. Its peak memory is the QLoRA
    run's, not that of a dense bf16 init (16 GB for 8B, over the 16 GiB goal by itself)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxft
    from jaxft.peft import quant
    from jaxft.pretrained import flat_params

    build = lambda: jaxft.init_random(hf_config, dtype=args.param_dtype, compute_dtype=args.compute_dtype)  # noqa: E731
    dense = flat_params(nnx.eval_shape(build))[1]
    graphdef, final = flat_params(nnx.eval_shape(lambda: quant.quantize_model(build(), args.quantize)))
    owners = quant.quantized_parts_of(list(dense), list(final))
    key = jax.random.key(0)
    values = {}

    @jax.jit
    def normal(key, like):
        return (0.02 * jax.random.normal(key, like.shape, jnp.float32)).astype(like.dtype)

    for i, (path, variable) in enumerate(sorted(final.items())):
        if path in values or any(path in parts for parts in owners.values()):
            continue
        like = jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype)
        values[path] = jnp.ones(like.shape, like.dtype) if "norm" in path else normal(jax.random.fold_in(key, i), like)
    for j, (owner, parts) in enumerate(sorted(owners.items())):
        weight = dense[owner]
        layer = jax.ShapeDtypeStruct(tuple(weight.shape[1:]), weight.dtype)
        names = {p: p[len(owner) + 1:] for p in parts}
        targets = tuple((n, jax.sharding.SingleDeviceSharding(jax.devices()[0])) for n in names.values())
        per_layer = []
        for layer_index in range(weight.shape[0]):
            one = quant.quantize_layer(normal(jax.random.fold_in(key, 10_000 * (j + 1) + layer_index), layer),
                                       args.quantize, True, targets)
            per_layer.append(one)
        for p, n in names.items():
            values[p] = jnp.stack([one[n] for one in per_layer])
        del per_layer
    state = nnx.from_flat_state([(tuple(p.split(".")), final[p].replace(value=values[p])) for p in final])
    return nnx.merge(graphdef, state)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--objective", choices=["sft", "dpo"], default="sft",
                   help="dpo: --batch pairs of chosen/rejected sequences (jaxft.tasks.dpo; TRL's DPOTrainer in the baseline)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "jax", "cudnn", "splash"],
                   help="attention implementation (jaxft.models.attention.CHOICES; auto: cudnn on NVIDIA GPU, "
                        "splash on TPU, else xla)")
    p.add_argument("--param-dtype", default="bfloat16")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=0, help="cross-entropy over sequence chunks (0 = whole)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"],
                   help="QLoRA: the decoder Linears stored quantized (needs --mode lora)")
    p.add_argument("--profile", help="after the timed steps, trace --profile-steps more into this folder and "
                                     "report the top ops by time")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
