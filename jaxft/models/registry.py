"""HF `model_type` → the family that implements it."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # has from_hf(dict, where) and to_hf()
    model_cls: type  # model_cls(config, param_dtype=..., dtype=..., rngs=...)
    convert: ModuleType  # key_table(config, param_paths), ignored_keys(config)


_FAMILIES = {
    # model_type: (module, config class, causal-LM class)
    "llama": ("jaxft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("jaxft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("jaxft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("jaxft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "gemma": ("jaxft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("jaxft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma3_text": ("jaxft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "phi3": ("jaxft.models.phi3", "Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("jaxft.models.mixtral", "MoEConfig", "MoEForCausalLM"),
    "qwen2_moe": ("jaxft.models.mixtral", "MoEConfig", "MoEForCausalLM"),
    "qwen3_moe": ("jaxft.models.mixtral", "MoEConfig", "MoEForCausalLM"),
}
# Every family's decoder also takes a sequence-classification head: jaxft.models.classification.


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_for(hf_config: dict[str, Any], where: str = "config.json") -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {supported_model_types()}")
    module_name, config_name, model_name = _FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return Family(name=module_name.rsplit(".", 1)[-1], config_cls=getattr(module, config_name),
                  model_cls=getattr(module, model_name), convert=module.convert)
