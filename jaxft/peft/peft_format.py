"""PEFT adapter folders for prefix tuning, prompt tuning and (IA)³: what PEFT's save_pretrained writes.

    write_adapter("ia3", model, params, meta, "out/adapter")   # PeftModel.from_pretrained(base, "out/adapter")

adapter_model.safetensors holds PEFT's tensor names and shapes (peft/utils/save_and_load.py):
    PREFIX_TUNING  prompt_embeddings [N, L·2·K·D]: the prefix itself (with prefix_projection, the MLP's
                   output, as PEFT saves it; PEFT reloads it in inference mode as a plain embedding)
    PROMPT_TUNING  prompt_embeddings [N, D]
    IA3            base_model.model.<module>.ia3_l, [out, 1] per layer ([1, in] for feed-forward modules)
adapter_config.json carries the peft_type and the fields PEFT's configs write for it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxft import hf
from jaxft.peft.methods import PEFT_TYPES
from jaxft.pretrained import DTYPES


def _host(value, dtype: str | None) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    return array.astype(np.dtype(DTYPES[dtype])) if dtype else array


def _entry(key: str, array: np.ndarray) -> tuple:
    return key, tuple(array.shape), array.dtype, lambda a=array: a


def write_adapter(method: str, model, params: dict, meta: dict, out: str, dtype: str | None = None,
                  info=None) -> None:
    """Writes `model`'s adapter of `method` (prefix_tuning | prompt_tuning | ia3) into folder `out`."""
    config, base = meta["config"], meta["base"]
    spec = model.model.spec
    task_type = getattr(info, "peft_task_type", "CAUSAL_LM")
    whole = tuple(getattr(info, "modules_to_save", ()) or ())
    common = {"peft_type": PEFT_TYPES[method], "task_type": task_type, "auto_mapping": None,
              "base_model_name_or_path": base.get("repo_id") or base["path"], "revision": base.get("revision"),
              "inference_mode": True, "modules_to_save": None}
    saved, entries = [], []
    for path, value in sorted(params.items()):  # modules trained whole beside the adapter (a head)
        if path.split(".", 1)[0] in whole and ".adapter." not in path and not path.startswith("model.virtual."):
            entries.append(_entry(f"base_model.model.{path}", _host(value, dtype)))
            saved.append(path.split(".", 1)[0])
    if saved:
        common["modules_to_save"] = sorted(set(saved))
    peft = config.get("peft", {})
    if method in ("prefix_tuning", "prompt_tuning"):
        virtual = model.model.virtual
        if saved:
            raise ValueError(f"{method} with modules trained whole ({sorted(set(saved))}) cannot be a PEFT adapter here")
        flat = virtual.flat() if method == "prefix_tuning" else virtual.embedding[...]
        entries.append(_entry("prompt_embeddings", _host(flat, dtype)))
        common.update(num_virtual_tokens=virtual.num_virtual_tokens, num_layers=spec.num_layers,
                      num_transformer_submodules=1)
        if method == "prefix_tuning":
            token_dim = spec.num_kv_heads * spec.head_dim  # PEFT's token_dim for GQA models
            common.update(token_dim=token_dim, num_attention_heads=spec.num_kv_heads, init_weights=None,
                          prefix_projection=bool(peft.get("prefix_projection")),
                          encoder_hidden_size=peft.get("encoder_hidden_size") or token_dim)
        else:
            init = str(peft.get("prompt_tuning_init") or "RANDOM").upper()
            common.update(token_dim=spec.hidden_size, num_attention_heads=spec.num_heads, prompt_tuning_init=init,
                          prompt_tuning_init_text=peft.get("prompt_tuning_init_text"), tokenizer_kwargs=None,
                          # PEFT's config requires it for TEXT (it is not read at load: inference mode).
                          tokenizer_name_or_path=common["base_model_name_or_path"] if init == "TEXT" else None)
    elif method == "ia3":
        from jaxft.peft.ia3 import IA3
        from jaxft.peft.lora import linear_modules

        targets, feedforward = set(), set()
        for path, linear in sorted(linear_modules(model).items()):
            if not isinstance(linear.adapter, IA3):
                continue
            name, scale = path[-1], _host(linear.adapter.ia3_l[...], dtype)
            targets.add(name)
            if linear.adapter.feedforward:
                feedforward.add(name)
            module = ".".join(path)
            layers = [(module.replace("model.layers.", f"model.layers.{i}.", 1), scale[i]) for i in range(scale.shape[0])] \
                if module.startswith("model.layers.") else [(module, scale)]
            for hf_module, vector in layers:
                shaped = vector[None, :] if linear.adapter.feedforward else vector[:, None]  # [1, in] | [out, 1]
                entries.append(_entry(f"base_model.model.{hf_module}.ia3_l", np.ascontiguousarray(shaped)))
        common.update(target_modules=sorted(targets), feedforward_modules=sorted(feedforward), exclude_modules=None,
                      fan_in_fan_out=False, init_ia3_weights=True)
    else:
        raise ValueError(f"no PEFT writer for peft.method {method!r} here")
    hf.write_safetensors(os.path.join(out, "adapter_model.safetensors"), entries)
    hf.write_json(out, "adapter_config.json", common)


__all__ = ["write_adapter"]
