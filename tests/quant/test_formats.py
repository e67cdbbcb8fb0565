"""int8 / NF4 storage of a frozen base (jaxft.peft.quant): the code table, round-trip error bounds,
load-time quantization equal to quantizing a loaded model, meshes, and the config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import config as config_lib
from jaxft import sharding
from jaxft.demo import MODEL_DIR
from jaxft.peft import quant
from jaxft.pretrained import flat_params

# bitsandbytes' `NF4` table (functional.py, get_4bit_type) = QLoRA paper, Appendix E.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "demo.py")
FP32_SLACK = 1e-6  # relative: the scale products and divisions round once or twice in float32


def weights(shape=(3, 256, 512), seed=0):
    w = np.random.default_rng(seed).normal(0.0, 0.02, size=shape).astype(np.float32)
    w[0, 5] = 0.0  # an all-zero row (absmax 0) must round-trip exactly, not divide by zero
    return jnp.asarray(w)


def test_nf4_table_is_bitsandbytes():
    np.testing.assert_array_equal(quant.NF4_LEVELS, np.array(BNB_NF4, np.float32))


def test_int8_round_trip_within_half_a_step_per_row():
    w = weights()
    parts = quant.quantize(w, "int8")
    assert parts["codes"].dtype == jnp.int8 and parts["codes"].shape == w.shape
    back = quant.dequantize(parts, "int8", jnp.float32)
    absmax = np.abs(np.asarray(w)).max(-1, keepdims=True)  # [.., out, 1]
    err = np.abs(np.asarray(back) - np.asarray(w))
    assert np.all(err <= absmax / 127 / 2 * (1 + FP32_SLACK) + 1e-12)
    assert np.all(back[0, 5] == 0)
    print(f"int8 max |err| / (absmax/254): {float((err / (absmax / 254 + 1e-30)).max()):.3f}")


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_within_half_the_largest_gap_per_block(double_quant):
    w = weights()
    parts = quant.quantize(w, "nf4", double_quant=double_quant)
    assert parts["codes"].dtype == jnp.uint8 and parts["codes"].shape == (3, 256, 256)  # two codes a byte
    back = np.asarray(quant.dequantize(parts, "nf4", jnp.float32))
    blocks = np.asarray(w).reshape(3, 256, 8, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)  # [.., out, in/64, 1]
    half_gap = np.diff(BNB_NF4).max() / 2
    bound = absmax * half_gap
    if double_quant:
        # The stored absmax a' differs from a by at most half an int8 step of its group's scale, and
        # a level is at most 1 in size: |NF4[q]·a' - w| ≤ |NF4[q]·a - w| + |a' - a|.
        centered = absmax[..., 0] - absmax.mean(axis=(1, 2, 3))[:, None, None]  # [L, out, n]
        group_scale = np.abs(centered).max(axis=1, keepdims=True)  # out=256: one group
        bound = bound + (group_scale / 254)[..., None]
        assert parts["absmax_codes"].dtype == jnp.int8 and parts["absmax_scale"].shape == (3, 1, 8)
    err = np.abs(back.reshape(blocks.shape) - blocks)
    assert np.all(err <= bound * (1 + FP32_SLACK) + 1e-12)
    assert np.all(back[0, 5] == 0)
    print(f"nf4 (double_quant={double_quant}) max |err| / bound: {float((err / (bound + 1e-30)).max()):.3f}, "
          f"mean |err| / absmax: {float((err / (absmax + 1e-30)).mean()):.4f}")


def test_nf4_codes_are_the_nearest_level():
    # Values placed exactly on each level come back exactly; each block's absmax is 1 (the last value).
    row = np.tile(np.array(BNB_NF4, np.float32), 4)  # 64 values, one block
    parts = quant.quantize(jnp.asarray(row[None]), "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(parts, "nf4", jnp.float32))[0], row)


def test_nf4_refuses_an_input_size_that_64_does_not_divide():
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.quantize(jnp.ones((8, 96)), "nf4")


def demo_ids():
    return (jnp.arange(3, 35)[None] * 7) % 1000


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_load_time_quantization_equals_quantizing_the_loaded_model(mode):
    loaded = jaxft.from_pretrained(MODEL_DIR, quantize=mode)
    dense = jaxft.from_pretrained(MODEL_DIR)
    reference = np.asarray(dense(demo_ids()))
    quant.quantize_model(dense, mode)
    _, a = flat_params(loaded)
    _, b = flat_params(dense)
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path].get_value()), np.asarray(b[path].get_value()), err_msg=path)
    # Every decoder Linear is quantized (Phi-3's fused tensors load as these same q/k/v, gate/up
    # params); embeddings, norms and the (tied) head are not.
    quantized = {p.rsplit(".weight.", 1)[0] for p in a if ".weight." in p}
    assert quantized == {f"model.layers.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")}
    assert a["model.embed_tokens.weight"].dtype == jnp.float32
    # The quantized model is still the model: logits move by the quantization error only.
    logits = np.asarray(loaded(demo_ids()))
    corr = np.corrcoef(logits.ravel(), reference.ravel())[0, 1]
    print(f"{mode}: logits correlation with the dense model {corr:.4f}")
    assert corr > (0.99 if mode == "int8" else 0.95)  # 4 bits on a 4-layer, hidden-128 model: 0.97
    stored, dense_bytes = quant.quantized_bytes(loaded)
    bf16_bytes = dense_bytes // 2  # the demo base is float32
    print(f"{mode}: decoder Linear weights {stored} bytes vs {bf16_bytes} in bf16 ({stored / bf16_bytes:.3f}×)")
    assert stored < bf16_bytes * (0.52 if mode == "int8" else 0.27)


def test_quantized_model_on_a_mesh_matches_one_device():
    ids = demo_ids()
    single = np.asarray(jaxft.from_pretrained(MODEL_DIR, quantize="nf4")(ids))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = jaxft.from_pretrained(MODEL_DIR, quantize="nf4", mesh=mesh)
    _, params = flat_params(model)
    codes = params["model.layers.mlp.up_proj.weight.codes"]  # [L, mlp, embed/2]: split like the weight
    def spec(variable):  # trailing unsharded dims spelled out
        value = variable.get_value()
        return tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec))

    assert spec(codes) == (None, "tensor", "fsdp")
    scales = params["model.layers.mlp.up_proj.weight.absmax_codes"]  # [L, mlp, embed/64 = 2]: fsdp=4 does not divide 2
    assert spec(scales) == (None, "tensor", None)
    with sharding.activate(mesh):
        sharded = np.asarray(model(ids))
    np.testing.assert_allclose(sharded, single, atol=1e-4)


def test_config_refuses_quantization_without_lora():
    config = config_lib.load(DEMO, ["--config.model.quantize=nf4", "--config.lora.rank=0"])
    with pytest.raises(ValueError, match="model.quantize=nf4 needs LoRA"):
        config_lib.validate(config)
    config = config_lib.load(DEMO, ["--config.model.quantize=fp4"])
    with pytest.raises(ValueError, match=r"model.quantize 'fp4' is not one of \('int8', 'nf4'\)"):
        config_lib.validate(config)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merging_adapters_into_a_quantized_base_keeps_the_logits(tmp_path, use_dora):
    from flax import nnx

    from jaxft.peft.lora import LoraConfig, LoRAParam, apply_lora, merge_lora

    model = jaxft.from_pretrained(MODEL_DIR, quantize="nf4")
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=use_dora))
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):  # B = 0 would hide a bad merge
        variable.set_value(variable[...] + 0.05 * jax.random.normal(jax.random.key(i), variable.shape))
    expected = np.asarray(model(demo_ids()))
    merge_lora(model)
    _, params = flat_params(model)
    assert params["model.layers.self_attn.q_proj.weight"].dtype == jnp.float32  # merged: dense again
    assert "model.layers.self_attn.k_proj.weight.codes" in params  # no adapter: still quantized
    np.testing.assert_allclose(np.asarray(model(demo_ids())), expected, atol=1e-4)
    with pytest.raises(ValueError, match="quantized base weights.*dequantize_model"):
        jaxft.save_pretrained(model, tmp_path / "out")
    quant.dequantize_model(model)
    np.testing.assert_allclose(np.asarray(model(demo_ids())), expected, atol=1e-4)
    jaxft.save_pretrained(model, tmp_path / "out")


def test_loading_never_builds_a_dense_stack_of_a_quantized_weight(monkeypatch):
    # Stacked params are assembled into arrays that `_zeros` creates; for quantized weights those must
    # be the codes and scales, so the device holds at most one dense layer of one weight at a time.
    from jaxft import pretrained

    made = []
    zeros = pretrained._zeros
    monkeypatch.setattr(pretrained, "_zeros", lambda shape, dtype, target: made.append((shape, dtype)) or
                        zeros(shape, dtype, target))
    jaxft.from_pretrained(MODEL_DIR, quantize="nf4")
    float_stacks = sorted(shape for shape, dtype in made if np.dtype(dtype) == np.float32)
    assert float_stacks and all(np.prod(shape) <= 4 * 128 for shape in float_stacks), float_stacks  # norms, scales


def test_training_keeps_no_decoded_weights_between_forward_and_backward():
    # Autodiff through the scanned layers would keep every layer's decoded W as a residual (the
    # memory of an unquantized base); Linear re-decodes it in the backward pass instead.
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from jaxft import step
    from jaxft.peft.lora import LoraConfig, apply_lora, is_lora_param
    from jaxft.tasks.causal_lm import NextTokenLoss

    model = jaxft.from_pretrained(MODEL_DIR, quantize="nf4")
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets="all-linear"))
    model_def, params, frozen = step.split_model(model, is_lora_param)
    loss_fn = step.make_loss_fn(model_def, NextTokenLoss())
    ids = jnp.ones((2, 16), jnp.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": jnp.ones_like(ids)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: loss_fn(p, frozen, batch, 32.0, None)[0], params)
    dense_shapes = {f"[4,{o},{i}]" for o, i in ((128, 128), (64, 128), (384, 128), (128, 384))}
    saved = [line for line in out.getvalue().splitlines() if "from a constant" not in line]  # constants: the inputs
    assert not [line for line in saved if any(s in line.replace(" ", "") for s in dense_shapes)], saved
