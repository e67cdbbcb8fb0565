"""Qwen3-30B-A3B (mixture of experts: 128 experts, top-8; 30.5B params, 3.3B active per token),
LoRA r=8 on attention and on every expert's projections (per expert), seq 2048, with the router's
load-balancing loss as transformers adds it (router_aux_loss_coef 0.001).

Hardware (the ARG):
  v5e-8  (default) TPU v5e-8: experts split 4 ways (expert axis) × 2 (fsdp), so each chip holds 1/8
         of the 61 GB bf16 base
  v5p-8  TPU v5p-8 (95 GB chips): experts split 8 ways, everything else replicated
  h200   one H200 141 GB: the whole bf16 base on one device, micro-batches of 4 accumulated to 16

    jaxft train --config configs/qwen3_moe_30b_a3b_lora.py:h200 --config.data.train=my_data.jsonl
    jaxft plan --config configs/qwen3_moe_30b_a3b_lora.py          # memory per chip, total vs active params

lora.dropout stays 0: PEFT applies expert adapters through its ParamWrapper, which refuses dropout.
"""

from jaxft import config as config_lib


ARGS = ("v5e-8", "v5p-8", "h200")  # the ARG values of `--config FILE:ARG` this file knows (the default needs none)


def get_config(arg: str = "v5e-8"):
    c = config_lib.default_config()
    c.workdir = "workdir/qwen3_moe_30b_a3b_lora"
    c.model.path = "Qwen/Qwen3-30B-A3B"
    c.model.dtype = "bfloat16"  # the frozen base; adapters and their optimizer state stay float32
    c.model.moe_implementation = "grouped"  # dropless ragged_dot experts
    c.data.train = "data/train.jsonl"
    c.data.format = "prompt_completion"
    c.data.seq_len = 2048
    c.data.validation_fraction = 0.02
    c.train.steps = 2000
    c.train.batch_size = 16
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 50
    c.train.remat = "full"
    c.train.loss_chunk = 512  # no [B, T, 151936] float32 logits
    c.train.eval_every = 200
    c.train.router_aux_loss_coef = 0.001  # the model's config.json value
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.checkpoint.every = 200
    if arg == "v5e-8":
        c.mesh.shape = {"expert": 4, "fsdp": 2}
    elif arg == "v5p-8":
        c.mesh.shape = {"expert": 8}
    elif arg == "h200":
        c.mesh.shape = {"data": 1}
        c.train.grad_accum = 4
    else:
        raise ValueError(f"unknown hardware {arg!r}: v5e-8, v5p-8 or h200")
    return c
