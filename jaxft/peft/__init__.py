"""Parameter-efficient fine-tuning: adapters that plug into `jaxft.models.layers.Linear`."""

from jaxft.peft.lora import (ALL_LINEAR, DEFAULT_TARGETS, LoRA, LoraConfig, LoRAParam, apply_lora, is_lora_param,
                             linear_modules, lora_params, merge_lora)

__all__ = ["ALL_LINEAR", "DEFAULT_TARGETS", "LoRA", "LoraConfig", "LoRAParam", "apply_lora", "is_lora_param",
           "linear_modules", "lora_params", "merge_lora"]
