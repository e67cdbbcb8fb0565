"""Mixtral, Qwen2-MoE and Qwen3-MoE match transformers: logits (fp32, <= 1e-4) on a padded batch with
odd sizes (5 experts, top-3, a shared expert, dense layers between sparse ones, GQA), both checkpoint
layouts transformers 5 writes load, and save_pretrained → transformers reload is bit-exact."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models import moe, registry
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits
from jaxft.testing_families import export_round_trip_diff, max_valid_diff

TOL = 1e-4
MOE_CASES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=5, num_experts_per_tok=3, intermediate_size=40),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=5, num_experts_per_tok=3, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_hidden_layers=3, mlp_only_layers=[1]),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=5, num_experts_per_tok=3, moe_intermediate_size=24,
                      norm_topk_prob=True, head_dim=24, num_hidden_layers=4, decoder_sparse_step=2),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            spec = dict(MOE_CASES[case])
            folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp(case), spec.pop("model_type"), **spec)
            cache[case] = (folder, torch_model, jaxft.from_pretrained(folder))
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(MOE_CASES))
@pytest.mark.parametrize("implementation", moe.IMPLEMENTATIONS)
def test_logits_match_transformers_with_padding(built, case, implementation):
    _, torch_model, model = built(case)
    moe.set_moe_implementation(model, implementation)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    got = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    moe.set_moe_implementation(model, "grouped")
    diff = max_valid_diff(got, torch_logits(torch_model, ids, mask, positions), mask)
    assert diff <= TOL, f"{case} ({implementation}): max |jaxft - transformers| = {diff:.2e}"


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_export_round_trip(built, case, tmp_path):
    _, torch_model, model = built(case)
    config_cls = registry.family_for({"model_type": model.config.model_type}).config_cls
    assert config_cls.from_hf(model.config.to_hf()) == model.config
    diff, changed = export_round_trip_diff(model, torch_model, tmp_path / "out")
    assert diff == 0.0 and not changed, f"{case}: exported logits differ by {diff:.2e}; changed weights {changed}"


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_fused_layout_loads(built, case, tmp_path):
    """transformers 5's in-memory layout (gate_up_proj [E, 2F, D], down_proj [E, D, F]) loads too."""
    _, torch_model, model = built(case)
    torch_model.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys), keys[:20]
    fused = jaxft.from_pretrained(tmp_path)
    ids, mask, _ = padded_batch(model.config.vocab_size, batch=3, length=12)
    a = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    b = np.asarray(fused(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_training_aux_loss_equals_transformers(built, case):
    """The causal-LM objective's router_aux_loss is transformers' aux_loss of the same forward
    (output_router_logits=True, the padded batch's attention_mask; dense layers add nothing), and
    router_aux_loss_coef × it is what the objective adds to the loss."""
    import torch

    from jaxft.tasks.causal_lm import NextTokenLoss

    _, torch_model, model = built(case)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=3, length=12)
    with torch.no_grad():
        out = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          position_ids=torch.as_tensor(positions, dtype=torch.long), output_router_logits=True)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "positions": jnp.asarray(positions),
             "targets": jnp.asarray(np.roll(ids, -1, 1)), "loss_mask": jnp.asarray(mask, jnp.float32)}
    plain, with_aux = NextTokenLoss(), NextTokenLoss(router_aux_loss_coef=0.25, router_z_loss_coef=0.5)
    loss0, _ = plain.loss(model, batch, plain.normalizer(batch))
    loss1, metrics = with_aux.loss(model, batch, with_aux.normalizer(batch))
    assert abs(float(metrics["router_aux_loss"]) - float(out.aux_loss)) <= 1e-6, (metrics, out.aux_loss)
    expected = float(loss0) + 0.25 * float(out.aux_loss) + 0.5 * float(metrics["router_z_loss"])
    assert abs(float(loss1) - expected) <= 1e-5
    assert float(metrics["router_z_loss"]) > 0
