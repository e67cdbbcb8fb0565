"""Exports that every consumer reads the same (issue 18).

A jaxft export is read by PEFT, vLLM, llama.cpp and transformers 4.x as well as 5.x, and each reads
less of adapter_config.json / config.json than PEFT writes: llama.cpp's convert_lora_to_gguf.py keeps
one `lora_alpha` and computes `alpha / rank` per tensor at run time, ignoring `rank_pattern`,
`alpha_pattern` and `use_rslora`; vLLM refuses ranks above `--max-lora-rank` (16 by default) and DoRA;
transformers 4.x wants Phi-3's `rope_scaling` as exactly {type, short_factor, long_factor} and a
`tokenizer_class` it knows. Each test feeds an export to the consumer itself (llama.cpp's converter,
fetched at run time) or, where the consumer cannot be installed in CI (vLLM, transformers 4.x beside
5.x), to a function that mirrors its checks, citing the file it mirrors; and compares the update the
consumer would apply with the merged export's (merged − base weights).
"""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_export import trained

from jaxft import export, hf
from jaxft.demo import MODEL_DIR
from jaxft.testing_families import tiny_family_model

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp with convert_lora_to_gguf.py and gguf-py
CACHE = Path(os.environ.get("JAXFT_TEST_CACHE", "~/.cache/jaxft-test")).expanduser()


# ---------------------------------------------------------------------------------------------------
# llama.cpp: the real converter, fetched once into a cache folder keyed by version.

@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (convert_lora_to_gguf.py, convert_hf_to_gguf.py,
    conversion/, gguf-py/): fetched with `pip download` and cached; skipped if it cannot be fetched."""
    folder = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "llama.cpp"
    if (folder / "convert_lora_to_gguf.py").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
                                 capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot fetch llama.cpp's convert_lora_to_gguf.py (pip download llama-cpp-python=="
                        f"{LLAMA_CPP_PYTHON}): {e}")
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            last = (got.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot fetch llama.cpp's convert_lora_to_gguf.py (pip download llama-cpp-python=="
                        f"{LLAMA_CPP_PYTHON} failed: {last})")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".llama.cpp."))  # one per pytest worker
        with tarfile.open(sdists[0]) as sdist:
            members = []
            for member in sdist.getmembers():
                if member.name.startswith(prefix) and member.name[len(prefix):].startswith(wanted):
                    member.name = member.name[len(prefix):]
                    members.append(member)
            sdist.extractall(staging, members=members, filter="data")
        try:
            os.replace(staging, folder)
        except OSError:  # another worker got there first
            shutil.rmtree(staging, ignore_errors=True)
            if not (folder / "convert_lora_to_gguf.py").exists():
                raise
    return folder


def convert_lora(llama_cpp: Path, base: str, adapter: str, out: str) -> subprocess.CompletedProcess:
    """convert_lora_to_gguf.py --base BASE ADAPTER (f32), as a user runs it."""
    return subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base),
                           "--outfile", str(out), "--outtype", "f32", str(adapter)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def gguf_updates(path: str) -> dict[str, np.ndarray]:
    """What llama.cpp adds to each weight: scale · B·A, with scale = adapter.lora.alpha / rank and rank
    = B's ne[0] (src/llama-adapter.h, llama_adapter_lora_weight::get_scale; alpha 0 means scale 1)."""
    try:
        import gguf
    except ImportError:  # the converter's own copy
        sys.path.insert(0, str(CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "llama.cpp" / "gguf-py"))
        import gguf
    reader = gguf.GGUFReader(path)
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: np.asarray(t.data, np.float64) for t in reader.tensors}  # numpy shape = torch shape
    updates = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name.removesuffix(".lora_a") + ".lora_b"]  # [out, rank]
            scale = alpha / b.shape[1] if alpha else 1.0
            updates[name.removesuffix(".lora_a")] = scale * (b @ a)
    return updates


def weights(folder) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def merged_deltas(base: str, merged: str) -> dict[str, np.ndarray]:
    """merged − base for every projection weight, float64, by HF key."""
    before, after = weights(base), weights(merged)
    return {k: after[k].astype(np.float64) - before[k].astype(np.float64)
            for k in before if k.endswith("_proj.weight") and ".layers." in k}


def write_delta_adapter(deltas: dict[str, np.ndarray], out: Path) -> Path:
    """A full-rank PEFT adapter whose update is exactly `deltas` (A = I, B = Δ·rank/alpha), so that the
    converter maps it onto the GGUF tensors (names, row permutations) as it maps the real adapter."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, delta in deltas.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        rank = delta.shape[1]
        tensors[f"{prefix}.lora_A.weight"] = np.eye(rank, dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = (delta * rank).astype(np.float32)  # lora_alpha 1
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1.0}))
    return out


def llama_cpp_max_diff(llama_cpp: Path, base: str, adapter: str, merged: str, tmp: Path) -> tuple[float, float]:
    """(max |llama.cpp's update − merged export's update| over every GGUF weight, max |update|)."""
    done = convert_lora(llama_cpp, base, adapter, tmp / "adapter.gguf")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = convert_lora(llama_cpp, base, write_delta_adapter(merged_deltas(base, merged), tmp / "delta"),
                             tmp / "delta.gguf")
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, expected = gguf_updates(str(tmp / "adapter.gguf")), gguf_updates(str(tmp / "delta.gguf"))
    assert set(got) <= set(expected), sorted(set(got) - set(expected))
    diff = max(float(np.abs(got.get(name, 0.0) - update).max()) for name, update in expected.items())
    return diff, max(float(np.abs(u).max()) for u in expected.values())


# ---------------------------------------------------------------------------------------------------
# Runs: Phi-3 all-linear (fused qkv_proj / gate_up_proj) and rsLoRA on the demo's Llama.

@pytest.fixture(scope="module")
def phi3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    folder, _ = tiny_family_model(root / "base", "phi3_4k_partial", vocab_size=1024)
    hf.copy_tokenizer_files(MODEL_DIR, str(folder))
    trained(root / "run", f"--config.model.path={folder}", "--config.eval.task_file=None")
    export.export(str(root / "run"), str(root / "hf"), format="hf")
    export.export(str(root / "run"), str(root / "peft"), format="peft")
    return {"base": str(folder), "hf": str(root / "hf"), "peft": str(root / "peft"), "run": str(root / "run")}


@pytest.fixture(scope="module")
def rslora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rslora")
    trained(root / "run", "--config.lora.use_rslora=True")
    export.export(str(root / "run"), str(root / "hf"), format="hf")
    export.export(str(root / "run"), str(root / "peft"), format="peft")
    return {"base": MODEL_DIR, "hf": str(root / "hf"), "peft": str(root / "peft"), "run": str(root / "run")}


def test_adapter_configs_need_no_patterns(phi3_run, rslora_run):
    """One `lora_alpha / r` is the trained scale for every module: no rank/alpha patterns, no rsLoRA
    flag (readers that ignore them compute the same update as PEFT), and every tensor has rank r."""
    for run, scale in ((phi3_run, 16 / 8), (rslora_run, 16 / math.sqrt(8))):
        config = json.load(open(os.path.join(run["peft"], "adapter_config.json")))
        assert not config["rank_pattern"] and not config["alpha_pattern"] and config["use_rslora"] is False
        assert config["lora_alpha"] / config["r"] == pytest.approx(scale, rel=1e-12)
        tensors = load_file(os.path.join(run["peft"], "adapter_model.safetensors"))
        assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {config["r"]}
        assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B.weight")} == {config["r"]}


def test_llama_cpp_applies_the_phi3_adapter_as_trained(llama_cpp, phi3_run, tmp_path):
    """All-linear Phi-3: q/k/v fused onto qkv_proj, gate/up onto gate_up_proj. Before the fix llama.cpp
    applied ⅓ of the qkv update and ½ of the gate_up update."""
    diff, size = llama_cpp_max_diff(llama_cpp, phi3_run["base"], phi3_run["peft"], phi3_run["hf"], tmp_path)
    print(f"llama.cpp Phi-3 all-linear: max |update - merged delta| = {diff:.3g} (max |delta| {size:.3g})")
    assert size > 1e-2 and diff <= 1e-5


def test_llama_cpp_applies_the_rslora_adapter_as_trained(llama_cpp, rslora_run, tmp_path):
    """rsLoRA scales by alpha/√r; llama.cpp computes alpha/r. Before the fix it applied 1/√8 of it."""
    diff, size = llama_cpp_max_diff(llama_cpp, rslora_run["base"], rslora_run["peft"], rslora_run["hf"], tmp_path)
    print(f"llama.cpp rsLoRA (Llama): max |update - merged delta| = {diff:.3g} (max |delta| {size:.3g})")
    assert size > 1e-2 and diff <= 1e-5


def test_peft_reads_the_exports_as_the_merged_folder(phi3_run, rslora_run):
    """PEFT's own merge of the adapter equals the merged export (the same update, module by module)."""
    import peft

    for run in (phi3_run, rslora_run):
        base = transformers.AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(base, run["peft"]).merge_and_unload()
        expected = weights(run["hf"])
        got = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
        assert max(float(np.abs(got[k] - expected[k]).max()) for k in expected if k in got) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# vLLM: too big to install in CI (CUDA wheels), so its checks are mirrored here.
#
# vllm/lora/peft_helper.py (PEFTHelper):
#   __post_init__: r > 0 ("LoRA rank `r` must be a positive integer"); vllm_lora_scaling_factor =
#     lora_alpha / sqrt(r) with use_rslora, else lora_alpha / r.
#   _validate_features: modules_to_save other than classifier/score, use_dora ("vLLM does not yet support
#     DoRA."), lora_bias, init_lora_weights strings that change the base (pissa, olora, loftq, ...).
#   validate_legal: max(r, *rank_pattern.values()) > LoRAConfig.max_lora_rank -> "LoRA rank {max_rank} is
#     greater than max_lora_rank {max_lora_rank}."; bias != "none" -> "Adapter bias is not supported."
#   get_rank_and_scaling: newer vLLM reads rank_pattern/alpha_pattern per module; older vLLM (e.g. v0.7,
#     whose PEFTHelper has neither field) applies the one vllm_lora_scaling_factor to every module.
# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; max_lora_rank = 16.
# vllm/lora/layers/base_linear.py BaseLinearLayerWithLoRA.create_lora_weights / set_lora: A and B are
#   copied into buffers of max_lora_rank rows / columns, so a tensor of larger rank cannot load.
# vllm/lora/worker_manager.py WorkerLoRAManager._load_adapter: the expected modules are the model's
#   supported LoRA modules with packed_modules_mapping expanded; LoRAModel.from_local_checkpoint refuses
#   others ("While loading ..., expected target modules in ... but received ...").
# vllm/model_executor/models/phi3.py: Phi3ForCausalLM.packed_modules_mapping = {"qkv_proj": ["qkv_proj"],
#   "gate_up_proj": ["gate_up_proj"]}; models/llama.py: {"qkv_proj": [q_proj, k_proj, v_proj],
#   "gate_up_proj": [gate_proj, up_proj]}.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LORA_MODULES = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"},
}


def vllm_load(adapter: str, model_type: str, max_lora_rank: int = 16, reads_patterns: bool = True
              ) -> dict[str, np.ndarray]:
    """The update vLLM applies per module (HF weight key -> scaling · B·A), or vLLM's ValueError."""
    import re

    assert max_lora_rank in VLLM_MAX_LORA_RANKS
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    if r <= 0:
        raise ValueError(f"LoRA rank `r` must be a positive integer, got {r}.")
    errors = []
    if [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        errors.append("vLLM only supports modules_to_save being either None or [\"classifier\", \"score\"]")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    rank_pattern = (config.get("rank_pattern") or {}) if reads_patterns else {}
    alpha_pattern = (config.get("alpha_pattern") or {}) if reads_patterns else {}
    max_rank = max([r, *rank_pattern.values()])
    if max_rank > max_lora_rank:
        errors.append(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise ValueError(" ".join(errors))

    def pattern(table, name):
        return next((v for k, v in table.items() if re.match(rf"(.*\.)?({k})$", name)), None)

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    updates = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        if module.rsplit(".", 1)[-1] not in VLLM_LORA_MODULES[model_type]:
            raise ValueError(f"While loading {adapter}, expected target modules in "
                             f"{sorted(VLLM_LORA_MODULES[model_type])} but received {[module]}")
        b = tensors[key.replace("lora_A", "lora_B")]
        if a.shape[0] > max_lora_rank:  # set_lora: the buffers hold max_lora_rank rows of A / columns of B
            raise ValueError(f"{module}: lora_a of rank {a.shape[0]} does not fit max_lora_rank {max_lora_rank}")
        rank = pattern(rank_pattern, module) or r
        module_alpha = pattern(alpha_pattern, module)
        module_alpha = alpha if module_alpha is None else module_alpha
        scaling = module_alpha / (math.sqrt(rank) if rslora else rank)
        updates[module + ".weight"] = scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return updates


def needed_max_lora_rank(rank: int) -> int:
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= rank)


def test_vllm_loads_the_phi3_adapter_and_the_export_says_at_what_max_lora_rank(phi3_run, tmp_path, caplog):
    """An all-linear r=8 Phi-3 adapter carries q, k and v on qkv_proj: rank 24, above vLLM's default
    max_lora_rank 16. The export says which --max-lora-rank serves it; at that rank vLLM (old and new
    readings of the config alike) applies the merged export's update."""
    config = json.load(open(os.path.join(phi3_run["peft"], "adapter_config.json")))
    need = needed_max_lora_rank(config["r"])
    with caplog.at_level(logging.INFO, logger="jaxft"):
        export.export(phi3_run["run"], str(tmp_path / "again"), format="peft")
    told = [r.getMessage() for r in caplog.records if "--max-lora-rank" in r.getMessage()]
    assert told and f"--max-lora-rank {need}" in told[0] and "vLLM" in told[0], told
    with pytest.raises(ValueError, match="greater than max_lora_rank 16"):
        vllm_load(phi3_run["peft"], "phi3", max_lora_rank=16)
    expected = merged_deltas(phi3_run["base"], phi3_run["hf"])
    for reads_patterns in (True, False):
        got = vllm_load(phi3_run["peft"], "phi3", max_lora_rank=need, reads_patterns=reads_patterns)
        assert set(got) == {k for k, v in expected.items() if np.abs(v).max() > 0}
        diff = max(float(np.abs(got[k] - expected[k]).max()) for k in got)
        print(f"vLLM (reads patterns: {reads_patterns}) Phi-3: max |update - merged delta| = {diff:.3g}")
        assert diff <= 1e-5


def test_vllm_loads_an_r8_llama_adapter_at_its_defaults(rslora_run):
    expected = merged_deltas(rslora_run["base"], rslora_run["hf"])
    for reads_patterns in (True, False):
        got = vllm_load(rslora_run["peft"], "llama", max_lora_rank=16, reads_patterns=reads_patterns)
        assert max(float(np.abs(got[k] - expected[k]).max()) for k in got) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# DoRA: vLLM and llama.cpp refuse it; the export says so and points to --format hf.

def _dora_params(config: dict, rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    layers, hidden, inter = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    heads, kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.v_proj": (kv * head_dim, hidden),
              "mlp.down_proj": (hidden, inter)}
    params = {}
    for module, (out, inp) in shapes.items():
        params[f"model.layers.{module}.adapter.lora_A"] = rng.randn(layers, rank, inp).astype(np.float32)
        params[f"model.layers.{module}.adapter.lora_B"] = rng.randn(layers, out, rank).astype(np.float32)
        params[f"model.layers.{module}.adapter.lora_magnitude_vector"] = rng.rand(layers, out).astype(np.float32) + 1
    return params


def _dora_adapter(folder: Path) -> str:
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "use_rslora": False, "use_dora": True}
    folder.mkdir()
    meta = {"config": {"lora": lora}, "base": {"path": MODEL_DIR}}
    export.write_peft_adapter(_dora_params(config), meta, str(folder))
    return str(folder)


def test_dora_export_warns_that_vllm_and_llama_cpp_refuse_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        adapter = _dora_adapter(tmp_path / "dora")
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "DoRA" in warned and "vLLM" in warned and "llama.cpp" in warned and "--format hf" in warned, warned
    with pytest.raises(ValueError, match="does not yet support DoRA"):  # what the warning says, checked
        vllm_load(adapter, "llama", max_lora_rank=16)


def test_llama_cpp_refuses_dora_as_the_warning_says(llama_cpp, tmp_path):
    refused = convert_lora(llama_cpp, MODEL_DIR, _dora_adapter(tmp_path / "dora"), tmp_path / "dora.gguf")
    assert refused.returncode != 0 and "lora_magnitude_vector" in refused.stderr


def test_dora_with_a_folded_scale_is_the_same_dora_in_peft(tmp_path):
    """PEFT's DoRA normalizes W + s·BA per output row: writing the scale into alpha/r (rsLoRA as the
    equivalent plain scaling, a rank padded with zeros) leaves s·BA and so the DoRA output unchanged."""
    import peft

    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    params = _dora_params(config, rank=4, seed=1)
    for name in list(params):
        if name.endswith("lora_B"):
            params[name] *= 0.05
    outputs = []
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    for rslora in (True, False):
        lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "use_rslora": rslora, "use_dora": True}
        out = tmp_path / f"dora_{rslora}"
        out.mkdir()
        export.write_peft_adapter(params, {"config": {"lora": lora}, "base": {"path": MODEL_DIR}}, str(out))
        base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, out).eval()
        # PEFT's own reading of the same trained adapter: the original rank/alpha/rsLoRA flags.
        reference_dir = tmp_path / f"reference_{rslora}"
        reference_dir.mkdir()
        tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
        r = 4
        save_file({k: (v[:r] if k.endswith("lora_A.weight") else v[:, :r] if k.endswith("lora_B.weight") else v)
                   for k, v in tensors.items()}, str(reference_dir / "adapter_model.safetensors"))
        reference_config = json.load(open(out / "adapter_config.json"))
        reference_config.update(r=r, lora_alpha=8.0, use_rslora=rslora)
        (reference_dir / "adapter_config.json").write_text(json.dumps(reference_config))
        base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        reference = peft.PeftModel.from_pretrained(base, reference_dir).eval()
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        assert float((got - want).abs().max()) <= 1e-5
        outputs.append(got)
    assert float((outputs[0] - outputs[1]).abs().max()) > 1e-3  # rsLoRA and plain differ: the flag mattered


# ---------------------------------------------------------------------------------------------------
# transformers 4.x: Phi-3's rope_scaling and the tokenizer class.

def transformers4_phi3_config(config: dict) -> None:
    """Mirrors transformers v4.42-v4.57 src/transformers/models/phi3/configuration_phi3.py:
    Phi3Config.__init__ reads rope_theta, original_max_position_embeddings and partial_rotary_factor at
    the top level, then _rope_scaling_adjustment ("su"/"yarn" -> "longrope") and
    _rope_scaling_validation: None, or a dict of exactly 3 fields `type` (== "longrope"),
    `short_factor` and `long_factor`, lists of numbers of length rotary_ndims // 2."""
    rope_scaling = config.get("rope_scaling")
    if rope_scaling is None:
        return
    rope_scaling = dict(rope_scaling)
    if rope_scaling.get("type") in ("su", "yarn"):
        rope_scaling["type"] = "longrope"
    if not isinstance(rope_scaling, dict) or len(rope_scaling) != 3:
        raise ValueError("`rope_scaling` must be a dictionary with three fields, `type`, `short_factor` and "
                         f"`long_factor`, got {rope_scaling}")
    if rope_scaling.get("type") not in ["longrope"]:
        raise ValueError(f"`rope_scaling`'s type field must be one of ['longrope'], got {rope_scaling.get('type')}")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary_ndims = int(head_dim * config.get("partial_rotary_factor", 1.0))
    for key in ("short_factor", "long_factor"):
        factor = rope_scaling.get(key)
        if not (isinstance(factor, list) and all(isinstance(x, (int, float)) for x in factor)):
            raise ValueError(f"`rope_scaling`'s {key} field must be a list of numbers, got {factor}")
        if len(factor) != rotary_ndims // 2:
            raise ValueError(f"`rope_scaling`'s {key} field must have length {rotary_ndims // 2}, got {len(factor)}")


@pytest.mark.parametrize("case", ["phi3_longrope", "phi3_4k_partial"])
def test_phi3_merged_config_loads_in_transformers_4_and_5(tmp_path, case):
    import jaxft

    folder, original = tiny_family_model(tmp_path / "base", case)
    jaxft.save_pretrained(jaxft.from_pretrained(folder), tmp_path / "out")
    config = json.load(open(tmp_path / "out" / "config.json"))
    transformers4_phi3_config(config)
    base = json.load(open(os.path.join(folder, "config.json")))
    assert config["rope_theta"] == 10000.0  # v4 reads it at the top level only
    if case == "phi3_longrope":
        assert config["original_max_position_embeddings"] == base["original_max_position_embeddings"]
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")  # 5.x reads the same RoPE
    want = original.config.rope_parameters
    assert {k: loaded.rope_parameters.get(k) for k in want} == want
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.arange(1, 41).reshape(1, 40) % 100  # past original_max_position_embeddings (32): long factors
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max()) <= 1e-5


def transformers4_knows_tokenizer_class(name: str | None) -> bool:
    """Mirrors transformers v4.x src/transformers/models/auto/tokenization_auto.py:
    AutoTokenizer.from_pretrained takes tokenizer_config.json's `tokenizer_class` (trying NAME + "Fast"
    first) through tokenizer_class_from_name, which knows "PreTrainedTokenizerFast" and the per-model
    classes of TOKENIZER_MAPPING_NAMES (none of them a v5 backend: TokenizersBackend,
    SentencePieceBackend, ...); anything else is "Tokenizer class ... does not exist or is not currently
    imported." None means: from the model's config.json."""
    return name is None or name == "PreTrainedTokenizerFast" or (name.endswith(("Tokenizer", "TokenizerFast"))
                                                                 and hasattr(transformers, name))


def test_exported_tokenizer_loads_in_transformers_4(rslora_run, phi3_run):
    source = json.load(open(os.path.join(MODEL_DIR, "tokenizer_config.json")))
    assert source["tokenizer_class"] == "TokenizersBackend"  # the demo's, as transformers 5 wrote it
    texts = ["The river runs past the old mill", "Question: what does the baker sell?"]
    want = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)(texts)["input_ids"]
    for folder in (rslora_run["hf"], rslora_run["peft"], phi3_run["hf"]):
        written = json.load(open(os.path.join(folder, "tokenizer_config.json")))
        assert transformers4_knows_tokenizer_class(written.get("tokenizer_class")), written.get("tokenizer_class")
        assert {k: v for k, v in written.items() if k != "tokenizer_class"} == \
            {k: v for k, v in source.items() if k != "tokenizer_class"}
        assert transformers.AutoTokenizer.from_pretrained(folder)(texts)["input_ids"] == want
    assert json.load(open(os.path.join(MODEL_DIR, "tokenizer_config.json"))) == source  # the source untouched


# ---------------------------------------------------------------------------------------------------
# generation_config.json: the merged folder carries one.

def test_merged_export_carries_generation_config(rslora_run, phi3_run):
    for run in (rslora_run, phi3_run):
        path = os.path.join(run["hf"], "generation_config.json")
        assert os.path.exists(path)
        loaded = transformers.GenerationConfig.from_pretrained(run["hf"])
        base_path = os.path.join(run["base"], "generation_config.json")
        if os.path.exists(base_path):  # copied from the base as it was
            assert json.load(open(path)) == json.load(open(base_path))
        else:  # built from config.json, as GenerationConfig.from_model_config does
            want = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(run["base"]))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                assert getattr(loaded, key) == getattr(want, key)


def test_a_zero_alpha_adapter_is_a_zero_update_for_every_reader(tmp_path):
    """llama.cpp reads lora_alpha 0 as scale 1 (llama_adapter_lora_weight::get_scale): a trained alpha
    of 0 (no update) is written as zero B with lora_alpha = r, which every reader scales to zero."""
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    params = {k: v for k, v in _dora_params(config).items() if not k.endswith("magnitude_vector")}
    lora = {"rank": 4, "alpha": 0.0, "dropout": 0.0, "use_rslora": False, "use_dora": False}
    (tmp_path / "zero").mkdir()
    export.write_peft_adapter(params, {"config": {"lora": lora}, "base": {"path": MODEL_DIR}}, str(tmp_path / "zero"))
    written = json.load(open(tmp_path / "zero" / "adapter_config.json"))
    assert written["lora_alpha"] == written["r"] == 4
    assert all(not np.abs(u).max() for u in vllm_load(str(tmp_path / "zero"), "llama").values())
