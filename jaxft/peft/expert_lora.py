"""LoRA on mixture-of-experts projections: one adapter per expert, as PEFT trains them on per-expert
Linear modules (transformers 4's layout) and applies them to transformers 5's fused expert tensors.

For expert e of a stacked projection W [E, out, in] (jaxft.models.moe.ExpertLinear):
    y_e = W_e x + s · B_e A_e x          A [E, r, in], B [E, out, r] (stacked [L, E, ...] in the decoder)
The grouped path multiplies each expert's rows with its own A_e and B_e by the same ragged_dot as the
base weight, so the adapter costs N·k rows too; the dense path is the einsum over all experts.
DoRA has no per-expert form in PEFT (its ParamWrapper refuses it), so it is refused here too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import dropout_key
from jaxft.models.moe import ExpertLinear, grouped_matmul
from jaxft.peft.params import LORA_AXIS, LoRAParam


class ExpertLoRA(nnx.Module):
    def __init__(self, linear: ExpertLinear, *, rank: int, scaling: float, dropout: float, dtype, salt: str,
                 key: jax.Array):
        *lead, out_features, in_features = linear.weight.shape  # lead = ([L,] E)
        *lead_axes, out_axis, in_axis = linear.weight.axes
        bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform_(a=√5) of A, per expert; B = 0
        a = jax.random.uniform(key, (*lead, rank, in_features), jnp.float32, -bound, bound)
        self.lora_A = LoRAParam(a.astype(dtype), axes=(*lead_axes, LORA_AXIS, in_axis))
        self.lora_B = LoRAParam(jnp.zeros((*lead, out_features, rank), dtype), axes=(*lead_axes, out_axis, LORA_AXIS))
        self.lora_magnitude_vector = None
        self.scaling, self.dropout, self.salt, self.use_dora = scaling, dropout, salt, False

    def __call__(self, x, y, linear: ExpertLinear, group_sizes=None):
        dtype = linear.dtype
        x = x.astype(dtype)
        key = dropout_key(self.salt) if self.dropout > 0 else None
        if key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        a, b = self.lora_A[...].astype(dtype), self.lora_B[...].astype(dtype)
        if group_sizes is not None:  # x [M, in] sorted by expert
            lora = grouped_matmul(grouped_matmul(x, a, group_sizes), b, group_sizes)
        else:  # x [..., E, in]
            lora = jnp.einsum("...er,eor->...eo", jnp.einsum("...ei,eri->...er", x, a), b)
        return y + self.scaling * lora

    def delta_direction(self) -> jnp.ndarray:
        """B_e A_e in float32, [.., E, out, in]."""
        return jnp.einsum("...or,...ri->...oi", self.lora_B[...].astype(jnp.float32),
                          self.lora_A[...].astype(jnp.float32))


def expert_modules(model: nnx.Module) -> dict[tuple[str, ...], ExpertLinear]:
    return {tuple(str(p) for p in path): m for path, m in nnx.iter_modules(model) if isinstance(m, ExpertLinear)}


def attach(model: nnx.Module, targets: set[str], config, root: jax.Array, dtype, stable_hash) -> int:
    """Adapters on the ExpertLinears named in `targets`; returns how many were attached."""
    chosen = {path: m for path, m in expert_modules(model).items() if path[-1] in targets}
    if chosen and config.use_dora:
        raise ValueError(f"lora.use_dora: DoRA on mixture-of-experts projections ({'.'.join(next(iter(chosen)))}) "
                         "is not supported (PEFT has no per-expert DoRA); drop gate_proj/up_proj/down_proj from "
                         "lora.targets or use plain LoRA")
    for path, linear in chosen.items():
        if linear.adapter is not None:
            raise ValueError(f"{'.'.join(path)} already has an adapter; merge_lora(model) before applying another")
        salt = ".".join(path)
        linear.adapter = ExpertLoRA(linear, rank=config.rank, scaling=config.scaling, dropout=config.dropout,
                                    dtype=dtype, salt=salt, key=jax.random.fold_in(root, stable_hash(salt)))
    return len(chosen)


def merge(model: nnx.Module) -> None:
    """W_e ← W_e + s · B_e A_e for every expert adapter, in float32, stored in W's dtype; adapters removed."""
    for linear in expert_modules(model).values():
        adapter = linear.adapter
        if not isinstance(adapter, ExpertLoRA):
            continue
        merged = linear.dense_weight(jnp.float32) + adapter.scaling * adapter.delta_direction()
        if hasattr(linear.weight, "dequantize"):
            linear.weight = nnx.Param(merged.astype(linear.weight.dtype), axes=linear.weight.axes)
        else:
            linear.weight.set_value(merged.astype(linear.weight.dtype))
        linear.adapter = None
