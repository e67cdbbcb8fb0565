"""Prefix tuning (with and without projection), prompt tuning (random and text init) and (IA)³ equal
HF PEFT on tiny random llama, qwen2 and gemma2 models: logits with padding (fp32, <= 1e-5) and one
AdamW step on the adapter weights (real torch step, <= 1e-5); IA³ merges as PEFT's merge_and_unload.

The adapter weights are PEFT's (random, or randomized where PEFT starts at a no-op) copied into jaxft.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft import optim, step
from jaxft.peft import ia3 as ia3_lib
from jaxft.peft import prefix as prefix_lib
from jaxft.peft import prompt as prompt_lib
from jaxft.peft.lora import is_lora_param, linear_modules
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import padded_batch, tiny_hf_model, train_batch
from jaxft.testing_families import word_tokenizer

peft = pytest.importorskip("peft")

TOL = 1e-5
N = 3  # virtual tokens
ENCODER = 24  # prefix_projection's hidden size (≠ token_dim, so a swapped shape would fail)
INIT_TEXT = "w5 w9 w2 w7 w1"  # 6 tokens with BOS: cut to N
FAMILIES = {"llama": ("llama3_rope", {}), "qwen2": ("qwen2_bias", {}),
            # head_dim 24, soft-capping, sliding window on every other layer (wider than the test rows)
            "gemma2": ("gemma2", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=32,
                                      attn_logit_softcapping=2.0, final_logit_softcapping=3.0))}
METHODS = ("prefix", "prefix_projection", "prompt_random", "prompt_text", "ia3")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            case, overrides = FAMILIES[name]
            folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp(name), case, **overrides)
            word_tokenizer([f"w{i}" for i in range(100)]).save_pretrained(folder)
            cache[name] = folder, torch_model
        return cache[name]

    return get


def peft_config(method, folder):
    if method.startswith("prefix"):
        extra = dict(prefix_projection=True, encoder_hidden_size=ENCODER) if method == "prefix_projection" else {}
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **extra)
    if method == "prompt_random":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    if method == "prompt_text":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=folder)
    return peft.IA3Config(task_type="CAUSAL_LM")


def peft_model(torch_model, method, folder, seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(torch_model), peft_config(method, folder))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:  # starts at ones (a no-op): randomize
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    return model.eval()


def jaxft_model(folder, method, seed=0):
    model = jaxft.from_pretrained(folder, dtype="float32")
    if method.startswith("prefix"):
        return prefix_lib.apply_prefix_tuning(model, prefix_lib.PrefixConfig(
            N, prefix_projection=method == "prefix_projection",
            encoder_hidden_size=ENCODER if method == "prefix_projection" else None), seed=seed)
    if method.startswith("prompt"):
        from transformers import AutoTokenizer

        init = dict(init="TEXT", init_text=INIT_TEXT) if method == "prompt_text" else {}
        return prompt_lib.apply_prompt_tuning(model, prompt_lib.PromptConfig(N, **init),
                                              AutoTokenizer.from_pretrained(folder), seed=seed)
    return ia3_lib.apply_ia3(model)


def _stack(sd, path, suffix, layers):
    name = ".".join(path)
    return np.stack([sd[f"base_model.model.{name.replace('model.layers.', f'model.layers.{i}.')}.{suffix}"].numpy()
                     for i in range(layers)])


def adapter_tensors(torch_peft, model) -> dict:
    """jaxft adapter param path → PEFT's trainable tensor (IA³: one per layer, in a list)."""
    params = dict(torch_peft.named_parameters())
    if model.model.virtual is not None:
        names = {"embedding": "embedding.weight", "transform_0_weight": "transform.0.weight",
                 "transform_0_bias": "transform.0.bias", "transform_2_weight": "transform.2.weight",
                 "transform_2_bias": "transform.2.bias"}
        return {f"model.virtual.{ours}": params[f"prompt_encoder.default.{theirs}"] for ours, theirs in names.items()
                if hasattr(model.model.virtual, ours)}
    layers = model.config.num_hidden_layers
    return {".".join(path) + ".adapter.ia3_l":
            [params[f"base_model.model.{'.'.join(path).replace('model.layers.', f'model.layers.{i}.')}.ia3_l.default"]
             for i in range(layers)]
            for path, linear in linear_modules(model).items() if linear.adapter is not None}


def variable(model, path):
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return node


def torch_value(tensor):
    if isinstance(tensor, list):  # IA³ per layer [out, 1] / [1, in] → [L, n]
        return np.stack([t.detach().numpy().reshape(-1) for t in tensor])
    return tensor.detach().numpy()


def copy_weights(torch_peft, model):
    tensors = adapter_tensors(torch_peft, model)
    assert tensors
    for path, tensor in tensors.items():
        value, target = torch_value(tensor), variable(model, path)
        assert value.shape == target.shape, (path, value.shape, target.shape)
        target.set_value(jnp.asarray(value))


def peft_logits(torch_peft, method, ids, mask, positions):
    """PEFT's logits of the real tokens. Prompt tuning ignores position_ids (PEFT counts from the first
    virtual token, padding included), so each row is run alone without its padding there."""
    with torch.no_grad():
        if not method.startswith("prompt"):
            return torch_peft(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                              position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
        out = np.zeros((*ids.shape, torch_peft.config.vocab_size), np.float32)
        for row in range(ids.shape[0]):
            keep = mask[row].astype(bool)
            got = torch_peft(input_ids=torch.as_tensor(ids[row][keep][None], dtype=torch.long)).logits.numpy()
            out[row, keep] = got[0, N:]
        return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_matches_peft(family, name, method):
    folder, torch_model = family(name)
    torch_peft = peft_model(torch_model, method, folder)
    model = jaxft_model(folder, method)
    if method == "prompt_text":  # our TEXT init is PEFT's before any copying
        np.testing.assert_array_equal(np.asarray(model.model.virtual.embedding[...]),
                                      torch_peft.prompt_encoder["default"].embedding.weight.detach().numpy())
    copy_weights(torch_peft, model)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    expected = peft_logits(torch_peft, method, ids, mask, positions)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    diff = np.abs(got - expected)[valid].max()
    assert diff <= TOL, f"{name}/{method}: max |jaxft - peft| = {diff:.2e}"
    base = np.asarray(jaxft.from_pretrained(folder)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - base)[valid].max() > 1e-2, "the adapter barely changes the logits: the test would prove nothing"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_train_step_matches_peft(family, name, method):
    """jaxft's AdamW step on the adapter (packed-row batch: segment ids on) equals torch AdamW on PEFT's
    trainable params: loss and the adapter weights after the step."""
    folder, torch_model = family(name)
    lr, wd, eps = 1e-2, 0.1, 1e-4
    torch_peft = peft_model(torch_model, method, folder)
    model = jaxft_model(folder, method)
    copy_weights(torch_peft, model)
    batch = train_batch(model.config.vocab_size)
    model_def, params, frozen = step.split_model(model, is_lora_param)
    cfg = optim.OptimConfig(name="adamw", learning_rate=lr, schedule="constant", weight_decay=wd, clip_norm=None, eps=eps)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    decays = optim.decay_mask(params, model_def.axes)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss()))
    state, metrics = train_step(step.init_state(params, frozen, optimizer), {k: jnp.asarray(v) for k, v in batch.items()})

    torch_peft.train()
    out = torch_peft(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                     attention_mask=torch.as_tensor(batch["attention_mask"]),
                     position_ids=torch.as_tensor(batch["positions"], dtype=torch.long)).logits
    out = out[:, N:] if method.startswith("prompt") else out
    nll = torch.nn.functional.cross_entropy(out.flatten(0, 1), torch.as_tensor(batch["targets"], dtype=torch.long).flatten(),
                                            reduction="none")
    loss_mask = torch.as_tensor(batch["loss_mask"]).flatten()
    loss = (nll * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    tensors = adapter_tensors(torch_peft, model)
    assert set(tensors) == set(params), "only the adapter trains"
    groups = {True: [], False: []}  # jaxft's decay rule (matrices only), per adapter weight
    for path, tensor in tensors.items():
        groups[decays[path]] += tensor if isinstance(tensor, list) else [tensor]
    torch.optim.AdamW([{"params": groups[True], "weight_decay": wd}, {"params": groups[False], "weight_decay": 0.0}],
                      lr=lr, betas=(0.9, 0.999), eps=eps).step()
    assert abs(float(metrics["loss"]) - loss.item()) <= 1e-5, (float(metrics["loss"]), loss.item())
    worst = 0.0
    for path, tensor in tensors.items():
        expected = torch_value(tensor)
        after = np.asarray(state.params[path]).reshape(expected.shape)
        assert np.abs(np.asarray(params[path]).reshape(expected.shape) - expected).max() > 1e-4, f"{path} did not move"
        worst = max(worst, np.abs(after - expected).max())
    assert worst <= TOL, f"{name}/{method}: max |jaxft - peft| after one step = {worst:.2e}"


# --- export: PEFT's own files, loaded by PeftModel.from_pretrained --------------------------------
def method_meta(method, folder):
    name = {"prefix": "prefix_tuning", "prefix_projection": "prefix_tuning", "ia3": "ia3"}.get(method, "prompt_tuning")
    peft_keys = {"prefix_projection": method == "prefix_projection",
                 "encoder_hidden_size": ENCODER if method == "prefix_projection" else None,
                 "prompt_tuning_init": "TEXT" if method == "prompt_text" else "RANDOM",
                 "prompt_tuning_init_text": INIT_TEXT if method == "prompt_text" else None}
    return name, {"config": {"peft": {"method": name, **peft_keys}}, "base": {"path": folder}}


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_is_what_peft_writes_and_loads_with_our_logits(family, method, tmp_path):
    import warnings

    from safetensors import safe_open

    from jaxft.peft.peft_format import write_adapter

    folder, torch_model = family("llama")
    torch_peft = peft_model(torch_model, method, folder)
    model = jaxft_model(folder, method)
    copy_weights(torch_peft, model)
    name, meta = method_meta(method, folder)
    _, params, _ = step.split_model(model, is_lora_param)
    (tmp_path / "ours").mkdir()
    write_adapter(name, model, params, meta, str(tmp_path / "ours"))
    torch_peft.save_pretrained(tmp_path / "theirs")

    def tensors(path):
        with safe_open(str(path / "adapter_model.safetensors"), "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, err_msg=key)
    import json

    our_config, their_config = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("ours", "theirs"))
    skip = {"peft_version", "base_model_name_or_path", "tokenizer_name_or_path", "target_modules"}
    assert {k: v for k, v in our_config.items() if k not in skip} == \
        {k: v for k, v in their_config.items() if k not in skip}
    assert sorted(our_config.get("target_modules") or []) == sorted(their_config.get("target_modules") or [])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ours")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    diff = np.abs(got - peft_logits(loaded, method, ids, mask, positions))[mask.astype(bool)].max()
    assert diff <= TOL, f"{method}: max |jaxft - loaded PEFT export| = {diff:.2e}"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_ia3_merged_hf_export_equals_the_adapter(family, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from jaxft.testing import torch_logits

    folder, torch_model = family(name)
    torch_peft = peft_model(torch_model, "ia3", folder)
    model = jaxft_model(folder, "ia3")
    copy_weights(torch_peft, model)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    with_adapter = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ia3_lib.merge_ia3(model)
    jaxft.save_pretrained(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    diff = np.abs(torch_logits(merged, ids, mask, positions) - with_adapter)[mask.astype(bool)].max()
    assert diff <= TOL, f"{name}: merged export vs adapter logits {diff:.2e}"
    theirs = torch_peft.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs[key].numpy(), atol=1e-6, err_msg=key)


# --- generation: the virtual tokens as the KV cache's first slots ----------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt_random"])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_cached_generation_equals_recomputation(family, name, method):
    from jaxft.generate import generate

    folder, torch_model = family(name)
    model = jaxft_model(folder, method)
    copy_weights(peft_model(torch_model, method, folder), model)
    prompts = [[5, 17, 3], [9, 2, 44, 61, 8, 30, 7], [12]]
    cached = generate(model, prompts, 10, use_cache=True)
    assert cached == generate(model, prompts, 10, use_cache=False)
    base = generate(jaxft.from_pretrained(folder), prompts, 10)
    assert cached != base, "the adapter must change what is generated"
