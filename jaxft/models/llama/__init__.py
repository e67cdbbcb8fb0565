"""Llama family: HF model_type llama, mistral, qwen2, qwen3."""

from jaxft.models.llama import convert
from jaxft.models.llama.config import MODEL_TYPES, LlamaConfig
from jaxft.models.llama.model import LlamaForCausalLM

__all__ = ["MODEL_TYPES", "LlamaConfig", "LlamaForCausalLM", "convert"]
