"""config.json values are checked before anything is built: a wrong type, a size out of range, a RoPE
scaling without the keys its type needs, heads that do not divide, each refused with one line
`<path to config.json>: <field>: <what is wrong>`; a tokenizer larger than the model's vocabulary
stops a run before anything compiles.

Each bad config is a tiny transformers model (save_pretrained) whose config.json is then edited, and
goes through the public path, jaxft.from_pretrained(folder).
"""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import presets
from jaxft.models import registry
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits
from jaxft.testing_families import tiny_family_model

SOURCES = {
    "llama": lambda d: tiny_hf_model(d, "llama3_rope"),  # rope_parameters (v5) of type llama3
    "mistral": lambda d: tiny_hf_model(d, "mistral_sliding"),
    "qwen2": lambda d: tiny_hf_model(d, "qwen2_yarn_sliding"),
    "gemma2": lambda d: tiny_family_model(d, "gemma2_softcap"),
    "gemma3": lambda d: tiny_family_model(d, "gemma3_text"),  # per-layer-type rope_parameters
    "phi3": lambda d: tiny_family_model(d, "phi3_longrope"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = SOURCES[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _rope(**changes):
    """An edit of rope_parameters: keys set (None = removed)."""
    def edit(config):
        rope = config["rope_parameters"]
        for key, value in changes.items():
            if value is None:
                rope.pop(key, None)
            else:
                rope[key] = value
    return edit


def _full_rope(**changes):
    """gemma3: an edit of rope_parameters.full_attention."""
    def edit(config):
        config["rope_parameters"]["full_attention"] = {"rope_type": "linear", "rope_theta": 1000000.0, **changes}
    return edit


def _v4_rope(rope_scaling):
    def edit(config):
        config.pop("rope_parameters", None)
        config["rope_scaling"] = rope_scaling
    return edit


def _remove(*keys):
    return lambda config: [config.pop(k) for k in keys]


# (source, edit of config.json: a dict of top-level values or a function, field named, the rest of the line)
BAD = {
    # -- sizes: positive ints (not strings, floats, null, lists or bools) --------------------------
    "hidden_size_str": ("llama", {"hidden_size": "64"}, "hidden_size", 'must be a positive integer, got "64" (a string)'),
    "layers_float": ("llama", {"num_hidden_layers": 2.5}, "num_hidden_layers", "must be a positive integer, got 2.5"),
    "heads_null": ("llama", {"num_attention_heads": None}, "num_attention_heads", "must be a positive integer, got null"),
    "intermediate_list": ("llama", {"intermediate_size": [96]}, "intermediate_size",
                          "must be a positive integer, got [96] (an array)"),
    "vocab_bool": ("llama", {"vocab_size": True}, "vocab_size", "must be a positive integer, got true (a boolean)"),
    "max_pos_zero": ("llama", {"max_position_embeddings": 0}, "max_position_embeddings",
                     "must be a positive integer, got 0"),
    "head_dim_str": ("llama", {"head_dim": "16"}, "head_dim", 'must be a positive integer or null, got "16" (a string)'),
    "kv_heads_zero": ("phi3", {"num_key_value_heads": 0}, "num_key_value_heads",
                      "must be a positive integer or null, got 0"),
    "gemma_head_dim_zero": ("gemma2", {"head_dim": 0}, "head_dim", "must be a positive integer or null, got 0"),
    "phi3_original_str": ("phi3", {"original_max_position_embeddings": "32"}, "original_max_position_embeddings",
                          'must be a positive integer, got "32" (a string)'),
    # -- heads ----------------------------------------------------------------------------------------
    "kv_heads_not_dividing": ("llama", {"num_key_value_heads": 3}, "num_key_value_heads",
                              "3 does not divide num_attention_heads=4 (each key/value head serves a group of query heads)"),
    "llama_hidden_not_multiple": ("llama", lambda c: (c.pop("head_dim"), c.update(num_attention_heads=6)), "hidden_size",
                                  "64 is not a multiple of num_attention_heads=6 (transformers' llama config requires it)"),
    "gemma2_hidden_not_multiple": ("gemma2", {"num_attention_heads": 6}, "hidden_size",
                                   "64 is not a multiple of num_attention_heads=6 (transformers' gemma2 config requires it)"),
    "phi3_hidden_not_multiple": ("phi3", {"num_attention_heads": 6}, "hidden_size",
                                 "64 is not a multiple of num_attention_heads=6 (Phi-3's head_dim is their ratio)"),
    # -- floats where floats ----------------------------------------------------------------------------
    "eps_str": ("llama", {"rms_norm_eps": "1e-05"}, "rms_norm_eps", 'must be a number > 0, got "1e-05" (a string)'),
    "eps_negative": ("llama", {"rms_norm_eps": -1e-05}, "rms_norm_eps", "must be a number > 0, got -1e-05"),
    "query_scalar_zero": ("gemma2", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar", "must be a number > 0, got 0"),
    "softcap_str": ("gemma2", {"final_logit_softcapping": "3.0"}, "final_logit_softcapping",
                    'must be a number > 0 or null, got "3.0" (a string)'),
    "partial_rotary_big": ("llama", {"partial_rotary_factor": 1.5}, "partial_rotary_factor",
                           "must be a number in (0, 1], got 1.5"),
    # -- other types ------------------------------------------------------------------------------------
    "tie_str": ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings",
                'must be true or false, got "false" (a string)'),
    "mistral_window_str": ("mistral", {"sliding_window": "4"}, "sliding_window",
                           'must be a positive integer or null, got "4" (a string)'),
    "gemma2_window_negative": ("gemma2", {"sliding_window": -5}, "sliding_window",
                               "must be a positive integer or null, got -5"),
    "gemma2_layer_types_str": ("gemma2", {"layer_types": "sliding_attention"}, "layer_types",
                               'must be a list of strings, got "sliding_attention" (a string)'),
    "qwen2_window_layers_str": ("qwen2", {"max_window_layers": "1"}, "max_window_layers",
                                'must be an integer >= 0 or null, got "1" (a string)'),
    "phi3_act_null": ("phi3", {"hidden_act": None}, "hidden_act", "must be a string, got null"),
    # -- RoPE scaling, per type, as transformers' validation requires -------------------------------------
    "linear_without_factor": ("llama", _rope(rope_type="linear", factor=None, low_freq_factor=None, high_freq_factor=None,
                                             original_max_position_embeddings=None),
                              "rope_parameters.factor", "missing: linear RoPE needs it (a number >= 1)"),
    "linear_factor_below_1": ("llama", _rope(rope_type="linear", factor=0.5, low_freq_factor=None, high_freq_factor=None,
                                             original_max_position_embeddings=None),
                              "rope_parameters.factor", "must be a number >= 1, got 0.5"),
    "v4_linear_factor_str": ("llama", _v4_rope({"type": "linear", "factor": "2"}), "rope_scaling.factor",
                             'must be a number >= 1, got "2" (a string)'),
    "rope_theta_zero": ("llama", _rope(rope_theta=0), "rope_parameters.rope_theta", "must be a number > 0, got 0"),
    "llama3_without_high_freq": ("llama", _rope(high_freq_factor=None), "rope_parameters.high_freq_factor",
                                 "missing: llama3 RoPE needs it (a number > low_freq_factor)"),
    "llama3_high_equals_low": ("llama", _rope(high_freq_factor=1.0), "rope_parameters.high_freq_factor",
                               "must be greater than low_freq_factor=1.0, got 1.0"),
    "v4_rope_scaling_list": ("llama", _v4_rope([2.0]), "rope_scaling", "must be an object or null, got [2.0] (an array)"),
    "rope_parameters_str": ("llama", {"rope_parameters": "linear"}, "rope_parameters",
                            'must be an object or null, got "linear" (a string)'),
    "yarn_without_factor": ("qwen2", _rope(factor=None), "rope_parameters.factor",
                            "missing: yarn RoPE needs it (a number >= 1)"),
    "yarn_beta_fast_str": ("qwen2", _rope(beta_fast="32"), "rope_parameters.beta_fast",
                           'must be a number or null, got "32" (a string)'),
    "gemma3_linear_without_factor": ("gemma3", _full_rope(), "rope_parameters.full_attention.factor",
                                     "missing: linear RoPE needs it (a number >= 1)"),
    "longrope_without_long_factor": ("phi3", _rope(long_factor=None), "rope_parameters.long_factor",
                                     "missing: longrope RoPE needs it (a list of numbers)"),
    "longrope_factor_str_entry": ("phi3", _rope(short_factor=[1.0, "1.1", 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]),
                                  "rope_parameters.short_factor",
                                  'must be a list of numbers, got [1.0, "1.1", 1.2, 1.3, 1.4, 1.5, 1.6, 1.7] (an array)'),
}


def _edited(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config) if callable(edit) else config.update(edit)
    with open(path, "w") as f:
        json.dump(config, f)
    return os.fspath(dst)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_naming_file_and_field(source, tmp_path, case):
    name, edit, field, rest = BAD[case]
    folder = _edited(source(name)[0], tmp_path / "m", edit)
    with pytest.raises(ValueError) as err:
        jaxft.from_pretrained(folder)
    expected = f"{os.path.join(folder, 'config.json')}: {field}: {rest}"
    assert str(err.value) == expected, f"{case}:\n got      {err.value}\n expected {expected}"


def test_yarn_without_original_context_takes_max_position_embeddings_as_transformers_does(source, tmp_path):
    """transformers fills in original_max_position_embeddings = max_position_embeddings for llama3,
    yarn and longrope; the logits match its model loaded from the same folder."""
    import torch
    import transformers

    folder = _edited(source("qwen2")[0], tmp_path / "m", _rope(original_max_position_embeddings=None))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = jaxft.from_pretrained(folder)
    assert model.config.rope.param("original_max_position_embeddings") == 256
    ids, mask, positions = padded_batch(model.config.vocab_size)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - torch_logits(torch_model, ids, mask, positions))[mask.astype(bool)].max() <= 1e-4


def test_valid_spellings_still_load(source, tmp_path):
    """What real config.json files hold: ints where floats go, null optional fields and token ids,
    eos lists, v4 rope_scaling with `type`, qwen2's unused sliding_window."""
    folder = _edited(source("llama")[0], tmp_path / "m", lambda c: (
        c.pop("rope_parameters"), c.update(rope_theta=500000, rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1,
                                                                             "high_freq_factor": 4,
                                                                             "original_max_position_embeddings": 32},
                                           head_dim=None, pad_token_id=None, eos_token_id=[2, 3], pretraining_tp=None)))
    model = jaxft.from_pretrained(folder)
    assert model.config.head_dim == 16 and model.config.rope.theta == 500000.0
    for name, hf_config in presets.HF_CONFIGS.items():
        config = registry.family_for(hf_config).config_cls.from_hf(hf_config, name)
        assert type(config).from_hf(config.to_hf()) == config, name


def test_qwen3_head_dim_defaults_to_transformers_128():
    from jaxft.models.llama import LlamaConfig

    base = dict(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    assert LlamaConfig.from_hf({"model_type": "qwen3", **base}).head_dim == 128
    assert LlamaConfig.from_hf({"model_type": "qwen2", **base}).head_dim == 16


# ---- the tokenizer against the model's vocabulary ---------------------------------------------------
def test_tokenizer_larger_than_vocab_fails_before_compiling(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from jaxft import step
    from jaxft import train as train_lib
    from jaxft.demo import MODEL_DIR
    from jaxft.demo.config import get_config

    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>"])
    tokenizer.save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == 1027

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the vocabulary check")

    monkeypatch.setattr(step, "compile_train_step", no_compile)
    config = get_config("smoke")
    config.model.path = os.fspath(folder)
    config.workdir = os.fspath(tmp_path / "work")
    config.eval.task_file = ""
    with pytest.raises(ValueError) as err:
        train_lib.train(config)
    message = str(err.value)
    assert re.search(r"tokenizer has 1027 tokens but the model's vocab_size is 1024", message), message
    assert "list the new tokens in model.add_tokens" in message
    assert "\n" not in message
    # Listing them grows the embedding to the tokenizer: the run gets as far as compiling.
    config.model.add_tokens = ("<extra_a>", "<extra_b>", "<extra_c>")
    with pytest.raises(AssertionError, match="compiled before the vocabulary check"):
        train_lib.train(config)
