"""Export a run back to PyTorch: a merged Hugging Face folder, or a PEFT adapter.

    jaxft export --workdir workdir/demo --out out/merged --format hf
    jaxft export --workdir workdir/demo --out out/adapter --format peft

`hf`: adapters merged into the base weights (LoRA: W + s·BA; DoRA: magnitude-rescaled), written as
sharded safetensors + index with config.json, generation_config.json and the tokenizer files —
`AutoModelForCausalLM.from_pretrained(out)` loads it as is. A QLoRA run's quantized base is
dequantized (in float32) before the merge, and written in model.dtype or the `dtype` asked for.
`peft`: `adapter_model.safetensors` + `adapter_config.json` with PEFT's key names, for
`PeftModel.from_pretrained(base, out)`, vLLM's LoRA loader and llama.cpp's convert_lora_to_gguf.py,
which all compute the same update from it (one rank and one lora_alpha/r for every module: see
write_peft_adapter); it refers to the base by its path or hub id — for a QLoRA run too, the original
unquantized base, as PEFT does for bitsandbytes runs. The transformers 5 tokenizer_class
"TokenizersBackend" is written as "PreTrainedTokenizerFast", which transformers 4.x also loads.
What the adapter says besides the weights (PEFT's task_type, the modules trained whole beside the
adapters: modules_to_save) is the task's (Task.export_info). The checkpoint is restored without
its optimizer state (jaxft.run.restore), and both formats gather one tensor at a time, so host
memory stays near the model plus the largest tensor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil

import jax
import numpy as np

from jaxft import hf, vocab
from jaxft import run as run_lib
from jaxft.models import registry
from jaxft.models.keys import LAYER
from jaxft.peft import token_rows
from jaxft.pretrained import DTYPES, flat_params, save_pretrained
from jaxft.tasks.base import ExportInfo

# Our adapter param name → PEFT's key suffix (the module path before it is the HF module path).
_PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"}


# vLLM's accepted --max-lora-rank values and its default (vllm/config/lora.py, LoRAConfig.max_lora_rank).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
log = logging.getLogger("jaxft.export")

EXPORT_MARKER = "jaxft_export.json"  # what this folder is (run, step, format): also how a re-export knows it


def export(workdir: str, out: str, format: str = "hf", step: int | None = None, dtype: str | None = None,
           overwrite: bool = False) -> str:
    """Writes the export into a staging folder beside `out` and moves it into place only when it is
    complete, replacing an earlier jaxft export whole (no stale shards or index survive). A non-empty
    `out` that is not an earlier export is refused unless `overwrite`; so is `out` inside the run's
    base model or its checkpoints (it would change what the run resumes from)."""
    if format not in ("hf", "peft"):
        raise ValueError(f"export format {format!r} is not hf or peft")
    config = run_lib.saved_config(workdir, step)
    check_destination(out, workdir, [config.model.path], overwrite)
    trained = run_lib.restore(workdir, step)
    model, meta = trained.model(), trained.meta
    config = meta["config"]
    check_destination(out, workdir, [meta["base"]["path"]], overwrite)  # a hub id resolved to its cache folder
    from jaxft.peft import methods as peft_methods

    method = peft_methods.method(config)
    if format == "peft" and not peft_methods.is_adapter_run(config):
        raise ValueError(f"{workdir} is a full fine-tuning run (lora.rank=0): it has no adapter; use --format hf")
    rows = token_rows.adapters(model)  # model.add_tokens: the new vocabulary's rows
    if format == "hf" and method in peft_methods.VIRTUAL:
        raise ValueError(f"{workdir} trained {method}: its virtual tokens cannot be merged into the weights; "
                         "export it with --format peft")
    with _staged(out) as staging:
        if format == "hf":
            if method == "ia3":
                from jaxft.peft.ia3 import merge_ia3

                merge_ia3(model)
            elif config["lora"]["rank"]:
                from jaxft.peft.lora import merge_lora

                merge_lora(model)
                token_rows.merge(model)
            from jaxft.peft.quant import dequantize_model

            dequantize_model(model)  # QLoRA: base Linears that no adapter targeted are still quantized
            save_pretrained(model, staging, dtype=dtype)
        elif method != "lora":
            from jaxft.peft.peft_format import write_adapter

            write_adapter(method, model, trained.params, meta, staging, dtype, trained.task.export_info())
            hf.copy_tokenizer_files(meta["base"]["path"], staging)
        else:
            write_peft_adapter(trained.params, meta, staging, dtype, fused_parts(model), trained.task.export_info(),
                               rows, model.config.tie_word_embeddings, peft_modules(model))
            hf.copy_tokenizer_files(meta["base"]["path"], staging)
        if vocab.changes_tokenizer(trained.config) and jax.process_index() == 0:  # the tokens and template it trained with
            vocab.save_tokenizer(vocab.load_tokenizer(trained.config, meta["base"]["path"]), staging)
        if rows and format == "peft":
            log.warning("PEFT adapter with new tokens (trainable_token_indices: PEFT >= 0.15; an untied lm_head's "
                        "needs huggingface/peft#2863, Oct 2025): load it on the base resized as it was trained, "
                        "base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=%d) with the tokenizer in %s "
                        "(vocab_size %d). vLLM and llama.cpp do not read trainable token rows: serve those from "
                        "--format hf", trained.config.model.pad_vocab_multiple, out, model.config.vocab_size)
        if jax.process_index() == 0:
            hf.write_json(staging, EXPORT_MARKER, {"workdir": os.path.abspath(workdir), "step": trained.step,
                                                   "format": format, "dtype": dtype})
    return out


def check_destination(out: str, workdir: str, base_paths: list[str], overwrite: bool) -> None:
    """Refuses an `out` that would overwrite the base, the run's checkpoints or a folder of someone else's."""
    target = os.path.realpath(out)
    for base in base_paths:
        if base and os.path.isdir(base) and _overlap(target, os.path.realpath(base)):
            raise ValueError(f"--out {out} overlaps the run's base model folder {base}: exporting there would "
                             "replace the weights the run's checkpoints apply to; choose another folder")
    checkpoints = os.path.join(workdir, "checkpoints")
    if _overlap(target, os.path.realpath(checkpoints)):
        raise ValueError(f"--out {out} overlaps the run's checkpoints ({checkpoints}); export to a folder of its "
                         f"own, e.g. {os.path.join(workdir, 'hf')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, EXPORT_MARKER)) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty and holds no earlier jaxft export ({EXPORT_MARKER}); "
                              "choose an empty folder, or pass --overwrite to replace what is there")


def _overlap(a: str, b: str) -> bool:
    """One real path is the other or inside it."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def _staged(out: str):
    """A folder beside `out` to write into; on success it replaces `out` (the old one removed only
    after the new one is in place), on failure it is removed and `out` is untouched. The name is the
    same on every host (process 0 writes; the others only join the gathers)."""
    out = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    writer = jax.process_index() == 0
    if writer:
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
        os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if writer:
        retired = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.replaced")
        shutil.rmtree(retired, ignore_errors=True)
        if os.path.exists(out):
            os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)


def fused_parts(model) -> dict[str, tuple[str, int, int]]:
    """Projections that jaxft keeps apart but the HF checkpoint fuses (Phi-3's qkv_proj and
    gate_up_proj): part module path → (fused module path, first row, stop row)."""
    family = registry.family_for({"model_type": model.config.to_hf()["model_type"]})
    _, params = flat_params(model)
    parts = {}
    for rule in family.convert.key_table(model.config, list(params)):
        if rule.rows and rule.param.endswith(".weight"):
            fused_module = rule.hf.removesuffix(".weight").replace(LAYER + ".", "")
            parts[rule.param.removesuffix(".weight")] = (fused_module, *rule.rows)
    return parts


def peft_modules(model):
    """The family's map from a jaxft module path and its adapter param's shape to (HF module, index
    into the param) pairs, where it is not one module per layer (MoE: one per layer and expert), or None."""
    convert = registry.family_for({"model_type": model.config.to_hf()["model_type"]}).convert
    if not hasattr(convert, "peft_modules"):
        return None
    return lambda module_path, shape: convert.peft_modules(model.config, module_path, shape)


def write_peft_adapter(params: dict[str, jax.Array], meta: dict, out: str, dtype: str | None = None,
                       fused: dict[str, tuple[str, int, int]] | None = None, info: ExportInfo = ExportInfo(),
                       rows: dict | None = None, tied: bool = False, modules_of=None) -> None:
    """adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight` etc., one per
    layer, and the adapter_config.json PEFT writes for the same LoRA settings. `info.modules_to_save`
    (trained whole) are written under their HF keys, as PEFT saves them. `rows` (module path →
    jaxft.peft.token_rows.TokenRows: new tokens) are PEFT's trainable tokens, the values of those rows
    as `<module>.token_adapter.trainable_tokens_delta` with `trainable_token_indices` (PEFT >= 0.15).

    Every reader computes the same update from it: PEFT, vLLM (whether or not its version reads
    rank/alpha patterns) and llama.cpp's convert_lora_to_gguf.py, which keeps one `lora_alpha` and
    divides it by each tensor's rank, ignoring `rank_pattern`, `alpha_pattern` and `use_rslora`. So
    every module's adapter has the same rank R, written as `r`, and `lora_alpha = s·R` for the trained
    scale s (alpha/rank; rsLoRA's alpha/√rank, written as plain scaling, `use_rslora: false`): no
    patterns, and the tensors are the trained ones. R is the rank, or k·rank where `fused` (see
    fused_parts) folds k adapted parts onto one HF module (Phi-3's qkv_proj, gate_up_proj): A stacks
    the parts' A, B is block-diagonal (zero rows for parts without an adapter), DoRA magnitudes
    concatenate. Adapters of smaller rank get zero rows of A and zero columns of B, which change no
    update (DoRA's norm of W + s·BA included). A rank above vLLM's default max_lora_rank (16) is
    logged with the --max-lora-rank that serves it; a DoRA adapter, with the consumers that refuse it.
    """
    fused = fused or {}
    lora = meta["config"]["lora"]
    entries, modules, whole = [], set(), set()
    groups: dict[str, dict[str, dict[str, jax.Array]]] = {}  # fused module → part module → its adapter params
    rows = rows or {}
    for module_path, adapter in sorted(rows.items()):
        value = adapter.rows.get_value()
        out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(value.dtype)
        entries.append((f"base_model.model.{module_path}.token_adapter.trainable_tokens_delta", tuple(value.shape),
                        out_dtype, lambda v=value: np.asarray(jax.device_get(v))))
    for path, value in sorted(params.items()):
        module_path, _, name = path.rpartition(".adapter.")
        if module_path in rows and name == "rows":
            continue  # written above, trained or not
        if module_path in fused:
            groups.setdefault(fused[module_path][0], {}).setdefault(module_path, {})[name] = value
            continue
        module = path.split(".", 1)[0]
        if module in info.modules_to_save and ".adapter." not in path:  # PEFT's key: the HF key under base_model.model.
            whole.add(module)
            out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(value.dtype)
            entries.append((f"base_model.model.{path}", tuple(value.shape), out_dtype,
                            lambda v=value: np.asarray(jax.device_get(v))))
            continue
        if not module_path or name not in _PEFT_NAMES:
            raise ValueError(f"trainable param {path} is not a LoRA adapter param; a PEFT adapter cannot carry it")
        out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(value.dtype)
        stacked = module_path.startswith("model.layers.")
        targets = modules_of(module_path, tuple(value.shape)) if modules_of else None
        if targets is None:  # one HF module per layer of the stack
            targets = ([(module_path.replace("model.layers.", f"model.layers.{i}.", 1), (i,)) for i in range(value.shape[0])]
                       if stacked else [(module_path, ())])
        for hf_module, index in targets:
            modules.add(hf_module.rsplit(".", 1)[-1])
            fetch = lambda v=value, index=index: np.asarray(jax.device_get(v[index]))  # noqa: E731
            shape = tuple(value.shape[len(index):])
            entries.append((f"base_model.model.{hf_module}.{_PEFT_NAMES[name]}", shape, out_dtype, fetch))
    folded = {}  # fused module name → number of adapted parts
    for fused_module, adapted in groups.items():
        modules.add(fused_module.rsplit(".", 1)[-1])
        folded[fused_module.rsplit(".", 1)[-1]] = len(adapted)
        all_parts = sorted((start, stop, part) for part, (module, start, stop) in fused.items() if module == fused_module)
        entries += _fused_entries(fused_module, all_parts, adapted, lora["rank"], dtype)
    rank = lora["rank"] * max(folded.values(), default=1)
    scale = lora["alpha"] / (math.sqrt(lora["rank"]) if lora["use_rslora"] else lora["rank"])
    # llama.cpp reads lora_alpha 0 as "no scaling" (scale 1): a zero scale is written as zero B instead.
    alpha = scale * rank if scale else float(rank)
    entries = [_at_rank(entry, rank, zero=not scale) for entry in entries]
    hf.write_safetensors(os.path.join(out, "adapter_model.safetensors"), entries)
    base = meta["base"]
    hf.write_json(out, "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": info.peft_task_type,
        "base_model_name_or_path": base.get("repo_id") or base["path"],
        "revision": base.get("revision"),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": lora["dropout"],
        "target_modules": sorted(modules),
        "use_rslora": False,
        "use_dora": lora["use_dora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": sorted(whole) or None,
        "trainable_token_indices": vocab.peft_token_indices(rows, tied) if rows else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    })
    if jax.process_index() == 0:
        _tell_consumers(lora, rank, alpha, folded)


def _at_rank(entry: tuple, rank: int, zero: bool = False) -> tuple:
    """An adapter entry padded to `rank`: zero rows of lora_A, zero columns of lora_B (`zero`: B all
    zeros). Other entries (DoRA magnitudes, modules_to_save) as they are."""
    key, shape, out_dtype, fetch = entry
    if key.endswith(".lora_A.weight"):
        axis = 0
    elif key.endswith(".lora_B.weight"):
        axis = 1
    else:
        return entry
    if shape[axis] == rank and not (zero and axis == 1):
        return entry
    padded_shape = tuple(rank if d == axis else n for d, n in enumerate(shape))

    def padded():
        array = np.asarray(fetch())
        full = np.zeros(padded_shape, array.dtype)
        if not (zero and axis == 1):
            full[tuple(slice(0, n) for n in array.shape)] = array
        return full

    return key, padded_shape, out_dtype, padded


def _tell_consumers(lora: dict, rank: int, alpha: float, folded: dict[str, int]) -> None:
    """What serving it takes, logged: vLLM's --max-lora-rank beyond its default, DoRA's refusals."""
    trained = f"rank {lora['rank']}, alpha {lora['alpha']:g}" + (", rsLoRA" if lora["use_rslora"] else "")
    if rank != lora["rank"] or alpha != lora["alpha"] or lora["use_rslora"]:
        log.info("PEFT adapter: adapter_config.json says r=%d, lora_alpha=%g (trained: %s), so that lora_alpha/r "
                 "is the trained scale of every module in PEFT, vLLM and llama.cpp alike", rank, alpha, trained)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        why = ("; ".join(f"{name} carries {k} adapters of rank {lora['rank']}" for name, k in sorted(folded.items()))
               if rank > lora["rank"] else f"trained at rank {rank}")
        fits = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
        how = (f"serve it with --max-lora-rank {fits[0]}" if fits else
               f"vLLM's largest max_lora_rank is {VLLM_MAX_LORA_RANKS[-1]}, so it cannot serve it: use --format hf")
        log.warning("PEFT adapter of rank %d (%s), above vLLM's default max_lora_rank %d: %s",
                    rank, why, VLLM_DEFAULT_MAX_LORA_RANK, how)
    if lora["use_dora"]:
        log.warning("DoRA adapter: PEFT reads it, but vLLM refuses DoRA adapters and llama.cpp's "
                    "convert_lora_to_gguf.py stops at their lora_magnitude_vector tensors; to serve it there, "
                    "export the merged model with --format hf")


def _fused_entries(fused_module: str, all_parts: list[tuple[int, int, str]], adapted: dict[str, dict[str, jax.Array]],
                   rank: int, dtype: str | None) -> list:
    """Per layer: the fused module's lora_A [k·r, in], block-diagonal lora_B [rows, k·r] and DoRA
    magnitude [rows], built from its adapted parts in row order."""
    order = [(start, stop, part) for start, stop, part in all_parts if part in adapted]
    rows = max(stop for _, stop, _ in all_parts)
    dora = any("lora_magnitude_vector" in p for p in adapted.values())
    if dora and len(order) < len(all_parts):
        missing = [part.rsplit(".", 1)[-1] for _, _, part in all_parts if part not in adapted]
        raise ValueError(f"DoRA on part of {fused_module} (no adapter on {missing}): PEFT's DoRA on the fused module "
                         "would need magnitudes for those rows too; target all of its parts, or use --format hf")
    first = adapted[order[0][2]]["lora_A"]
    stacked = fused_module.startswith("model.layers.")
    layers = first.shape[0] if stacked else 1
    out_dtype = np.dtype(DTYPES[dtype]) if dtype else np.dtype(first.dtype)

    def layer_of(value, i):
        return np.asarray(jax.device_get(value[i] if stacked else value), np.float32)

    def lora_a(i):
        return np.concatenate([layer_of(adapted[part]["lora_A"], i) for _, _, part in order])

    def lora_b(i):
        b = np.zeros((rows, rank * len(order)), np.float32)
        for j, (start, stop, part) in enumerate(order):
            b[start:stop, j * rank:(j + 1) * rank] = layer_of(adapted[part]["lora_B"], i)
        return b

    def magnitude(i):
        return np.concatenate([layer_of(adapted[part]["lora_magnitude_vector"], i) for _, _, part in order])

    entries = []
    in_features = first.shape[-1]
    for i in range(layers):
        prefix = "base_model.model." + (fused_module.replace("model.layers.", f"model.layers.{i}.", 1) if stacked else fused_module)
        entries.append((f"{prefix}.lora_A.weight", (rank * len(order), in_features), out_dtype, lambda i=i: lora_a(i)))
        entries.append((f"{prefix}.lora_B.weight", (rows, rank * len(order)), out_dtype, lambda i=i: lora_b(i)))
        if dora:
            entries.append((f"{prefix}.lora_magnitude_vector", (rows,), out_dtype, lambda i=i: magnitude(i)))
    return entries
