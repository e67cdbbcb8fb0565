"""What every family's config does with an HF config.json: check it, read the decoder's dimensions
and token ids, and write them back. Each family adds the fields that make it what it is.

Every value read from config.json goes through `Fields`, which checks its type and range in one
place and refuses a bad one with one line, `<config.json path>: <field>: <what is wrong>`, where
transformers would fail or, worse, build a model that computes NaN or something else. Types follow
transformers' strict configs (a size is an int, not "64", 2.5, null or true), except that an int
is accepted where a float goes (config.json files hold rope_theta 10000 as often as 10000.0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Mapping

# Fields that no forward pass reads, whatever the family.
INERT = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "task_specific_params",
})
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_MISSING = object()


def shown(value: Any) -> str:
    """A value as config.json spells it, with its JSON type where that is the problem."""
    text = json.dumps(value) if isinstance(value, (str, bool, list, dict, type(None), int, float)) else repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    kind = {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(type(value))
    return f"{text} ({kind})" if kind else text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a finite float (json.load reads NaN and Infinity too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Fields:
    """Typed, range-checked reads of one config.json object (or a nested one: `prefix` names it,
    e.g. "rope_parameters."). `default` is what a missing field means; null is allowed (and read as
    None) only where `null_ok`, except for switches (`bool`), where it means the default."""

    def __init__(self, values: Mapping[str, Any], where: str, prefix: str = ""):
        self.values, self.where, self.prefix = values, where, prefix

    def error(self, key: str, what: str) -> ValueError:
        return ValueError(f"{self.where}: {self.prefix}{key}: {what}")

    def _raw(self, key: str, default: Any, null_ok: bool, need: str) -> tuple[Any, bool]:
        """(value, whether it needs no check): the default where the field is missing, None where it
        is null and `null_ok`."""
        value = self.values.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(key, f"missing: {need}")
            return default, True
        if value is None and null_ok:
            return None, True
        return value, False

    def int(self, key: str, default: Any = _MISSING, *, minimum: int = 1, null_ok: bool = False, need: str = "") -> Any:
        value, is_default = self._raw(key, default, null_ok, need or "a positive integer")
        if is_default:
            return value
        if not _is_int(value) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(key, f"must be {kind}{' or null' if null_ok else ''}, got {shown(value)}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, above: float | None = 0.0, at_least: float | None = None,
               at_most: float | None = None, null_ok: bool = False, need: str = "") -> Any:
        """An int or float > `above` (None: any), >= `at_least`, <= `at_most`; returned as given, so that
        it is written back with its type (transformers' strict configs tell 256 from 256.0)."""
        if at_least is not None:
            above = None
        if above is not None and at_most is not None:
            rule = f"a number in ({above:g}, {at_most:g}]"
        elif at_least is not None:
            rule = f"a number >= {at_least:g}"
        elif above is not None:
            rule = f"a number > {above:g}"
        else:
            rule = "a number"
        value, is_default = self._raw(key, default, null_ok, need or rule)
        if is_default:
            return value
        if (not _is_number(value) or (above is not None and not value > above)
                or (at_least is not None and value < at_least) or (at_most is not None and value > at_most)):
            raise self.error(key, f"must be {rule}{' or null' if null_ok else ''}, got {shown(value)}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        """true or false; null means the default (transformers writes some switches as null)."""
        value, is_default = self._raw(key, default, True, "true or false")
        if value is None:
            return default
        if not is_default and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {shown(value)}")
        return value

    def str(self, key: str, default: Any = _MISSING, *, null_ok: bool = False) -> Any:
        value, is_default = self._raw(key, default, null_ok, "a string")
        if not is_default and not isinstance(value, str):
            raise self.error(key, f"must be a string{' or null' if null_ok else ''}, got {shown(value)}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings (null: the default), returned as a tuple."""
        value, is_default = self._raw(key, default, True, "a list of strings")
        if is_default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {shown(value)}")
        return tuple(value)

    def numbers(self, key: str, need: str) -> tuple[float, ...]:
        """A required list of numbers (LongRoPE's factors), returned as a tuple of them as given."""
        value, _ = self._raw(key, _MISSING, False, need)
        if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
            raise self.error(key, f"must be a list of numbers, got {shown(value)}")
        return tuple(value)

    def object(self, key: str) -> dict[str, Any] | None:
        """A nested object, or None where the field is missing or null."""
        value = self.values.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.error(key, f"must be an object or null, got {shown(value)}")
        return value

    def token_id(self, key: str) -> None:
        """An id, null, or (eos) a list of ids: kept only to write back, but checked all the same."""
        value = self.values.get(key)
        if not (value is None or _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))):
            raise self.error(key, f"must be a token id (an integer), a list of them, or null, got {shown(value)}")


@dataclasses.dataclass(frozen=True)
class Dimensions:
    """The sizes of every family's decoder, under HF's names: the base of each family's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


def check(hf: dict[str, Any], family: str, model_types: Iterable[str], fields: Iterable[str], where: str) -> str:
    """Refuses another family's or a pre-quantized config and one missing a dimension; warns about
    fields neither INERT nor in `fields` (the family's own). Returns the model_type."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in tuple(model_types):
        raise ValueError(f"{where}: model_type {model_type!r} is not in the {family} family {tuple(model_types)}")
    quantization = Fields(hf, where).object("quantization_config")
    if quantization:
        raise ValueError(f"{where}: pre-quantized checkpoints ({quantization.get('quant_method')}) "
                         "are not supported; load the unquantized weights")
    unknown = sorted(set(hf) - INERT - set(REQUIRED) - set(fields) - {"num_key_value_heads", "quantization_config"})
    if unknown:
        logging.warning("%s: ignoring field(s) %s, which do not change the forward pass", where, unknown)
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")
    return model_type


def dimensions(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The decoder's sizes as config fields, each a positive int; num_key_value_heads (default:
    num_attention_heads, as in transformers) must divide num_attention_heads."""
    f = Fields(hf, where)
    sizes = {k: f.int(k) for k in REQUIRED}
    heads = sizes["num_attention_heads"]
    kv_heads = f.int("num_key_value_heads", None, null_ok=True) or heads
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads} "
                                             "(each key/value head serves a group of query heads)")
    return {**sizes, "num_key_value_heads": kv_heads}


def head_dim(hf: dict[str, Any], where: str, default: int | None = None, divisible_because: str | None = None) -> int:
    """head_dim from config.json, else `default`, else hidden_size / num_attention_heads, which must
    then divide. `divisible_because` (the family's reason) requires the division even when head_dim
    is given, where transformers' config for the family does."""
    given = Fields(hf, where).int("head_dim", None, null_ok=True)
    if divisible_because or (given is None and default is None):
        heads_divide_hidden(hf, where, divisible_because or "head_dim is their ratio when config.json gives none")
    return given or default or hf["hidden_size"] // hf["num_attention_heads"]


def heads_divide_hidden(hf: dict[str, Any], where: str, reason: str) -> None:
    f = Fields(hf, where)
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
    if hidden % heads:
        raise f.error("hidden_size", f"{hidden} is not a multiple of num_attention_heads={heads} ({reason})")


def common(hf: dict[str, Any], where: str, *, rms_norm_eps: float, max_position_embeddings: int,
           tie_word_embeddings: bool) -> dict[str, Any]:
    """The fields every family reads besides its dimensions, with the family's defaults: norm eps
    (> 0), context length, tying; the token ids are checked and kept to write them back."""
    f = Fields(hf, where)
    for key in TOKEN_IDS:
        f.token_id(key)
    return {"rms_norm_eps": f.number("rms_norm_eps", rms_norm_eps),
            "max_position_embeddings": f.int("max_position_embeddings", max_position_embeddings),
            "tie_word_embeddings": f.bool("tie_word_embeddings", tie_word_embeddings),
            "token_ids": tuple((k, hf[k]) for k in TOKEN_IDS if k in hf)}


def activation(hf: dict[str, Any], where: str, key: str, default: str, supported: Iterable[str],
               aliases: Mapping[str, str] | None = None, null_ok: bool = False) -> str:
    """An activation name (a string; null means the default where `null_ok`), mapped through
    `aliases`, that the decoder implements."""
    name = Fields(hf, where).str(key, default, null_ok=null_ok) or default
    name = (aliases or {}).get(name, name)
    if name not in tuple(supported):
        raise ValueError(f"{where}: {key} {name!r} is not supported (supported: {sorted(supported)})")
    return name


def common_to_hf(cfg, architecture: str) -> dict[str, Any]:
    """The fields every family writes: architecture, model_type, sizes, norm eps, tying, token ids."""
    return {"architectures": [architecture], "model_type": cfg.model_type,
            **{k: getattr(cfg, k) for k in (*REQUIRED, "num_key_value_heads")},
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, **dict(cfg.token_ids)}
