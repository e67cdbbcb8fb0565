"""The variable type and logical rank axis of every adapter parameter (shared by jaxft.peft.lora and
jaxft.peft.expert_lora, which neither imports the other through)."""

from flax import nnx

LORA_AXIS = "lora"  # logical name of the rank axis; unknown to the sharding rules, so replicated


class LoRAParam(nnx.Param):
    """The variable type of every adapter parameter: `nnx.state(model, LoRAParam)` is what trains."""
