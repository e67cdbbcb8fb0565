"""Gemma family: HF model_type gemma, gemma2, gemma3_text."""

from jaxft.models.gemma import convert
from jaxft.models.gemma.config import MODEL_TYPES, GemmaConfig
from jaxft.models.gemma.model import GemmaForCausalLM

__all__ = ["MODEL_TYPES", "GemmaConfig", "GemmaForCausalLM", "convert"]
