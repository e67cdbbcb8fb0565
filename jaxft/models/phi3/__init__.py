"""Phi-3 family: HF model_type phi3 (Phi-3, Phi-3.5 and Phi-4-mini text models)."""

from jaxft.models.phi3 import convert
from jaxft.models.phi3.config import MODEL_TYPES, Phi3Config
from jaxft.models.phi3.model import Phi3ForCausalLM

__all__ = ["MODEL_TYPES", "Phi3Config", "Phi3ForCausalLM", "convert"]
