"""The same training step in PyTorch: transformers + PEFT, bf16, sdpa attention — the baseline.

    python benchmarks/hf_peft_baseline.py --preset llama3.1-8b --mode lora --rank 16 --batch 4 --seq 2048 --remat full

Same preset shapes (random weights), batch, sequence length and LoRA settings as
train_throughput.py; gradient checkpointing on when --remat is not none (the closest match to
jaxft's remat). --objective dpo: TRL's DPOTrainer computes the loss (its fused LM head, the
reference as the base with adapters off under PEFT, precomputed log-probs in full fine-tuning) on
--batch pairs of --seq-token completions; the optimizer step is the same AdamW. Prints the same
JSON fields.
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from train_throughput import hf_config_for, parser  # noqa: E402


def run(args) -> dict:
    import torch
    import transformers

    from jaxft import metrics

    hf_config = hf_config_for(args.preset)
    model_type = hf_config.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **hf_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.param_dtype]
    with torch.device(device):  # built on the device: an 8B random init on the host alone takes minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    total = sum(p.numel() for p in model.parameters())
    if args.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules="all-linear", lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    loss_of = (lambda: _dpo_loss(model, ids, args)) if args.objective == "dpo" else None

    def train_step():
        if loss_of is not None:
            loss = loss_of()
        else:
            logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        loss = train_step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    trained = sum(p.numel() for p in trainable)
    flops = metrics.model_flops_per_token(total, config.num_hidden_layers, config.hidden_size, args.seq,
                                          None if args.mode == "full" else trained)
    tokens_per_second = args.batch * args.seq * (2 if args.objective == "dpo" else 1) / seconds
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in metrics.PEAK_FLOPS.items() if k.lower() in name.lower()), None)
    return {
        "benchmark": "train_throughput", "framework": "transformers+peft", "date": time.strftime("%Y-%m-%d"),
        "device": name, "backend": device, "host": platform.node(), "torch_version": torch.__version__,
        **{k: getattr(args, k) for k in ("preset", "mode", "objective", "rank", "batch", "seq", "remat", "param_dtype",
                                          "steps", "warmup")},
        "attention": "sdpa", "params": total, "trainable_params": trained, "flops_per_token": flops,
        "step_seconds": seconds, "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops / peak if peak else None, "device_peak_flops": peak,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "compile_seconds": None, "final_loss": float(loss),
    }


def _dpo_loss(model, ids, args):
    """TRL's DPO loss of --batch pairs (row i chosen, row i + 1 rolled rejected), its inputs as its
    collator makes them: the chosen rows, then the rejected rows."""
    import datasets
    import torch
    import trl

    trainer = getattr(_dpo_loss, "trainer", None)
    if trainer is None:
        tokenizer = _ByteTokenizer()
        dpo_args = trl.DPOConfig(output_dir="/tmp/jaxft-bench-trl", report_to=[], bf16=args.param_dtype == "bfloat16",
                                 use_cpu=not torch.cuda.is_available(), max_length=None,
                                 precompute_ref_log_probs=False)
        trainer = _dpo_loss.trainer = trl.DPOTrainer(
            model=model, args=dpo_args, processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    sequences = ids[:, :-1]
    inputs = {"input_ids": torch.cat([sequences, torch.roll(sequences, 1, 0)]),
              "attention_mask": torch.ones((2 * args.batch, args.seq), dtype=torch.long, device=ids.device),
              "completion_mask": torch.ones((2 * args.batch, args.seq), dtype=torch.long, device=ids.device)}
    if args.mode == "full":  # no reference model in memory: precomputed log-probs, as jaxft's side
        inputs.update(ref_chosen_logps=-torch.full((args.batch,), float(args.seq), device=ids.device),
                      ref_rejected_logps=-torch.full((args.batch,), float(args.seq), device=ids.device))
        trainer.precompute_ref_logps = True
    return trainer._compute_loss(trainer.model, inputs, False)


class _ByteTokenizer:
    """Just enough of a tokenizer for DPOTrainer to start (the benchmark feeds token ids itself)."""

    def __new__(cls):
        import tokenizers
        import transformers

        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4},
                                                                   unk_token="<pad>"))
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
