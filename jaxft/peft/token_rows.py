"""Trainable token rows: only some rows of the embedding (and of an untied lm_head) train, as PEFT's
`trainable_token_indices` (peft/tuners/trainable_tokens/layer.py) does.

    attach(model, indices=(1024, 1025, 1026))      # after the vocabulary grew (jaxft.vocab.grow)
    trainable = nnx.state(model, LoRAParam)         # the rows are adapter params: they train with LoRA

Like PEFT, the adapter holds the *values* of its rows, not a delta: `rows` [N, D] starts as the
base's rows at `indices` and replaces them wherever they are used (PEFT's index_copy), so the base
weight itself is never touched and its other rows stay bit-identical, with no gradient mask and no
optimizer state for them. The embedding looks a token up in `rows` when its id is one of `indices`;
the output projection (tied: the embedding's `attend`; untied: lm_head) overwrites those logits
with x · rowsᵀ. A tied model's output uses the embedding's adapter, as PEFT ties the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import Axis, Embed, Linear
from jaxft.peft.lora import LoRAParam


class TokenRowsParam(LoRAParam):
    """The variable type of trainable token rows (a LoRAParam: a LoRA run trains it with the adapters)."""


def is_token_rows_param(path: str, variable: nnx.Variable) -> bool:
    return isinstance(variable, TokenRowsParam)


class TokenRows(nnx.Module):
    """Rows `indices` of an [V, D] table (an Embed's weight, or an lm_head Linear's [V, D] weight)."""

    def __init__(self, weight: jax.Array, indices, dtype=jnp.float32):
        self.indices = tuple(int(i) for i in indices)  # static: part of the graph
        self.vocab_size = int(weight.shape[0])
        if not self.indices or min(self.indices) < 0 or max(self.indices) >= self.vocab_size:
            raise ValueError(f"token row indices {self.indices[:3]}... must lie in [0, {self.vocab_size})")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("token row indices repeat an index")
        rows = jnp.take(weight, jnp.asarray(self.indices), axis=0).astype(dtype)
        self.rows = TokenRowsParam(rows, axes=(None, Axis.EMBED))  # [N, D]; N is small: replicated

    def embed(self, ids: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
        """x [.., D] = the base table's rows of `ids`, with those of `indices` taken from `rows`."""
        slot = jnp.full((self.vocab_size,), -1, jnp.int32).at[jnp.asarray(self.indices)].set(
            jnp.arange(len(self.indices), dtype=jnp.int32))[ids]  # [..]: the row of each id in `rows`, or -1
        picked = jnp.take(self.rows[...], jnp.maximum(slot, 0), axis=0).astype(x.dtype)
        return jnp.where((slot >= 0)[..., None], picked, x)

    def project(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """y [.., V] = x · Wᵀ of the base, with the logits of `indices` from x · rowsᵀ."""
        new = jnp.einsum("...d,nd->...n", x.astype(y.dtype), self.rows[...].astype(y.dtype))
        return y.at[..., jnp.asarray(self.indices)].set(new)

    def __call__(self, x: jnp.ndarray, y: jnp.ndarray, linear: Linear) -> jnp.ndarray:
        """The Linear adapter protocol (an untied lm_head)."""
        return self.project(x, y)

    def merged(self, weight: jax.Array) -> jax.Array:
        """The base table with the rows written in (what a merged export saves), in weight's dtype."""
        return weight.at[jnp.asarray(self.indices)].set(self.rows[...].astype(weight.dtype))


def tables(model: nnx.Module) -> dict[str, nnx.Module]:
    """The vocabulary tables of a model by HF module path: model.embed_tokens, and lm_head if untied."""
    out = {"model.embed_tokens": model.model.embed_tokens}
    if isinstance(getattr(model, "lm_head", None), Linear):
        out["lm_head"] = model.lm_head
    return out


def attach(model: nnx.Module, indices, dtype=jnp.float32) -> nnx.Module:
    """Token-row adapters on the embedding and an untied lm_head, in place; returns the model."""
    for path, table in tables(model).items():
        if table.adapter is not None:
            raise ValueError(f"{path} already has an adapter ({type(table.adapter).__name__}): the new token rows "
                             "need its adapter slot; leave lm_head out of lora.targets")
        weight = table.weight[...] if isinstance(table, Embed) else table.dense_weight()
        table.adapter = TokenRows(weight, indices, dtype)
    return model


def adapters(model: nnx.Module) -> dict[str, TokenRows]:
    """HF module path → its TokenRows adapter, for the tables that have one."""
    return {path: t.adapter for path, t in tables(model).items() if isinstance(t.adapter, TokenRows)}


def merge(model: nnx.Module) -> nnx.Module:
    """Writes every token-row adapter's rows into its table and removes it, in place."""
    for table in tables(model).values():
        if isinstance(table.adapter, TokenRows):
            table.weight.set_value(table.adapter.merged(table.weight[...]))
            table.adapter = None
    return model
