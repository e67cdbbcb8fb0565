"""Mixture-of-experts MLP: top-k routing (as transformers routes each family) and dropless experts.

    logits = gate(x)                       [N, E]   in float32 (the router decides; bf16 ties flip choices)
    probs  = softmax(logits)               then top-k; renormalized over the k (Mixtral always,
                                                    Qwen-MoE when norm_topk_prob)
    y      = Σ_k w_k · expert_{i_k}(x)     every token goes to its k experts: no capacity, none dropped
    (qwen2_moe) y += sigmoid(shared_expert_gate(x)) · shared_expert(x)

Two ways to compute the experts, which agree to float rounding:
- "grouped" (default): the N·k (token, expert) pairs are sorted by expert and each expert's rows
  multiplied by its weight with one grouped matmul, `jax.lax.ragged_dot` (megablox-style GMM;
  XLA lowers it to a grouped kernel on TPU/GPU). Work is N·k rows, whatever the routing.
- "dense": every expert on every token, combined with a one-hot [N, E] weight matrix. E/k times
  the work; the readable reference the grouped path is tested against.

Expert weights are stacked [E, out, in] per projection (HF's per-expert Linear layout, one expert
per row of the leading axis), logical axis `expert` first, so that the `expert` mesh axis shards
them (jaxft.sharding). Each block also returns its router statistics (per-expert top-k counts and
probability sums over real tokens, the router z-loss sum), which the decoder sums over layers for
the load-balancing loss (`load_balancing_loss`, transformers' load_balancing_loss_func).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layer_groups import layer_plan, scan_groups
from jaxft.models.layers import ACTIVATIONS, Axis, Linear, _ADAPTERS_OFF, param, stack_layers

IMPLEMENTATIONS = ("grouped", "dense")
ROUTER_AXIS = "router"  # the router's expert-logit axis: small, left replicated (no rule names it)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """How a family's sparse layers route and what they hold (a DecoderSpec field; hashable)."""

    num_experts: int
    top_k: int
    expert_size: int  # intermediate size of each expert
    sparse_layers: tuple[bool, ...]  # per layer: True = this MoE block, False = the dense gated MLP
    normalize_top_k: bool = True  # renormalize the k chosen probabilities to sum to 1
    shared_expert_size: int | None = None  # qwen2_moe: an always-on expert with a sigmoid gate

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")


# --- the experts -----------------------------------------------------------------------------------
class ExpertLinear(nnx.Module):
    """E Linear layers stacked [E, out, in]. `x @ W_e.T` for the rows of each expert.

    grouped: x [M, in] sorted by expert, `group_sizes` [E] rows per expert (Σ = M) → [M, out].
    dense:   x [..., E, in] (one row per expert) → [..., E, out].
    `adapter` (jaxft.peft.lora.ExpertLoRA) is called as adapter(x, y, self, group_sizes).
    """

    def __init__(self, experts: int, in_features: int, out_features: int, *, axes: tuple[str, str], param_dtype,
                 dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.normal(0.02), (experts, out_features, in_features), param_dtype,
                            (Axis.EXPERT, *axes))
        self.dtype = dtype
        self.adapter = nnx.data(None)

    def dense_weight(self, dtype=None) -> jnp.ndarray:
        if hasattr(self.weight, "dequantize"):
            return self.weight.dequantize(dtype)
        weight = self.weight[...]
        return weight if dtype is None else weight.astype(dtype)

    def __call__(self, x: jnp.ndarray, group_sizes: jnp.ndarray | None = None) -> jnp.ndarray:
        x = x.astype(self.dtype)
        weight = self.dense_weight(self.dtype)
        y = grouped_matmul(x, weight, group_sizes) if group_sizes is not None else jnp.einsum("...ei,eoi->...eo", x, weight)
        if self.adapter is not None and not _ADAPTERS_OFF.get():
            y = self.adapter(x, y, self, group_sizes)
        return y


def grouped_matmul(x: jnp.ndarray, weight: jnp.ndarray, group_sizes: jnp.ndarray) -> jnp.ndarray:
    """x [M, in] (rows sorted by group) · weight[g] [out, in]ᵀ for the rows of group g → [M, out]."""
    return jax.lax.ragged_dot(x, jnp.swapaxes(weight, -1, -2), group_sizes.astype(jnp.int32))


class GatedMLP(nnx.Module):
    """down(act(gate(x)) · up(x)) of one size: qwen2_moe's shared expert."""

    def __init__(self, hidden: int, size: int, activation: str, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, size, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.up_proj = Linear(hidden, size, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.down_proj = Linear(size, hidden, axes=(Axis.EMBED, Axis.MLP), **kw)
        self.activation = activation

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class Experts(nnx.Module):
    """HF's `mlp.experts`: gate_proj, up_proj [E, F, D] and down_proj [E, D, F]."""

    def __init__(self, moe: MoESpec, hidden: int, activation: str, *, param_dtype, dtype, rngs: nnx.Rngs):
        e, f = moe.num_experts, moe.expert_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = ExpertLinear(e, hidden, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.up_proj = ExpertLinear(e, hidden, f, axes=(Axis.MLP, Axis.EMBED), **kw)
        self.down_proj = ExpertLinear(e, f, hidden, axes=(Axis.EMBED, Axis.MLP), **kw)
        self.activation = activation

    def __call__(self, x, group_sizes=None):
        act = ACTIVATIONS[self.activation]
        return self.down_proj(act(self.gate_proj(x, group_sizes)) * self.up_proj(x, group_sizes), group_sizes)


# --- routing ---------------------------------------------------------------------------------------
def route(logits: jnp.ndarray, top_k: int, normalize: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """float32 router logits [N, E] → (probs [N, E], top-k weights [N, k], expert ids [N, k]), as
    transformers' *TopKRouter: softmax over all experts, top-k, then optionally renormalized."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return probs, weights, experts


def stats_size(num_experts: int) -> int:
    return 2 * num_experts + 2


def router_stats(logits, probs, experts, valid) -> jnp.ndarray:
    """[2E + 2] float32: top-k counts per expert, probability sums per expert, real-token count and
    Σ logsumexp(logits)², all over real tokens (`valid` [N]); summed over layers by the decoder."""
    num_experts = probs.shape[-1]
    valid = valid.astype(jnp.float32)
    counts = jnp.zeros(num_experts, jnp.float32).at[experts.reshape(-1)].add(
        jnp.repeat(valid, experts.shape[-1]))
    prob_sums = (probs * valid[:, None]).sum(0)
    z = (jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)) * valid).sum()
    return jnp.concatenate([counts, prob_sums, valid.sum()[None], z[None]])


def load_balancing_loss(stats: jnp.ndarray, num_experts: int) -> jnp.ndarray:
    """transformers' load_balancing_loss_func from summed router stats: E · Σ_e f_e · P_e with
    f_e = top-k assignments of e per real token and P_e = mean router probability of e, both over
    every sparse layer's real tokens (the token count summed over layers, as it does)."""
    counts, prob_sums, rows = stats[:num_experts], stats[num_experts:2 * num_experts], stats[2 * num_experts]
    rows = jnp.maximum(rows, 1.0)
    return num_experts * jnp.sum((counts / rows) * (prob_sums / rows))


def router_z_loss(stats: jnp.ndarray, num_experts: int) -> jnp.ndarray:
    """ST-MoE's router z-loss: mean over real tokens and sparse layers of logsumexp(logits)²."""
    return stats[2 * num_experts + 1] / jnp.maximum(stats[2 * num_experts], 1.0)


class SparseMoeBlock(nnx.Module):
    """HF's sparse `mlp`: router `gate` [E, D], `experts`, and (qwen2_moe) `shared_expert` with
    `shared_expert_gate` [1, D]. Returns (y [B, T, D], router stats [2E + 2])."""

    def __init__(self, moe: MoESpec, hidden: int, activation: str, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        # The router computes in float32 whatever the model's compute dtype.
        self.gate = Linear(hidden, moe.num_experts, use_bias=False, axes=(ROUTER_AXIS, Axis.EMBED), dtype=jnp.float32,
                           **kw)
        self.experts = Experts(moe, hidden, activation, dtype=dtype, **kw)
        if moe.shared_expert_size:
            self.shared_expert = GatedMLP(hidden, moe.shared_expert_size, activation, dtype=dtype, **kw)
            self.shared_expert_gate = Linear(hidden, 1, use_bias=False, axes=(ROUTER_AXIS, Axis.EMBED), dtype=dtype,
                                             **kw)
        self.shared = bool(moe.shared_expert_size)
        self.top_k, self.normalize, self.num_experts = moe.top_k, moe.normalize_top_k, moe.num_experts
        self.dtype = dtype
        self.implementation = "grouped"

    def __call__(self, x: jnp.ndarray, valid: jnp.ndarray | None = None):
        batch, length, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [N, D]
        logits = self.gate(flat)  # [N, E] float32
        probs, weights, experts = route(logits, self.top_k, self.normalize)
        if self.implementation == "dense":
            y = self._dense(flat, weights, experts)
        elif self.implementation == "grouped":
            y = self._grouped(flat, weights, experts)
        else:
            raise ValueError(f"MoE implementation {self.implementation!r} is not one of {IMPLEMENTATIONS}")
        if self.shared:
            gate = jax.nn.sigmoid(self.shared_expert_gate(flat))  # [N, 1]
            y = y + (gate * self.shared_expert(flat)).astype(y.dtype)
        valid = jnp.ones((flat.shape[0],), bool) if valid is None else valid.reshape(-1)
        return y.reshape(batch, length, hidden).astype(self.dtype), router_stats(logits, probs, experts, valid)

    def _grouped(self, flat, weights, experts):
        """Dropless: the N·k (token, choice) rows sorted by expert, one grouped matmul per projection."""
        n, k = experts.shape
        choice_experts = experts.reshape(-1)  # [N·k], token-major
        order = jnp.argsort(choice_experts, stable=True)  # rows of expert 0 first, then 1, ...
        group_sizes = jnp.bincount(choice_experts, length=self.num_experts).astype(jnp.int32)  # [E]
        rows = self.experts(flat[order // k], group_sizes)  # [N·k, D], sorted
        unsorted = rows[jnp.argsort(order)].reshape(n, k, -1)  # back to (token, choice)
        return jnp.einsum("nkd,nk->nd", unsorted, weights.astype(unsorted.dtype))

    def _dense(self, flat, weights, experts):
        """Every expert on every token; a one-hot [N, E] combination keeps the chosen k."""
        combine = jnp.zeros((flat.shape[0], self.num_experts), weights.dtype)
        combine = combine.at[jnp.arange(flat.shape[0])[:, None], experts].set(weights)  # [N, E]
        out = self.experts(jnp.broadcast_to(flat[:, None, :], (flat.shape[0], self.num_experts, flat.shape[1])))
        return jnp.einsum("ned,ne->nd", out, combine.astype(out.dtype))


def set_moe_implementation(model: nnx.Module, name: str) -> nnx.Module:
    """Picks "grouped" or "dense" expert computation for every sparse block of `model`, in place."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"MoE implementation {name!r} is not one of {IMPLEMENTATIONS}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SparseMoeBlock):
            module.implementation = name
    return model


# --- router statistics out of the forward pass ------------------------------------------------------
# The decoder reports each forward pass's summed stats here; objectives that add the router losses
# (tasks/causal_lm) open `collect_router_stats()` around their forward. Like layers.dropout_rng: the
# model stays free of training code.
_COLLECTED: contextvars.ContextVar[list | None] = contextvars.ContextVar("jaxft_router_stats", default=None)


@contextlib.contextmanager
def collect_router_stats():
    collected: list = []
    token = _COLLECTED.set(collected)
    try:
        yield collected
    finally:
        _COLLECTED.reset(token)


def report_router_stats(stats: jnp.ndarray) -> None:
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append(stats)


# --- decoders whose layers are of two kinds -----------------------------------------------------------
class MixedLayers(nnx.Module):
    """Decoder layers of two kinds (qwen*_moe's mlp_only_layers / decoder_sparse_step): the sparse
    layers stacked in `sparse` [Ls, ...], the dense ones in `dense` [Ld, ...], each run of consecutive
    layers of one kind scanned over its slice of its stack (compiled once per run, not per layer)."""

    def __init__(self, make_layer: Callable[[bool, nnx.Rngs], nnx.Module], kinds: tuple[bool, ...], rngs: nnx.Rngs):
        self.sparse = stack_layers(lambda r: make_layer(True, r), sum(kinds), rngs)
        self.dense = stack_layers(lambda r: make_layer(False, r), len(kinds) - sum(kinds), rngs)
        self.kinds = kinds

    def runs(self) -> list[tuple[bool, int, int, int]]:
        """(kind, first layer, stop layer, first index in that kind's stack) per run, in layer order."""
        runs, seen = [], {True: 0, False: 0}
        start = 0
        for i in range(1, len(self.kinds) + 1):
            if i == len(self.kinds) or self.kinds[i] != self.kinds[start]:
                kind = self.kinds[start]
                runs.append((kind, start, i, seen[kind]))
                seen[kind] += i - start
                start = i
        return runs

    def scan(self, carry, per_layer_inputs, body, kinds, remat: str = "none", with_outputs: bool = False):
        """layer_groups.scan_groups over the layers in order; kinds[i]: layer i's settings."""
        outputs = []
        for kind, start, stop, first in self.runs():
            graphdef, state = nnx.split(self.sparse if kind else self.dense)
            part = nnx.merge(graphdef, jax.tree.map(lambda a: a[first:first + stop - start], state))
            inputs = jax.tree.map(lambda a: a[start:stop], per_layer_inputs)
            result = scan_groups(part, carry, inputs, body, layer_plan(kinds[start:stop]), remat=remat,
                                 with_outputs=with_outputs)
            carry, out = result if with_outputs else (result, None)
            outputs.append(out)
        if not with_outputs:
            return carry
        return carry, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)

    def layer_ids(self, sparse: bool) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kinds) if k == sparse)


def param_counts(shapes: dict[str, tuple[int, ...]], top_k: int, num_experts: int) -> tuple[int, int]:
    """(total, active) parameter counts: a token uses top_k of the num_experts routed experts, so
    their weights (and adapters: every path under `.experts.`) count k/E toward the active ones,
    which is what MFU counts (DESIGN.md); the shared expert, attention and router count whole."""
    total = active = 0
    for path, shape in shapes.items():
        n = math.prod(shape)
        total += n
        active += n * top_k // num_experts if ".experts." in path else n
    return total, active


def counts_of_hf_config(hf_config: dict) -> tuple[int, int] | None:
    """(top_k, num_experts) of an HF MoE config.json, None for a dense model."""
    experts = hf_config.get("num_experts") or hf_config.get("num_local_experts")
    top_k = hf_config.get("num_experts_per_tok")
    return (int(top_k), int(experts)) if experts and top_k else None


__all__ = ["MoESpec", "SparseMoeBlock", "Experts", "ExpertLinear", "MixedLayers", "route", "load_balancing_loss",
           "router_z_loss", "set_moe_implementation", "collect_router_stats", "IMPLEMENTATIONS"]
