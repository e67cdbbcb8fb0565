"""The `data` config section: defaults, validation (errors name the key), source specs.

A run config (ml_collections ConfigDict, or any object/dataclass/dict with `data` and `train`
attributes) is read once into a frozen `DataSettings`; nothing downstream looks at the raw config.

Source specs, accepted by `data.train`, `data.validation` and each stage's `train`:
    "data/*.jsonl", "gs://bucket/x.parquet"   local or GCS files (globs; .jsonl/.json/.ndjson[.gz],
                                                                                        .parquet/.pq), several matching files = one source
    "hf:org/name@split", "hf:/local/folder"   HF `datasets` (hub id when online, a folder written by
                                                                                        `save_to_disk`, or a local folder of data files)
    "tfds:name/config:1.0.0@train[:90%]"      TFDS `data_source` on array_record (`data_dir` from
                                                                                        the dict spec or `data.tfds_data_dir`; may be gs://)
    {"path": ..., "weight": 0.3, "format": "chat", "split": "train", "messages_field": "conv",
      "data_dir": ..., "data_files": ..., "name": ...}    per-source overrides
A list of specs is a multi-source dataset: concatenated, or mixed by `weight` / `data.weights`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jaxft.data.errors import DataError

FORMATS = ("text", "prompt_completion", "chat", "preference")  # preference: task=dpo / reward (data.preference)
FIELD_KEYS = ("text_field", "prompt_field", "completion_field", "messages_field", "role_field",
                            "content_field", "chosen_field", "rejected_field")


@dataclasses.dataclass(frozen=True)
class DataDefaults:
    """Every `data.*` key with its default. One comment per field says what it means."""

    train: Any = None                  # source spec, or a list of them (see module docstring)
    validation: Any = None             # its own source spec(s), or {name: spec} (eval_loss/<name> each); or
                                       # use validation_fraction
    validation_fraction: float = 0.0   # hold out this fraction of each training source's rows
    format: str = "text"               # text | prompt_completion | chat | preference (pairs: task=dpo/reward)
    seq_len: int = 2048                # tokens per packed/padded row (model inputs)
    packing: bool = True               # pack documents into rows (segment_ids) instead of padding
    shuffle: bool = True               # deterministic shuffle from train.seed, reshuffled each epoch
    epochs: Any = None                 # None: repeat forever (the loop stops at train.steps)
    weights: Any = None                # mixture weights, one per training source
    stages: Any = None                 # curriculum: [{"train": spec(s), "weights":..., "epochs"|"examples": n}]
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    chosen_field: str = "chosen"       # preference rows: {prompt, chosen, rejected} (strings or message lists)
    rejected_field: str = "rejected"
    margin_field: Any = None           # preference rows: a column with each pair's margin (task=reward)
    roles: tuple = ("system", "user", "assistant", "tool")  # any other role is a row error
    chat_template: Any = None          # override the tokenizer's template: a Jinja string or a file
    train_on: str = "all_assistant"    # chat: all_assistant | last_assistant turns carry the loss
    add_eos: bool = True               # text/prompt_completion: append EOS (a trained target)
    on_error: str = "raise"            # raise | skip bad rows (skips are counted and reported)
    overlong: str = "truncate"         # truncate (chat: drop oldest turns, keep system) | drop
    tfds_data_dir: Any = None          # default data_dir for tfds: sources
    cache_dir: Any = None              # cache tokenized data here, keyed by files+tokenizer+config
    packing_bins: int = 0              # rows packed at once (0: max(16, 2 * host batch)); more = denser
    prefetch: int = 2                  # batches prepared ahead in a background thread (0: none)
    process_index: Any = None          # this host's shard (None: jax.process_index())
    process_count: Any = None          # number of shards (None: jax.process_count())


DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataDefaults))


def default_config():
    """The `data` section as an ml_collections ConfigDict, for configs/*.py to start from."""
    import ml_collections  # pylint: disable=g-import-not-at-top

    values = dataclasses.asdict(DataDefaults())
    values["roles"] = list(values["roles"])
    return ml_collections.ConfigDict(values, type_safe=False)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One logical dataset: files matching a pattern, an HF dataset, or a TFDS dataset."""

    kind: str                 # jsonl | parquet | hf | tfds
    path: Any                 # pattern(s), HF path/name, or TFDS name
    split: str | None = None  # hf/tfds split (with TFDS slicing syntax); None: by role
    weight: float | None = None
    format: str | None = None
    fields: tuple = ()        # ((field_key, name), ...) overrides of data.*_field
    options: tuple = ()       # ((key, value), ...): data_dir, data_files, name


@dataclasses.dataclass(frozen=True)
class Stage:
    sources: tuple            # SourceSpec, ...
    epochs: int | None = None
    examples: int | None = None


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Validated, frozen view of `data.*` plus the `train.*` keys the data path needs."""

    stages: tuple             # Stage, ...  (one stage unless data.stages is set)
    validation: tuple         # SourceSpec, ... (empty: none, or validation_fraction)
    validation_names: tuple   # one name per validation source ({name: spec}), or () when unnamed
    validation_fraction: float
    format: str
    seq_len: int
    packing: bool
    shuffle: bool
    fields: tuple             # ((field_key, name), ...)
    margin_field: str | None
    roles: tuple
    chat_template: str | None
    train_on: str
    add_eos: bool
    on_error: str
    overlong: str
    tfds_data_dir: str | None
    cache_dir: str | None
    packing_bins: int
    prefetch: int
    batch_size: int           # global, in sequences
    seed: int
    process_index: int
    process_count: int

    @property
    def host_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def field(self, key: str, source: SourceSpec | None = None) -> str:
        if source is not None:
            overrides = dict(source.fields)
            if key in overrides:
                return overrides[key]
        return dict(self.fields)[key]


def _section(config: Any, name: str) -> dict:
    """Reads config.<name> as a plain dict, whether ConfigDict, dataclass, mapping or object."""
    section = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    if dataclasses.is_dataclass(section):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    if isinstance(section, Mapping):
        return dict(section)
    return dict(vars(section))


def _plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict / tuples -> plain dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve(config: Any, *, process_index: int | None = None,
                        process_count: int | None = None) -> DataSettings:
    """Validates `config.data` and `config.train.{batch_size,seed}`; errors name the key."""
    data = {k: _plain(v) for k, v in _section(config, "data").items()}
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise DataError(f"unknown config key(s) data.{', data.'.join(unknown)}; "
                                        f"known data keys: {', '.join(DATA_KEYS)}")
    values = {**dataclasses.asdict(DataDefaults()), **{k: v for k, v in data.items()}}
    train = _section(config, "train")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise DataError(f"{key} {what}, got {values[key.removeprefix('data.')]!r}")

    fmt = values["format"]
    need(fmt in FORMATS, "data.format", f"must be one of {FORMATS}")
    need(_is_int(values["seq_len"]) and values["seq_len"] >= 2, "data.seq_len", "must be an int >= 2")
    for key in ("packing", "shuffle", "add_eos"):
        need(isinstance(values[key], bool), f"data.{key}", "must be true or false")
    need(values["on_error"] in ("raise", "skip"), "data.on_error", "must be 'raise' or 'skip'")
    need(values["overlong"] in ("truncate", "drop"), "data.overlong", "must be 'truncate' or 'drop'")
    need(values["train_on"] in ("all_assistant", "last_assistant"), "data.train_on",
              "must be 'all_assistant' or 'last_assistant'")
    need(isinstance(values["validation_fraction"], (int, float))
              and 0 <= values["validation_fraction"] < 1, "data.validation_fraction", "must be in [0, 1)")
    need(values["epochs"] is None or (_is_int(values["epochs"]) and values["epochs"] >= 1),
              "data.epochs", "must be None (forever) or an int >= 1")
    need(_is_int(values["packing_bins"]) and values["packing_bins"] >= 0, "data.packing_bins",
              "must be an int >= 0")
    need(_is_int(values["prefetch"]) and values["prefetch"] >= 0, "data.prefetch", "must be an int >= 0")
    for key in FIELD_KEYS:
        need(isinstance(values[key], str) and values[key], f"data.{key}", "must be a non-empty string")
    need(values["margin_field"] is None or (isinstance(values["margin_field"], str) and values["margin_field"]),
         "data.margin_field", "must be None or a column name")
    roles = tuple(values["roles"] or ())
    need(bool(roles) and all(isinstance(r, str) for r in roles) and "assistant" in roles,
              "data.roles", "must be a list of role names including 'assistant'")

    batch_size, seed = train.get("batch_size"), train.get("seed", 0)
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"train.batch_size must be an int >= 1 (global, in sequences), got {batch_size!r}")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"train.seed must be an int >= 0, got {seed!r}")

    index, count = _process_shard(process_index if process_index is not None else values["process_index"],
                                                                process_count if process_count is not None else values["process_count"])
    if batch_size % count:
        raise DataError(f"train.batch_size={batch_size} must be divisible by the number of hosts "
                                        f"({count}): each host loads batch_size / hosts sequences")

    stages = _parse_stages(values)
    if values["validation"] is not None and values["validation_fraction"] > 0:
        raise DataError("set data.validation or data.validation_fraction, not both")
    validation_spec, names = values["validation"], ()
    if isinstance(validation_spec, Mapping) and "path" not in validation_spec:  # {name: spec}: evaluated apart
        names = tuple(str(n) for n in validation_spec)
        for name in names:
            if not name or "/" in name:
                raise DataError(f"data.validation: source name {name!r} must be non-empty and have no '/'")
        validation_spec = list(validation_spec.values())
    validation = tuple(_parse_sources(validation_spec, "data.validation")) if validation_spec is not None else ()

    template = read_chat_template(values["chat_template"])

    return DataSettings(
            stages=stages, validation=validation, validation_names=names,
            validation_fraction=float(values["validation_fraction"]), format=fmt,
            seq_len=int(values["seq_len"]), packing=values["packing"], shuffle=values["shuffle"],
            fields=tuple((k, values[k]) for k in FIELD_KEYS), margin_field=values["margin_field"], roles=roles,
            chat_template=template,
            train_on=values["train_on"], add_eos=values["add_eos"], on_error=values["on_error"],
            overlong=values["overlong"], tfds_data_dir=values["tfds_data_dir"],
            cache_dir=values["cache_dir"], packing_bins=int(values["packing_bins"]),
            prefetch=int(values["prefetch"]), batch_size=int(batch_size), seed=int(seed),
            process_index=index, process_count=count)


def read_chat_template(template: Any) -> str | None:
    """data.chat_template as Jinja text: the string itself, or the file it names (no "{" in it)."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise DataError(f"data.chat_template must be a Jinja string or a file path, got {template!r}")
    if "{" not in template:
        if not os.path.isfile(template):
            raise DataError(f"data.chat_template: no such template file {template!r}")
        with open(template, encoding="utf-8") as f:
            template = f.read()
    return template


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _process_shard(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # pylint: disable=g-import-not-at-top
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not (_is_int(count) and count >= 1 and _is_int(index) and 0 <= index < count):
        raise DataError(f"data.process_index={index!r} must be in [0, data.process_count={count!r})")
    return index, count


def _parse_stages(values: dict) -> tuple:
    if values["stages"] is None:
        if values["train"] is None:
            raise DataError("data.train is not set: give a file pattern, 'hf:...', 'tfds:...', "
                                            "a list of them, or data.stages")
        sources = _parse_sources(values["train"], "data.train", values["weights"], "data.weights")
        return (Stage(tuple(sources), epochs=values["epochs"]),)
    if values["train"] is not None or values["weights"] is not None or values["epochs"] is not None:
        raise DataError("data.stages replaces data.train, data.weights and data.epochs (each stage "
                                        "has its own train, weights, epochs/examples): set one or the other")
    if not isinstance(values["stages"], list) or not values["stages"]:
        raise DataError(f"data.stages must be a non-empty list of dicts, got {values['stages']!r}")
    stages = []
    for i, stage in enumerate(values["stages"]):
        key = f"data.stages[{i}]"
        if not isinstance(stage, Mapping):
            raise DataError(f"{key} must be a dict with 'train' and 'epochs' or 'examples', got {stage!r}")
        unknown = set(stage) - {"train", "weights", "epochs", "examples"}
        if unknown:
            raise DataError(f"{key}: unknown key(s) {sorted(unknown)}; known: train, weights, epochs, examples")
        epochs, examples = stage.get("epochs"), stage.get("examples")
        is_last = i == len(values["stages"]) - 1
        if epochs is not None and examples is not None:
            raise DataError(f"{key}: set 'epochs' or 'examples', not both")
        if epochs is None and examples is None and not is_last:
            raise DataError(f"{key}: only the last stage may run forever; set 'epochs' or 'examples'")
        for name, n in (("epochs", epochs), ("examples", examples)):
            if n is not None and not (_is_int(n) and n >= 1):
                raise DataError(f"{key}.{name} must be an int >= 1, got {n!r}")
        sources = _parse_sources(stage.get("train"), f"{key}.train", stage.get("weights"), f"{key}.weights")
        stages.append(Stage(tuple(sources), epochs=epochs, examples=examples))
    return tuple(stages)


def _parse_sources(spec: Any, key: str, weights: Any = None, weights_key: str = "") -> list:
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise DataError(f"{key} is an empty list")
    sources = [parse_source(s, f"{key}[{i}]" if isinstance(spec, list) else key)
                          for i, s in enumerate(specs)]
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(sources):
            raise DataError(f"{weights_key} must be a list of {len(sources)} weights (one per source), "
                                            f"got {weights!r}")
        if any(s.weight is not None for s in sources):
            raise DataError(f"{key}: give weights in the source dicts or in {weights_key}, not both")
        sources = [dataclasses.replace(s, weight=w) for s, w in zip(sources, weights)]
    given = [s.weight is not None for s in sources]
    if any(given) and not all(given):
        raise DataError(f"{key}: either every source has a weight or none does")
    for s in sources:
        if s.weight is not None and not (isinstance(s.weight, (int, float)) and s.weight > 0):
            raise DataError(f"{key}: mixture weights must be > 0, got {s.weight!r}")
    return sources


def parse_source(spec: Any, key: str) -> SourceSpec:
    """'hf:name@split' / 'tfds:name@split' / file pattern / dict -> SourceSpec."""
    if isinstance(spec, Mapping):
        spec = dict(spec)
        allowed = {"path", "weight", "format", "split", "data_dir", "data_files", "name", *FIELD_KEYS}
        unknown = set(spec) - allowed
        if unknown:
            raise DataError(f"{key}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")
        if "path" not in spec:
            raise DataError(f"{key}: a source dict needs 'path', got {spec!r}")
        base = parse_source(spec["path"], key)
        fmt = spec.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise DataError(f"{key}.format must be one of {FORMATS}, got {fmt!r}")
        return dataclasses.replace(
                base, split=spec.get("split", base.split), weight=spec.get("weight"), format=fmt,
                fields=tuple((k, spec[k]) for k in FIELD_KEYS if k in spec),
                options=tuple((k, spec[k]) for k in ("data_dir", "data_files", "name") if k in spec))
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        kinds = {parse_source(s, key).kind for s in spec}
        if len(kinds) != 1 or kinds & {"hf", "tfds"}:
            raise DataError(f"{key}: a list of patterns inside one source must all be jsonl or all "
                                            f"parquet files, got {spec!r}")
        return SourceSpec(kind=kinds.pop(), path=tuple(spec))
    if not isinstance(spec, str) or not spec:
        raise DataError(f"{key} must be a file pattern, 'hf:...', 'tfds:...' or a dict, got {spec!r}")
    for prefix in ("hf", "tfds"):
        if spec.startswith(prefix + ":"):
            name, _, split = spec[len(prefix) + 1:].partition("@")
            if not name:
                raise DataError(f"{key}: {spec!r} names no dataset")
            return SourceSpec(kind=prefix, path=name, split=split or None)
    return SourceSpec(kind=_file_kind(spec, key), path=(spec,))


def _file_kind(pattern: str, key: str) -> str:
    name = pattern.lower()
    if name.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"{key}: cannot tell the format of {pattern!r}: use a .jsonl/.json/.ndjson(.gz) "
                                    f"or .parquet pattern, 'hf:NAME' or 'tfds:NAME'")
