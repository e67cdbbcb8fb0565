"""LoRA on mixture-of-experts projections, per expert: training moves the experts (the merged export
differs from the base in expert tensors and transformers reproduces jaxft's logits from it), and the
PEFT adapter loads in PeftModel on transformers 5's fused experts with no missing or unexpected keys
and gives jaxft's logits (<= 1e-4)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from jaxft import export, optim, step
from jaxft.models import moe
from jaxft.peft import lora
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits, train_batch
from jaxft.testing_families import max_valid_diff

CASES = {
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=3, intermediate_size=40),
    "qwen3_moe": dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=True),
}
TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def _trained(folder, steps=3):
    model = jaxft.from_pretrained(folder)
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS))
    model_def, params, frozen = step.split_model(model, lora.is_lora_param)
    cfg = optim.OptimConfig(name="adamw", learning_rate=2e-2, schedule="constant", total_steps=steps)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss(router_aux_loss_coef=0.01)))
    for s in range(steps):
        state, _ = train_step(state, {k: jnp.asarray(v) for k, v in train_batch(128, batch=4, seed=s).items()})
    return model_def.merge(state.params, state.frozen), state.params


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_on_experts_trains_exports_and_loads_in_peft(case, tmp_path):
    import peft
    import transformers

    folder, torch_model = tiny_hf_model(tmp_path / "base", case, **CASES[case])
    model, adapter_params = _trained(folder)
    expert_b = [p for p in adapter_params if ".experts." in p and p.endswith("lora_B")]
    assert len(expert_b) == 3 and all(float(jnp.abs(adapter_params[p]).max()) > 0 for p in expert_b), expert_b
    ids, mask, positions = padded_batch(128, batch=3, length=12)
    for implementation in ("dense", "grouped"):  # the adapters act on both expert paths alike
        moe.set_moe_implementation(model, implementation)
        logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        if implementation == "dense":
            dense_logits = logits
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5)

    # PEFT adapter: per-expert modules, which PEFT converts onto transformers 5's fused experts.
    out = tmp_path / "adapter"
    out.mkdir()
    meta = {"config": {"lora": {"rank": 2, "alpha": 4.0, "use_rslora": False, "dropout": 0.0, "use_dora": False}},
            "base": {"path": folder}}
    export.write_peft_adapter(adapter_params, meta, str(out), modules_of=export.peft_modules(model))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower() and "pattern" not in str(w.message)]
    assert not key_warnings, key_warnings
    diff = max_valid_diff(logits, torch_logits(peft_model, ids, mask, positions), mask)
    assert diff <= 1e-4, f"{case}: PEFT adapter logits differ from jaxft's by {diff:.2e}"

    # Merged HF folder: expert tensors differ from the base, and transformers computes jaxft's logits.
    lora.merge_lora(model)
    jaxft.save_pretrained(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    before, after = torch_model.state_dict(), merged.state_dict()
    changed = [k for k in after if ".experts." in k and not torch.equal(after[k], before[k])]
    assert changed, "no expert tensor changed in the merged export"
    diff = max_valid_diff(logits, torch_logits(merged, ids, mask, positions), mask)
    assert diff <= 1e-4, f"{case}: merged export logits differ from jaxft's by {diff:.2e}"


def test_peft_export_refuses_what_peft_would_drop():
    """Adapters PEFT would drop on load (a qwen2_moe expert, a dense MLP projection beside experts, the
    router) are refused with the module named, instead of an adapter that serves the base."""
    from jaxft.models.mixtral import convert
    from jaxft.models.mixtral.config import MoEConfig

    qwen2 = MoEConfig.from_hf({"model_type": "qwen2_moe", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 4,
                               "shared_expert_intermediate_size": 4})
    qwen3 = MoEConfig.from_hf({"model_type": "qwen3_moe", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 4, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="qwen2_moe.*--format hf"):
        convert.peft_modules(qwen2, "model.layers.mlp.experts.gate_proj", (2, 4, 2, 8))
    with pytest.raises(ValueError, match=r"model.layers.dense.mlp.up_proj: a dense MLP"):
        convert.peft_modules(qwen3, "model.layers.dense.mlp.up_proj", (1, 2, 8))
    with pytest.raises(ValueError, match="router"):
        convert.peft_modules(qwen3, "model.layers.sparse.mlp.gate", (1, 2, 8))
    # Mixed layers: the sparse stack's entry j is HF layer 0, the dense one's HF layer 1.
    assert convert.peft_modules(qwen3, "model.layers.sparse.mlp.experts.down_proj", (1, 4, 8, 2))[-1] == \
        ("model.layers.0.mlp.experts.3.down_proj", (0, 3))
    assert convert.peft_modules(qwen3, "model.layers.dense.self_attn.q_proj", (1, 2, 8)) == \
        [("model.layers.1.self_attn.q_proj", (0,))]
