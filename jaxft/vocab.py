"""New tokens on a base model: the tokenizer gains them (and a chat template), the embedding and an
untied lm_head grow to the tokenizer's size, and the new rows start as transformers starts them.

    tokenizer = install(config, AutoTokenizer.from_pretrained(base))   # model.add_tokens / add_special_tokens,
                                                                       # data.chat_template
    new = plan(config, tokenizer, vocab_size=1024, where=base)         # NewVocab(1024 → 1027, rows 1024..1026)
    grow(model, new, seed=0)                                           # embedding [1027, D], lm_head too
    token_rows.attach(model, new.rows)                                 # LoRA runs: only these rows train

Config: `model.add_tokens` (ordinary tokens, as transformers' tokenizer.add_tokens) and
`model.add_special_tokens` (special ones: never split, dropped by decode(skip_special_tokens=True):
what a chat template's markers are), each a list of strings, ordinary ones first, in the order
listed; `model.pad_vocab_multiple` (default 1) rounds the grown vocabulary up (64 or 128 suit
TPUs); `train.new_token_rows` (default: True when the vocabulary grew) trains only the new rows in a
LoRA run. The rows that train are the listed tokens' (a token the tokenizer had keeps its id, and its
row trains too: base models often carry chat markers they never trained) plus every row the embedding
grew by (the padding rows too: they enter every softmax, so a PEFT adapter that carries them gives
the same logits on any base resized with the same pad_to_multiple_of).

The new rows are drawn as `PreTrainedModel.resize_token_embeddings(mean_resizing=True)` draws them
(transformers 5.24, modeling_utils._init_added_embeddings_weights_with_mean), per table, from the
old rows in float32: mean μ and covariance Σ = (W-μ)ᵀ(W-μ)/V; rows ~ N(μ, 1e-9·Σ) when 1e-9·Σ is
positive definite (its Cholesky factor exists), else μ exactly. The draw is jax's (train.seed), not
torch's generator: the same distribution, not the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

log = logging.getLogger("jaxft.vocab")

COVARIANCE_SCALE = 1e-9  # transformers' epsilon: the new rows stay within ~3e-5 standard deviations of the mean


@dataclasses.dataclass(frozen=True)
class NewVocab:
    """How a base model's vocabulary grows: `old_size` rows → `size`; `rows` are the ids that train."""

    old_size: int
    size: int
    rows: tuple[int, ...]


def token_settings(config) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(ordinary tokens, special tokens, pad multiple) of config.model, checked (errors name the key)."""
    m = config.model
    lists = []
    for key in ("add_tokens", "add_special_tokens"):
        value = m[key]
        value = (value,) if isinstance(value, str) else tuple(value or ())
        if not all(isinstance(t, str) and t for t in value):
            raise ValueError(f"model.{key} must be a list of non-empty strings, got {m[key]!r}")
        lists.append(value)
    both = [t for t in lists[0] if t in lists[1]]
    if both:
        raise ValueError(f"{both} are in both model.add_tokens and model.add_special_tokens: list each token once")
    multiple = m.pad_vocab_multiple
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"model.pad_vocab_multiple must be an integer >= 1, got {multiple!r}")
    return lists[0], lists[1], multiple


def chat_template(config) -> str | None:
    """data.chat_template as text (a Jinja string, or read from the file it names), or None."""
    from jaxft.data.config import read_chat_template

    return read_chat_template(config.data.get("chat_template"))


def install(config, tokenizer):
    """Adds config's tokens to `tokenizer` and sets data.chat_template as its template, in place;
    returns it. Tokens it already has keep their ids."""
    from tokenizers import AddedToken

    ordinary, special, _ = token_settings(config)
    if ordinary:
        tokenizer.add_tokens(list(ordinary))
    if special:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    template = chat_template(config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def tokens_added(config) -> bool:
    ordinary, special, _ = token_settings(config)
    return bool(ordinary or special)


def plan(config, tokenizer, vocab_size: int, where: str) -> NewVocab | None:
    """How the model's vocabulary grows for `tokenizer` (install()ed), or None when it does not.
    A tokenizer larger than the model without model.add_tokens is refused here, before anything compiles."""
    size = len(tokenizer)
    if not tokens_added(config):
        if size > vocab_size:
            raise ValueError(
                f"{where}: the tokenizer has {size} tokens but the model's vocab_size is {vocab_size} (config.json): "
                f"ids {vocab_size}..{size - 1} have no embedding row; list the new tokens in model.add_tokens "
                "(or model.add_special_tokens) to grow the embedding to the tokenizer, or use the model's own tokenizer")
        return None
    ordinary, special, multiple = token_settings(config)
    new_size = max(vocab_size, -(-size // multiple) * multiple)
    listed = set(tokenizer.convert_tokens_to_ids(list(ordinary + special)))
    rows = tuple(sorted(listed | set(range(vocab_size, new_size))))
    if new_size > vocab_size:
        log.info("vocabulary grows %d → %d (tokenizer %d, model.pad_vocab_multiple %d); rows %s train", vocab_size,
                 new_size, size, multiple, _span(rows))
    return NewVocab(vocab_size, new_size, rows)


def load_tokenizer(config, path: str):
    """The run's tokenizer: the base's (AutoTokenizer) with config's tokens and chat template installed."""
    from transformers import AutoTokenizer

    return install(config, AutoTokenizer.from_pretrained(path))


def trains_rows(config, new: NewVocab | None) -> bool:
    """train.new_token_rows, whose default (None) is True when the vocabulary grew."""
    flag = config.train.new_token_rows
    return bool(new) if flag is None else bool(flag) and new is not None


def _span(rows) -> str:
    rows = list(rows)
    return f"{rows[0]}..{rows[-1]}" if rows == list(range(rows[0], rows[-1] + 1)) else str(rows)


# ---- the model ------------------------------------------------------------------------------------
def mean_resized_rows(weight: jax.Array, count: int, key: jax.Array) -> jax.Array:
    """`count` new rows for an [V, D] table, as transformers' mean_resizing (see the module
    docstring), in the table's dtype."""
    w = weight.astype(jnp.float32)
    mean = jnp.mean(w, axis=0)  # [D]
    centered = w - mean
    covariance = centered.T @ centered / w.shape[0]  # [D, D]
    factor = jnp.linalg.cholesky(COVARIANCE_SCALE * covariance)  # NaN where not positive definite
    positive_definite = jnp.all(jnp.isfinite(factor))
    z = jax.random.normal(key, (count, w.shape[1]), jnp.float32)
    drawn = mean + z @ jnp.where(positive_definite, factor, 0.0).T
    rows = jnp.where(positive_definite, drawn, jnp.broadcast_to(mean, drawn.shape))
    return rows.astype(weight.dtype)


def grow(model: nnx.Module, new: NewVocab, seed: int = 0) -> nnx.Module:
    """The embedding (and an untied lm_head) grown to new.size rows in place, the new ones drawn by
    mean_resized_rows; the model's config says the new vocab_size (what a merged export writes).
    A table still abstract (a ShapeDtypeStruct that a checkpoint will fill) only changes shape."""
    from jaxft.peft.token_rows import tables

    if new.size > new.old_size:
        for path, table in tables(model).items():
            weight = table.weight.get_value()
            if weight.shape[0] != new.old_size:
                raise ValueError(f"{path} has {weight.shape[0]} rows, the model's vocab_size is {new.old_size}")
            shape = (new.size, *weight.shape[1:])
            if isinstance(weight, jax.ShapeDtypeStruct):
                grown = jax.ShapeDtypeStruct(shape, weight.dtype, sharding=_placement(table.weight, shape, weight))
            else:
                key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
                grown = jnp.concatenate([weight, mean_resized_rows(weight, new.size - new.old_size, key)])
                target = _placement(table.weight, shape, weight)
                if target is not None:
                    grown = jax.device_put(grown, target)
            table.weight = table.weight.replace(value=grown)
    model.config = dataclasses.replace(model.config, vocab_size=new.size)
    model.model.spec = dataclasses.replace(model.model.spec, vocab_size=new.size)
    return model


def _placement(variable, shape, weight):
    """The grown table's sharding: by its logical axes on the mesh the old one was on."""
    sharding_ = getattr(weight, "sharding", None) if not isinstance(weight, jax.core.Tracer) else None
    if isinstance(sharding_, jax.sharding.NamedSharding):
        from jaxft import sharding as sharding_lib

        return sharding_lib.named_sharding(variable.axes, shape, sharding_.mesh)
    return sharding_


# ---- exports --------------------------------------------------------------------------------------
def changes_tokenizer(config) -> bool:
    """Whether the run's tokenizer differs from the base's (tokens added, or a chat template set)."""
    return tokens_added(config) or chat_template(config) is not None


def save_tokenizer(tokenizer, out: str) -> None:
    """Writes the run's tokenizer over the base's tokenizer files in `out` (generation_config.json
    kept), as jaxft.hf.copy_tokenizer_files writes them (a v5-only tokenizer_class renamed)."""
    from jaxft import hf

    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)
        for name in hf.TOKENIZER_FILES:
            if name != "generation_config.json" and os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        hf.copy_tokenizer_files(staging, out)


def peft_token_indices(adapters: dict, tied: bool):
    """adapter_config.json's trainable_token_indices: a list (the input embedding; a tied lm_head
    follows it in PEFT) or, untied, {"embed_tokens": [...], "lm_head": [...]}."""
    indices = {path.rsplit(".", 1)[-1]: list(a.indices) for path, a in adapters.items()}
    return indices["embed_tokens"] if tied or set(indices) == {"embed_tokens"} else indices


__all__ = ["NewVocab", "install", "plan", "grow", "load_tokenizer", "mean_resized_rows", "trains_rows",
           "save_tokenizer", "peft_token_indices"]
