"""Mixture-of-experts family: HF model_type mixtral, qwen2_moe, qwen3_moe."""

from jaxft.models.mixtral import convert
from jaxft.models.mixtral.config import MODEL_TYPES, MoEConfig
from jaxft.models.mixtral.model import MoEForCausalLM

__all__ = ["MODEL_TYPES", "MoEConfig", "MoEForCausalLM", "convert"]
