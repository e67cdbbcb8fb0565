"""Every config in configs/ parses, validates, and builds its model and train state with
jax.eval_shape (shapes of the real checkpoints from jaxft.presets; nothing downloaded)."""

import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft import presets, sharding
from jaxft import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _args(path: str) -> tuple[str, ...]:
    """The ARG values a config file lists (config_lib.load refuses others), and its default."""
    spec = importlib.util.spec_from_file_location(f"listed_args_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ("", *module.ARGS)


CASES = [(path, arg) for path in CONFIGS for arg in _args(path)]
# Parameter counts of the real models (config.json shapes), to catch a wrong preset.
EXPECTED_PARAMS = {"meta-llama/Llama-3.1-8B": 8.03e9, "meta-llama/Llama-3.2-1B": 1.24e9, "Qwen/Qwen2.5-7B": 7.62e9,
                   "mistralai/Mistral-7B-v0.3": 7.25e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9, "Qwen/Qwen3-30B-A3B": 30.53e9}


def test_every_config_file_is_covered():
    assert {os.path.basename(p) for p in CONFIGS} >= {"demo.py", "classify_demo.py", "llama3_8b_lora.py", "llama32_1b_full.py",
                                                      "qwen25_7b_lora.py", "mistral_7b_lora.py", "chat_sft.py",
                                                      "llama3_8b_lora_32k.py"}


@pytest.mark.parametrize("path,arg", CASES, ids=[f"{os.path.basename(p)}:{a}" for p, a in CASES])
def test_config_parses_and_its_state_passes_eval_shape(path, arg):
    config = config_lib.load(f"{path}:{arg}" if arg else path)
    if config.task == "distill" and not os.path.isdir(config.model.path):
        # Its student and teacher are made by `jaxft demo --variant distill`: check the shapes on the
        # bundled model, which both are cut from or tuned from.
        from jaxft.demo import MODEL_DIR

        config = config_lib.with_values(config, {"model.path": MODEL_DIR, "distill.teacher": MODEL_DIR})
    config_lib.validate(config)
    if config.model.path in presets.HF_CONFIGS:
        hf_config = presets.HF_CONFIGS[config.model.path]
    else:
        with open(os.path.join(config.model.path, "config.json")) as f:
            hf_config = json.load(f)
    state = run_lib.abstract_training(config, hf_config).state
    attached = {p: x for p, x in state.frozen.items() if p.startswith(("teacher.", "reference."))}  # not the base
    state = state.replace(frozen={p: x for p, x in state.frozen.items() if p not in attached})
    assert bool(attached) == (config.task == "distill" or (config.task == "dpo" and not config.lora.rank))
    every = {**state.params, **state.frozen}
    adapter = lambda p: ".adapter." in p or p.startswith("model.virtual.")  # noqa: E731 (LoRA/IA3, prefix/prompt)
    total = sum(int(np.prod(x.shape)) for p, x in every.items() if not adapter(p))  # the base model
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if config.model.path in EXPECTED_PARAMS:
        assert abs(total - EXPECTED_PARAMS[config.model.path]) < 0.01 * total, total
    if config.lora.rank or config.peft.method != "lora":
        # A classifier's new head (`score`) trains whole beside the adapters (PEFT's modules_to_save).
        head = ("score.",) if config.task in ("classification", "reward") else ()
        assert 0 < trainable < (0.02 if total > 1e8 else 0.5) * total
        assert all(adapter(p) or p.startswith(head) for p in state.params) if head else \
            all(adapter(p) for p in state.params)
        assert not head or "score.weight" in state.params
    else:
        assert trainable == total and not state.frozen
    # The optimizer state exists only for trainable params, in their dtype.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(int(np.prod(x.shape)) for x in moments) <= 2 * trainable + 10
    # Its mesh and batch fit the hardware it names (8 chips, or 1 device).
    shape = dict(config.mesh.shape)
    devices = jax.devices()[:1] if all(v == 1 for v in shape.values()) else jax.devices()
    mesh = sharding.make_mesh(shape, devices=devices)
    sharding.check_batch(config.train.batch_size, config.train.grad_accum, mesh)


def test_a_url_workdir_is_refused_before_anything_is_written():
    config = config_lib.load(os.path.join(ROOT, "configs", "demo.py"), ["--config.workdir=gs://bucket/runs/a"])
    with pytest.raises(ValueError, match="is a URL.*gcsfuse"):
        config_lib.validate(config)


DEMO = os.path.join(ROOT, "configs", "demo.py")
CLASSIFY = os.path.join(ROOT, "configs", "classify_demo.py")


@pytest.mark.parametrize("config_file,override,message", [
    # Checked once, by the layer that uses the setting, and named here by its config key.
    (DEMO, ["--config.train.warmup_steps=70"], r"^train\.warmup_steps=70 exceeds train\.steps=60$"),
    (DEMO, ["--config.train.schedule=step"], r"^train\.schedule 'step' is not one of"),
    (DEMO, ["--config.train.optimizer=adam"], r"^train\.optimizer 'adam' is not one of"),
    (DEMO, ["--config.train.remat=some"], r"^train\.remat 'some' is not one of"),
    (DEMO, ["--config.train.grad_accum=0"], r"^train\.grad_accum must be >= 1, got 0$"),
    (DEMO, ["--config.lora.dropout=1.5"], r"^lora\.dropout must be in \[0, 1\), got 1\.5$"),
    (DEMO, ["--config.train.log_every=0"], r"^train\.log_every must be > 0, got 0$"),
    # The task's own rules (jaxft.tasks.*.validate).
    (DEMO, ["--config.train.loss_chunk=24"], r"^train\.loss_chunk=24 does not divide data\.seq_len=64$"),
    (CLASSIFY, ["--config.train.z_loss=0.001"], r"^train\.z_loss=0\.001 is a term of the language-model loss"),
    (CLASSIFY, ["--config.train.loss_chunk=16"], r"^train\.loss_chunk=16 is a term of the language-model loss"),
    (DEMO, ["--config.task=ppo"], r"^task 'ppo' must be causal_lm, classification, dpo, reward, distill or grpo$"),
])
def test_validate_names_the_config_key(config_file, override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.load(config_file, override))


def test_the_layers_below_name_their_own_terms():
    from jaxft import optim, step

    with pytest.raises(ValueError, match=r"^warmup_steps=5 exceeds total_steps=2$"):
        optim.OptimConfig(warmup_steps=5, total_steps=2)
    with pytest.raises(ValueError, match=r"^remat 'some' is not one of"):
        step.StepConfig(remat="some")


def test_one_dotted_key_walker_for_configs_and_saved_dicts():
    config = config_lib.load(DEMO)
    plain = config_lib.to_plain(config)
    for key in ("train.steps", "data.seq_len", "model.path", "checkpoint.resume_from"):
        assert config_lib.get(config, key) == config_lib.get(plain, key)
    assert config_lib.get(config, "mesh.shape").to_dict() == config_lib.get(plain, "mesh.shape") == {"data": -1}
    assert config_lib.get(plain, "train.nope", None) is None and config_lib.get(plain, "nope.steps", 7) == 7
    with pytest.raises(KeyError, match="config has no key 'train.nope'"):
        config_lib.get(config, "train.nope")
    changed = config_lib.with_values(config, {"train.steps": 3, "train.remat": "full"})
    assert (changed.train.steps, changed.train.remat, config.train.steps) == (3, "full", 60)
