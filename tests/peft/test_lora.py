"""LoRA / rsLoRA / DoRA on jaxft models equal HF PEFT: forward, init, merge, gradients and one step.

Adapter weights are made in torch by PEFT (B and the DoRA magnitudes randomized, so the adapter is
not a no-op) and copied into the jaxft model, then both sides are compared in float32.
"""

import collections
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxft
from jaxft import optim, sharding, step, testing
from jaxft.models import layers
from jaxft.peft import lora as lora_lib
from jaxft.peft import LoraConfig, LoRAParam, apply_lora, is_lora_param, linear_modules, lora_params, merge_lora
from jaxft.pretrained import flat_params
from jaxft.testing import copy_adapters, hf_keys, padded_batch, tiny_hf_model, torch_logits, train_batch
from jaxft.tasks.causal_lm import NextTokenLoss

peft = pytest.importorskip("peft")

TOL = 1e-4
RANK, ALPHA = 4, 8
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
# llama3_rope: untied lm_head, no biases; qwen2_bias: q/k/v biases (DoRA subtracts them), tied head.
CASE_TARGETS = {"llama3_rope": "all-linear", "qwen2_bias": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module", params=sorted(CASE_TARGETS))
def case(request, tmp_path_factory):
    folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, folder, torch_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama3_rope")


def peft_model(torch_model, targets, variant, seed=0, randomize=True):
    return testing.peft_model(torch_model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=targets, **VARIANTS[variant]),
                              seed=seed, randomize=randomize)


def jaxft_model(folder, targets, variant, **kw):
    model = jaxft.from_pretrained(folder, dtype="float32")
    targets = targets if isinstance(targets, str) else tuple(targets)
    return apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, **VARIANTS[variant], **kw))


def logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


# --- 1. forward parity --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_peft(case, variant):
    name, folder, torch_model = case
    targets = CASE_TARGETS[name]
    torch_peft = peft_model(torch_model, targets, variant)
    model = jaxft_model(folder, targets, variant)
    copy_adapters(torch_peft, model)
    ids, mask, positions = padded_batch(model.config.vocab_size)
    expected = torch_logits(torch_peft, ids, mask, positions)
    valid = mask.astype(bool)
    diff = np.abs(logits(model, ids, mask) - expected)[valid].max()
    assert diff <= TOL, f"{name}/{variant}: max |jaxft - peft| = {diff:.2e}"
    effect = np.abs(expected - torch_logits(torch_model, ids, mask, positions))[valid].max()
    assert effect > 1e-2, f"the adapter barely changes the logits ({effect:.1e}): the test would prove nothing"


# --- 2. init ------------------------------------------------------------------------------------
def test_init_is_a_no_op_with_peft_bounds(llama):
    folder, torch_model = llama
    base = jaxft.from_pretrained(folder)
    ids, mask, _ = padded_batch(base.config.vocab_size)
    model = jaxft_model(folder, "all-linear", "lora")
    for path, linear in linear_modules(model).items():
        if linear.adapter is None:
            continue
        a, b = np.asarray(linear.adapter.lora_A[...]), np.asarray(linear.adapter.lora_B[...])
        assert not b.any(), f"{path}: B must start at zero"
        bound = 1 / np.sqrt(a.shape[-1])  # kaiming_uniform(a=√5) on fan_in = in_features
        assert 0.9 * bound < np.abs(a).max() <= bound, (path, np.abs(a).max(), bound)
        assert abs(a.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3), (path, a.std())
        assert not np.allclose(a[0], a[1]), f"{path}: layers must draw their own A"
    np.testing.assert_array_equal(logits(model, ids, mask), logits(base, ids, mask))

    # PEFT's own A obeys the same bound, and its DoRA magnitudes (‖W‖ per row) are ours.
    torch_peft = peft_model(torch_model, "all-linear", "dora", randomize=False)
    sd = torch_peft.state_dict()
    dora = jaxft_model(folder, "all-linear", "dora")
    for path, linear in linear_modules(dora).items():
        if linear.adapter is None:
            continue
        keys = hf_keys(path, dora.config.num_hidden_layers)
        peft_a = sd[f"base_model.model.{keys[0]}.lora_A.default.weight"].numpy()
        assert np.abs(peft_a).max() <= 1 / np.sqrt(peft_a.shape[-1])
        peft_m = np.stack([sd[f"base_model.model.{k}.lora_magnitude_vector.default.weight"].numpy() for k in keys])
        ours = np.asarray(linear.adapter.lora_magnitude_vector[...])
        np.testing.assert_allclose(ours, peft_m, rtol=1e-6)
        np.testing.assert_allclose(ours, np.linalg.norm(np.asarray(linear.weight[...]), axis=-1), rtol=1e-6)


# --- 3. targets ---------------------------------------------------------------------------------
def test_all_linear_targets_the_projections_not_the_head(llama):
    model = jaxft_model(llama[0], "all-linear", "lora")
    adapted = {path[-1] for path, linear in linear_modules(model).items() if linear.adapter is not None}
    assert adapted == PROJECTIONS
    assert model.lm_head.adapter is None


def test_unknown_target_names_the_modules_that_exist(llama):
    model = jaxft.from_pretrained(llama[0])
    with pytest.raises(ValueError, match="qkv_proj") as err:
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=("q_proj", "qkv_proj")))
    for name in PROJECTIONS | {"lm_head"}:
        assert name in str(err.value)
    assert not nnx.state(model, LoRAParam), "a failed apply_lora must leave the model untouched"
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0, alpha=ALPHA)
    assert LoraConfig(rank=RANK, alpha=ALPHA, targets="q_proj, v_proj").targets == ("q_proj", "v_proj")
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets="v_proj"))
    with pytest.raises(ValueError, match="already have adapters"):
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=("q_proj", "v_proj")))
    assert model.model.layers.self_attn.q_proj.adapter is None


# --- 4. trainable vs frozen state ---------------------------------------------------------------
def test_adapter_state_is_exactly_the_lora_params(llama):
    folder, _ = llama
    before = {k: np.asarray(v.get_value()) for k, v in flat_params(jaxft.from_pretrained(folder))[1].items()}
    model = jaxft_model(folder, "all-linear", "dora")
    adapters = lora_params(model)
    assert len(adapters) == 3 * len(PROJECTIONS)
    q = "model.layers.self_attn.q_proj.adapter."
    assert adapters[q + "lora_A"].shape == (2, RANK, 64)  # [L, r, in]
    assert adapters[q + "lora_B"].shape == (2, 64, RANK)  # [L, out, r]
    assert adapters[q + "lora_magnitude_vector"].shape == (2, 64)  # [L, out]
    assert model.model.layers.mlp.down_proj.adapter.lora_A.axes == ("layers", "lora", "mlp")
    assert model.model.layers.mlp.down_proj.adapter.lora_B.axes == ("layers", "embed", "lora")

    frozen = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam)))}
    assert set(frozen) == set(before)
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(frozen[key].get_value()), value, err_msg=key)

    # base_dtype="bfloat16": every base param in bf16, adapters still fp32, the model still runs.
    half = jaxft_model(folder, "all-linear", "lora", base_dtype="bfloat16")
    assert {v.dtype for v in jax.tree.leaves(nnx.state(half, nnx.Not(LoRAParam)))} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(nnx.state(half, LoRAParam))} == {jnp.dtype(jnp.float32)}
    ids, mask, _ = padded_batch(half.config.vocab_size)
    diff = np.abs(logits(half, ids, mask) - logits(model, ids, mask))[mask.astype(bool)]
    assert np.isfinite(diff).all() and diff.max() < 0.05, diff.max()

    # A bf16 compute dtype: the adapter matmuls run in bf16 like the base, from fp32 adapter params.
    bf16 = apply_lora(jaxft.from_pretrained(folder, dtype="bfloat16"), LoraConfig(rank=RANK, alpha=ALPHA, use_dora=True))
    nnx.update(bf16, nnx.state(model, LoRAParam))
    out = bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    diff = np.abs(np.asarray(out, np.float32) - logits(model, ids, mask))[mask.astype(bool)]
    assert diff.max() < 0.1, diff.max()


# --- 5. merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, variant", [("llama3_rope", "lora"), ("qwen2_bias", "dora")])
def test_merge_matches_peft_merge_and_unload(name, variant, tmp_path):
    folder, torch_model = tiny_hf_model(tmp_path, name)
    targets = CASE_TARGETS[name]
    torch_peft = peft_model(torch_model, targets, variant)
    model = jaxft_model(folder, targets, variant)
    copy_adapters(torch_peft, model)
    ids, mask, _ = padded_batch(model.config.vocab_size)
    with_adapters = logits(model, ids, mask)

    merged_torch = torch_peft.merge_and_unload().state_dict()
    merge_lora(model)
    assert not nnx.state(model, LoRAParam) and all(l.adapter is None for l in linear_modules(model).values())
    worst = 0.0
    for path, linear in linear_modules(model).items():
        expected = np.stack([merged_torch[f"{k}.weight"].numpy() for k in hf_keys(path, model.config.num_hidden_layers)])
        worst = max(worst, np.abs(np.asarray(linear.weight[...]).reshape(expected.shape) - expected).max())
    assert worst <= 1e-5, f"max |merged jaxft - merged peft| = {worst:.2e}"
    diff = np.abs(logits(model, ids, mask) - with_adapters)[mask.astype(bool)].max()
    assert diff <= TOL, diff
    # Merged, the model has the base checkpoint's params again, so save_pretrained can write it.
    assert set(flat_params(model)[1]) == set(flat_params(jaxft.from_pretrained(folder))[1])


# --- 6. dropout ---------------------------------------------------------------------------------
def test_dropout_only_under_dropout_rng(llama):
    folder, torch_model = llama
    torch_peft = peft_model(torch_model, "all-linear", "lora")
    dropped, plain = (jaxft_model(folder, "all-linear", "lora", dropout=p) for p in (0.5, 0.0))
    copy_adapters(torch_peft, dropped)
    copy_adapters(torch_peft, plain)
    ids, mask, _ = padded_batch(plain.config.vocab_size)

    def run(key):
        with layers.dropout_rng(key):
            return logits(dropped, ids, mask)

    np.testing.assert_array_equal(run(None), logits(plain, ids, mask))  # no rng open: evaluation
    k1, k2 = jax.random.split(jax.random.key(0))
    first = run(k1)
    np.testing.assert_array_equal(run(k1), first)
    assert np.abs(run(k2) - first).max() > 1e-3


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_matches_peft_given_the_same_mask(variant):
    """PEFT drops out the adapter's input only; for DoRA it then recomputes the base product on the
    dropped input for the magnitude term. Feeding PEFT the mask we drew gives our output."""
    rate = 0.5
    torch.manual_seed(0)
    base = torch.nn.Sequential(collections.OrderedDict(up_proj=torch.nn.Linear(16, 8, bias=True)))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=rate, target_modules=["up_proj"], **VARIANTS[variant])
    torch_layer = peft.inject_adapter_in_model(config, base).up_proj
    with torch.no_grad():
        torch_layer.lora_B["default"].weight.normal_(0, 0.3)
        if variant == "dora":
            torch_layer.lora_magnitude_vector["default"].weight.mul_(1.5)

    class Holder(nnx.Module):
        def __init__(self):
            self.up_proj = layers.Linear(16, 8, use_bias=True, axes=("mlp", "embed"), param_dtype=jnp.float32,
                                         dtype=jnp.float32, rngs=nnx.Rngs(0))

    holder = apply_lora(Holder(), LoraConfig(rank=RANK, alpha=ALPHA, dropout=rate, targets="up_proj", **VARIANTS[variant]))
    ours, sd = holder.up_proj, torch_layer.state_dict()
    ours.weight.set_value(jnp.asarray(sd["base_layer.weight"].numpy()))
    ours.bias.set_value(jnp.asarray(sd["base_layer.bias"].numpy()))
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if getattr(ours.adapter, name) is not None:
            getattr(ours.adapter, name).set_value(jnp.asarray(sd[f"{name}.default.weight"].numpy()))

    x = np.random.RandomState(0).randn(3, 16).astype(np.float32)
    with layers.dropout_rng(jax.random.key(2)):
        got = np.asarray(ours(jnp.asarray(x)))
        # The mask our adapter drew: its dropout site is keyed by the module path, "up_proj".
        keep = np.asarray(lora_lib._dropout(jnp.ones_like(x), rate, layers.dropout_key("up_proj"))) != 0
    assert 0 < keep.mean() < 1

    class SameMask(torch.nn.Module):
        def forward(self, t):
            return t * torch.as_tensor(keep, dtype=t.dtype) / (1 - rate)

    torch_layer.lora_dropout["default"] = SameMask()
    with torch.no_grad():
        expected = torch_layer.train()(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dropout_masks_differ_per_layer():
    """Two identical stacked layers on the same input: under scan_layers their dropout masks differ."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up_proj = layers.Linear(16, 8, use_bias=False, axes=("mlp", "embed"), param_dtype=jnp.float32,
                                         dtype=jnp.float32, rngs=rngs)

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = layers.stack_layers(Block, 2, nnx.Rngs(0))

    block = Stack()
    apply_lora(block, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.5, targets="up_proj"))
    lin = block.layers.up_proj
    lin.weight.set_value(jnp.broadcast_to(lin.weight[0], lin.weight.shape))
    lin.adapter.lora_A.set_value(jnp.broadcast_to(lin.adapter.lora_A[0], lin.adapter.lora_A.shape))
    lin.adapter.lora_B.set_value(jnp.ones(lin.adapter.lora_B.shape))
    x = jnp.ones((3, 16))

    def body(layer, outs, index):
        return outs.at[index].set(layer.up_proj(x))

    def per_layer():
        return np.asarray(layers.scan_layers(block.layers, jnp.zeros((2, 3, 8)), jnp.arange(2), body))

    same = per_layer()
    np.testing.assert_array_equal(same[0], same[1])  # no rng: the layers are identical
    with layers.dropout_rng(jax.random.key(1)):
        out = per_layer()
    assert np.abs(out[0] - out[1]).max() > 1e-3


# --- 7. one train step ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_one_train_step_matches_peft(llama, variant):
    """jaxft.step's AdamW step on the adapters only equals torch AdamW on PEFT's trainable params,
    from the same adapter weights: loss, clipped gradient norm and the adapters after the step."""
    folder, torch_model = llama
    # Adam's first update is lr·g/(|g| + eps); eps = 1e-4 keeps float32 gradient rounding (<= 1e-7)
    # below the 1e-5 budget (see tests/training/test_step_parity.py).
    lr, wd, clip, eps = 5e-3, 0.1, 0.05, 1e-4
    torch_peft = peft_model(torch_model, "all-linear", variant)
    model = jaxft_model(folder, "all-linear", variant)
    copy_adapters(torch_peft, model)
    batch = train_batch(model.config.vocab_size)

    model_def, params, frozen = step.split_model(model, is_lora_param)
    assert set(params) == set(lora_params(model)), "only the adapters train"
    cfg = optim.OptimConfig(name="adamw", learning_rate=lr, schedule="constant", weight_decay=wd, clip_norm=clip, eps=eps)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss()))
    state, metrics = train_step(step.init_state(params, frozen, optimizer), {k: jnp.asarray(v) for k, v in batch.items()})

    torch_peft.train()
    out = torch_peft(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                     attention_mask=torch.as_tensor(batch["attention_mask"]),
                     position_ids=torch.as_tensor(batch["positions"], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(out.flatten(0, 1), torch.as_tensor(batch["targets"], dtype=torch.long).flatten(),
                                            reduction="none")
    mask = torch.as_tensor(batch["loss_mask"]).flatten()
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    trainable = [p for p in torch_peft.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
    # jaxft decays matrices only (A, B), not the 1-D DoRA magnitudes.
    torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": wd},
                       {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                      lr=lr, betas=(0.9, 0.999), eps=eps).step()

    assert abs(float(metrics["loss"]) - loss.item()) <= 1e-5
    assert abs(float(metrics["grad_norm"]) - grad_norm.item()) <= 1e-4 * grad_norm.item()
    assert grad_norm.item() > clip, "the test must exercise clipping"
    sd = torch_peft.state_dict()
    worst = 0.0
    for path, value in state.params.items():
        owner, name = path.rsplit(".adapter.", 1)
        keys = hf_keys(tuple(owner.split(".")), model.config.num_hidden_layers)
        expected = np.stack([sd[f"base_model.model.{k}.{name}.default.weight"].numpy() for k in keys])
        assert np.abs(np.asarray(params[path]).reshape(expected.shape) - expected).max() > 1e-4, f"{path} did not move"
        worst = max(worst, np.abs(np.asarray(value).reshape(expected.shape) - expected).max())
    assert worst <= 1e-5, f"{variant}: max |jaxft - peft| after one step = {worst:.2e}"


@pytest.mark.slow  # ~15 s of compiling for 8 fake devices, more on a busy machine
def test_dora_with_dropout_trains_the_same_on_a_mesh(llama):
    """Adapters shard by their axes (the rank axis "lora" stays replicated): on an (fsdp 4, tensor 2)
    mesh, with dropout and remat, two steps give the losses of one device (the second loss shows the
    first step's update)."""
    folder, _ = llama
    cfg = optim.OptimConfig(name="adamw", learning_rate=1e-2, schedule="constant", weight_decay=0.01)
    batches = [train_batch(128, batch=8, seed=s) for s in range(2)]

    def losses(mesh):
        model = apply_lora(jaxft.from_pretrained(folder, mesh=mesh),
                           LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear", use_dora=True, dropout=0.1))
        model_def, params, frozen = step.split_model(model, is_lora_param, remat="full")
        optimizer = optim.make_optimizer(cfg, params, model_def.axes)
        state = step.init_state(params, frozen, optimizer)
        train_step = step.make_train_step(model_def, optimizer, NextTokenLoss(), step.StepConfig(remat="full"))
        if mesh is None:
            compiled, place, context = jax.jit(train_step), lambda b: {k: jnp.asarray(v) for k, v in b.items()}, None
        else:
            compiled, state_sh = step.compile_train_step(train_step, state, optimizer, model_def, mesh)
            state, place, context = jax.device_put(state, state_sh), lambda b: sharding.global_batch(b, mesh), mesh
            assert state.params["model.layers.self_attn.q_proj.adapter.lora_A"].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
        out = []
        for batch in batches:
            with sharding.activate(context) if context else contextlib.nullcontext():
                state, metrics = compiled(state, place(batch))
            out.append(float(metrics["loss"]))
        return np.array(out)

    single, sharded = losses(None), losses(sharding.make_mesh({"fsdp": 4, "tensor": 2}))
    np.testing.assert_allclose(sharded, single, atol=1e-5)
