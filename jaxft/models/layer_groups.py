"""Scanning stacked layers in groups whose per-layer settings repeat, each member with static settings.

Gemma 2 alternates (sliding, global) layers, Gemma 3 repeats 5 sliding + 1 global, Qwen2 with
`max_window_layers` runs N global layers then sliding ones. Scanned as one sequence, a layer's
window is a traced value, which fused kernels cannot take (splash masks and cuDNN's
`local_window_size` are fixed when the kernel is built). Here the layers are cut into segments,
each one period of the pattern repeated G times; a segment is one `lax.scan` over its G groups
whose body runs the period's P layers one after the other, each traced with its own Python
settings (window, RoPE table). The compiled code is one period per segment whatever the depth:

    Gemma 2, 24 layers:            1 segment:  12 × (sliding, global)
    Gemma 3, 26 layers:            2 segments:  4 × (5 sliding, global), then 2 × (sliding,) *
    Qwen2, 28 layers, mwl=21:      2 segments: 21 × (global,), then 7 × (sliding,) *
                                   (* several segments: one switched scan, see below)

    plan = layer_plan(kinds)                          # kinds[i]: layer i's settings, any hashable
    x = scan_groups(stacked, x, None, body, plan)     # body(layer, x, layer_input, kind) -> x

Parameters stay stacked [L, ...] (checkpoints, LoRA, sharding, the KV cache unchanged). With one
segment the stack is reshaped [G, P, ...] inside the call (free: no copy). With several, slicing
the stack per segment would copy the weights, so the layers run instead in one scan whose body
switches (`lax.switch`, each branch with its static kind) among the distinct kinds: the
compiled code is one body per distinct kind, whatever the depth.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import _FROZEN_PREFIX, REMAT_POLICIES, _layer_rng

# The longest period looked for: the compiled body holds up to this many layers. Gemma 3's is 6.
MAX_PERIOD = 8


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers start .. stop-1: `groups` repetitions of the period `kinds` (one entry per member)."""

    start: int
    groups: int
    kinds: tuple[Hashable, ...]

    @property
    def stop(self) -> int:
        return self.start + self.groups * len(self.kinds)


def layer_plan(kinds: Sequence[Hashable], max_period: int = MAX_PERIOD) -> tuple[Segment, ...]:
    """The cut of the layers into segments that compiles the fewest layer bodies (the periods'
    lengths summed), then has the fewest segments, then the longest first segment (Gemma 3 starts
    with its 5 + 1 groups, not with a remainder); periods up to `max_period` layers.

    Exact, by dynamic programming over where each segment starts (L · max_period · L/period steps).
    """
    kinds = tuple(kinds)
    num = len(kinds)
    best: list[tuple[int, int, Segment | None]] = [(0, 0, None)] * (num + 1)  # suffix from i: (bodies, segments, first)
    for start in range(num - 1, -1, -1):
        options = []
        for period in range(1, min(max_period, num - start) + 1):
            pattern = kinds[start:start + period]
            groups = 1
            while True:
                stop = start + groups * period
                options.append((period + best[stop][0], 1 + best[stop][1], -groups * period,
                                Segment(start, groups, pattern)))
                if kinds[stop:stop + period] != pattern:
                    break
                groups += 1
        bodies, segments, _, first = min(options, key=lambda option: option[:3])
        best[start] = (bodies, segments, first)
    segments, start = [], 0
    while start < num:
        segments.append(best[start][2])
        start = segments[-1].stop
    return tuple(segments)


def scan_groups(stacked: nnx.Module, carry, per_layer_inputs, body: Callable, plan: Sequence[Segment],
                remat: str = "none", with_outputs: bool = False):
    """carry = body(layer, carry, layer_input, kind) for each layer of `stacked` in order, where
    `kind` is the layer's entry of the plan, a Python value at trace time.

    per_layer_inputs: None or a pytree of [L, ...] arrays (a KV cache), sliced like the params.
    with_outputs: body returns (carry, output); the outputs come back stacked [L, ...], as
    (carry, outputs). remat: a layers.REMAT_POLICIES key, applied to each layer (not to a whole
    group), so the backward pass holds one layer's recomputed activations at a time, as before.
    """
    graphdef, state = nnx.split(stacked)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    if not plan or plan[0].start != 0 or plan[-1].stop != num_layers \
            or any(a.stop != b.start for a, b in zip(plan, plan[1:])):
        raise ValueError(f"layer plan {plan} does not cover the {num_layers} stacked layers in order")

    def member(kind, layer_state, carry, layer_input, index):
        with _layer_rng(index):  # each layer draws its own dropout masks, by its index in the stack
            return body(nnx.merge(graphdef, layer_state), carry, layer_input, kind)

    frozen = 0 if with_outputs else min(_FROZEN_PREFIX.get(), num_layers)
    if frozen:
        # train.freeze_first_layers (layers.frozen_prefix): the frozen rows run as scans of their own
        # with their params under stop_gradient, so autodiff builds no weight gradient for them (and
        # nothing at all when no trainable param feeds them); then the trainable rows.
        kinds = _unrolled(plan)
        rows = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], (state, per_layer_inputs))  # noqa: E731
        (head, head_inputs), (tail, tail_inputs) = rows(0, frozen), rows(frozen, num_layers)
        carry = _scan_plan(jax.lax.stop_gradient(head), member, carry, head_inputs, layer_plan(kinds[:frozen]),
                           remat, False, 0)
        if frozen == num_layers:
            return carry
        return _scan_plan(tail, member, carry, tail_inputs, layer_plan(kinds[frozen:]), remat, False, frozen)
    return _scan_plan(state, member, carry, per_layer_inputs, plan, remat, with_outputs, 0)


def _unrolled(plan: Sequence[Segment]) -> list:
    return [kind for segment in plan for _ in range(segment.groups) for kind in segment.kinds]


def _scan_plan(state, member, carry, per_layer_inputs, plan, remat, with_outputs, first_index):
    """scan_groups over `state` (rows first_index.. of the stack) with a plan starting at 0."""
    if len(plan) > 1:
        return _scan_switched(state, member, carry, per_layer_inputs, plan, remat, with_outputs, first_index)
    outputs = []
    for segment in plan:
        period = len(segment.kinds)

        def grouped(tree, segment=segment, period=period):  # [L, ...] → this segment's [G, P, ...]
            if period == 1:  # [L, ...] as it is: the scan's own slices, which autodiff need not save
                return jax.tree.map(lambda a: a[segment.start:segment.stop], tree)
            return jax.tree.map(
                lambda a: a[segment.start:segment.stop].reshape(segment.groups, period, *a.shape[1:]), tree)

        def step(carry, xs, segment=segment, period=period):
            group_state, group_inputs, group = xs
            results = []
            for j, kind in enumerate(segment.kinds):
                run = functools.partial(member, kind)
                if remat != "none" and period > 1:  # the backward recomputes one member at a time
                    run = jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=False)
                pick = lambda tree, j=j: tree if period == 1 else jax.tree.map(lambda a: a[j], tree)  # noqa: E731
                result = run(pick(group_state), carry, pick(group_inputs),
                             first_index + segment.start + group * period + j)
                if with_outputs:
                    carry, result = result
                    results.append(result)
                else:
                    carry = result
            if not with_outputs:
                return carry, None
            return carry, (results[0] if period == 1 else jax.tree.map(lambda *r: jnp.stack(r), *results))

        if remat != "none":
            # Around the whole group as well: a checkpoint only inside the body would make the scan
            # save each member's inputs, the weights sliced from the stack among them (a copy of
            # every layer's weights); around the body it saves only the group's carry.
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
        carry, out = jax.lax.scan(step, carry, (grouped(state), grouped(per_layer_inputs),
                                                jnp.arange(segment.groups, dtype=jnp.int32)))
        if with_outputs:
            outputs.append(out if period == 1 else jax.tree.map(lambda a: a.reshape(segment.groups * period, *a.shape[2:]), out))
    if not with_outputs:
        return carry
    return carry, (outputs[0] if len(outputs) == 1 else jax.tree.map(lambda *o: jnp.concatenate(o), *outputs))


def _scan_switched(state, member, carry, per_layer_inputs, plan, remat, with_outputs, first_index):
    """Several segments (a remainder: Gemma 3's 26 = 4 × 6 + 2; Qwen2's N global then sliding):
    slicing [L, ...] into segments would copy each segment's params (and KV cache) before its scan,
    a whole extra copy of the layers' weights. Instead one scan over all L layers, the layer's body
    picked by `lax.switch` among the distinct kinds, each branch traced once with its static kind:
    no copy, flat compile time (one body per distinct kind), one conditional per layer."""
    kinds = _unrolled(plan)
    distinct = list(dict.fromkeys(kinds))
    branch_of = jnp.asarray([distinct.index(kind) for kind in kinds], jnp.int32)  # [L]

    def branch(kind):
        def run(layer_state, carry, layer_input, index):
            result = member(kind, layer_state, carry, layer_input, index)
            return result if with_outputs else (result, None)
        return run

    def step(carry, xs):
        layer_state, layer_input, index, which = xs
        return jax.lax.switch(which, [branch(kind) for kind in distinct], layer_state, carry, layer_input, index)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    num_layers = len(kinds)
    carry, outputs = jax.lax.scan(step, carry, (state, per_layer_inputs, first_index + jnp.arange(num_layers, dtype=jnp.int32),
                                                branch_of))
    return (carry, outputs) if with_outputs else carry
