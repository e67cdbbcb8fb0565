"""Rollout throughput: sampled tokens/s of jaxft's KV-cache generator vs transformers' generate (what
TRL's GRPOTrainer samples with when vLLM is off), on the same shapes, prompts and budget.

    python benchmarks/rollout.py --preset small --batch 32 --prompt 32 --new 32 --out benchmarks/results/DATE-cpu-rollout.json

Random weights of the preset (benchmarks/train_throughput.py PRESETS), --batch prompts of --prompt
random tokens, --new tokens sampled at temperature 1 with no EOS (every row runs the whole budget),
after --warmup runs (compile). Prints one JSON object with both sides and the ratio.
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
from train_throughput import PRESETS, hf_config_for  # noqa: E402


def jaxft_side(args, hf_config, prompts) -> dict:
    import jax

    import jaxft
    from jaxft.generate import generate

    model = jaxft.init_random(hf_config, dtype=args.dtype)
    run = lambda seed: generate(model, prompts, args.new, eos_id=-1, temperature=1.0, seed=seed)  # noqa: E731
    for i in range(args.warmup):
        run(i)
    start = time.perf_counter()
    for i in range(args.runs):
        out = run(100 + i)
    seconds = (time.perf_counter() - start) / args.runs
    return {"framework": "jaxft", "device": jax.devices()[0].device_kind, "seconds": seconds,
            "tokens_per_second": sum(len(o) for o in out) / seconds}


def transformers_side(args, hf_config, prompts) -> dict:
    import torch
    import transformers

    spec = dict(hf_config)
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.tensor(prompts)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                                  do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)

    for i in range(args.warmup):
        run(i)
    start = time.perf_counter()
    for i in range(args.runs):
        out = run(100 + i)
    seconds = (time.perf_counter() - start) / args.runs
    return {"framework": "transformers", "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "seconds": seconds, "tokens_per_second": (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    hf_config = hf_config_for(args.preset)
    prompts = np.random.RandomState(0).randint(1, hf_config["vocab_size"], (args.batch, args.prompt)).tolist()
    ours, theirs = jaxft_side(args, hf_config, prompts), transformers_side(args, hf_config, prompts)
    return emit({"benchmark": "rollout", "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "device": ours["device"],
                 **{k: getattr(args, k) for k in ("preset", "batch", "prompt", "new", "dtype", "runs")},
                 "jaxft": ours, "transformers": theirs,
                 "ratio_tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"]}, args.out)


if __name__ == "__main__":
    main()
