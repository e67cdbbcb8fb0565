"""Export a run back to PyTorch: a merged Hugging Face folder, or a PEFT adapter.

    jaxft export --workdir workdir/demo --out out/merged --format hf
    jaxft export --workdir workdir/demo --out out/adapter --format peft

`hf`: adapters merged into the base weights (LoRA: W + s·BA; DoRA: magnitude-rescaled), written as
sharded safetensors + index with config.json, generation_config.json and the tokenizer files —
`AutoModelForCausalLM.from_pretrained(out)` loads it as is. A QLoRA run's quantized base is
dequantized (in float32) before the merge, and written in model.dtype or the `dtype` asked for.
`peft`: `adapter_model.safetensors` + `adapter_config.json` with PEFT's key names, for
`PeftModel.from_pretrained(base, out)` and vLLM's LoRA loader; it refers to the base by its path or
hub id — for a QLoRA run too, the original unquantized base, as PEFT does for bitsandbytes runs.
Both gather one tensor at a time, so host memory stays near the largest tensor.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxft import hf
from jaxft.pretrained import DTYPES, save_pretrained

# Our adapter param name → PEFT's key suffix (the module path before it is the HF module path).
_PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"}
# Modules trained whole beside the adapters, which PEFT saves as they are (`modules_to_save`), with
# the task type they imply: the sequence-classification head (jaxft.models.classification).
_WHOLE_MODULES = {"score": "SEQ_CLS"}


def export(workdir: str, out: str, format: str = "hf", step: int | None = None, dtype: str | None = None) -> str:
    from jaxft.train import restore_run

    run, step_index, meta = restore_run(workdir, step)
    model = run.model_def.merge(run.state.params, run.state.frozen)
    config = meta["config"]
    os.makedirs(out, exist_ok=True)
    if format == "hf":
        if config["lora"]["rank"]:
            from jaxft.peft.lora import merge_lora

            merge_lora(model)
        from jaxft.peft.quant import dequantize_model

        dequantize_model(model)  # QLoRA: base Linears that no adapter targeted are still quantized
        save_pretrained(model, out, dtype=dtype)
    elif format == "peft":
        if not config["lora"]["rank"]:
            raise ValueError(f"{workdir} is a full fine-tuning run (lora.rank=0): it has no adapter; use --format hf")
        write_peft_adapter(run.state.params, meta, out, dtype)
        hf.copy_tokenizer_files(meta["base"]["path"], out)
    else:
        raise ValueError(f"export format {format!r} is not hf or peft")
    return out


def write_peft_adapter(params: dict[str, jax.Array], meta: dict, out: str, dtype: str | None = None) -> None:
    """adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight` etc., one per
    layer, and the adapter_config.json PEFT writes for the same LoRA settings."""
    entries, modules, whole = [], set(), set()
    for path, value in sorted(params.items()):
        module = path.split(".", 1)[0]
        if module in _WHOLE_MODULES and ".adapter." not in path:  # PEFT's key: the HF key under base_model.model.
            whole.add(module)
            out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(value.dtype)
            entries.append((f"base_model.model.{path}", tuple(value.shape), out_dtype,
                            lambda v=value: np.asarray(jax.device_get(v))))
            continue
        module_path, _, name = path.rpartition(".adapter.")
        if not _ or name not in _PEFT_NAMES:
            raise ValueError(f"trainable param {path} is not a LoRA adapter param; a PEFT adapter cannot carry it")
        out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(value.dtype)
        modules.add(module_path.rsplit(".", 1)[-1])
        stacked = module_path.startswith("model.layers.")
        layers = value.shape[0] if stacked else 1
        for i in range(layers):
            hf_module = module_path.replace("model.layers.", f"model.layers.{i}.", 1) if stacked else module_path
            fetch = (lambda v=value, i=i: np.asarray(jax.device_get(v[i]))) if stacked else (lambda v=value: np.asarray(jax.device_get(v)))
            shape = tuple(value.shape[1:] if stacked else value.shape)
            entries.append((f"base_model.model.{hf_module}.{_PEFT_NAMES[name]}", shape, out_dtype, fetch))
    hf.write_safetensors(os.path.join(out, "adapter_model.safetensors"), entries)
    lora = meta["config"]["lora"]
    base = meta["base"]
    hf.write_json(out, "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": _WHOLE_MODULES[min(whole)] if whole else "CAUSAL_LM",
        "base_model_name_or_path": base.get("repo_id") or base["path"],
        "revision": base.get("revision"),
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": sorted(modules),
        "use_rslora": lora["use_rslora"],
        "use_dora": lora["use_dora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": sorted(whole) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    })
