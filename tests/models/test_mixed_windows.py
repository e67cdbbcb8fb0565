"""Families with mixed sliding/global layers (Gemma 2, Gemma 3, Qwen2 with max_window_layers) reach
the fused attention kernels: the decoder scans its layers in groups whose windows repeat
(layer_groups.py), so each layer's window is static. Splash runs in Pallas interpret mode on CPU
and "jax" is the jax.nn.dot_product_attention call that cuDNN gets (its XLA path); inside whole
models no call may fall back, and the logits are the "xla" reference's and transformers'. Compile
time stays flat in depth, and remat gives the gradients of no remat through the groups."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft
from jaxft.models import attention as attn
from jaxft.models.gemma import GemmaConfig, GemmaForCausalLM
from jaxft.models.layer_groups import Segment, layer_plan
from jaxft.testing import padded_batch, tiny_hf_model, torch_logits
from jaxft.testing_families import FAMILY_CASES

LENGTH = 128  # splash needs a multiple of 128; far past every window below
S, F = "sliding_attention", "full_attention"
DEFAULT = object()  # drop the case's field: transformers' default (Gemma 3: 5 sliding : 1 full)
# Deep enough for real groups: Gemma 2 scans 2 × (S, F), Gemma 3 (18 layers) 3 × (5 S, F); Qwen2's
# (F, S, S) is two segments, 1 × (F,) and 2 × (S,), run as one switched scan (as is a Gemma 3
# remainder: the remat test). Windows far shorter than LENGTH.
MODELS = {
    "gemma2_softcap": (FAMILY_CASES["gemma2_softcap"], dict(num_hidden_layers=4, sliding_window=37)),
    "gemma2_nocap": (FAMILY_CASES["gemma2_softcap"], dict(num_hidden_layers=4, sliding_window=37,
                                                          attn_logit_softcapping=None)),
    "gemma3_text": (FAMILY_CASES["gemma3_text"], dict(num_hidden_layers=18, layer_types=DEFAULT, sliding_window=21)),
    "qwen2_max_window_layers": (dict(model_type="qwen2", use_sliding_window=True, sliding_window=29,
                                     max_window_layers=1), dict(num_hidden_layers=3)),
}
PLANS = {
    "gemma2_softcap": [(0, 2, (37, None))],
    "gemma2_nocap": [(0, 2, (37, None))],
    "gemma3_text": [(0, 3, (21,) * 5 + (None,))],
    "qwen2_max_window_layers": [(0, 1, (None,)), (1, 2, (29,))],
}
# Attention calls traced: one per group member (one segment), one per distinct kind (switched).
TRACED = {"gemma2_softcap": 2, "gemma2_nocap": 2, "gemma3_text": 6, "qwen2_max_window_layers": 2}
# (model, implementation): the kernel must run in every layer. jax.nn.dot_product_attention has no
# soft-capping, so Gemma 2 with its attn_logit_softcapping reaches splash only (see the last test).
RUNS = [("gemma2_softcap", "splash"), ("gemma2_nocap", "jax"), ("gemma3_text", "splash"), ("gemma3_text", "jax"),
        ("qwen2_max_window_layers", "splash"), ("qwen2_max_window_layers", "jax")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            base, overrides = MODELS[name]
            spec = {k: v for k, v in {**base, **overrides}.items() if v is not DEFAULT}
            folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp(name), spec.pop("model_type"), **spec)
            cache[name] = (torch_model, jaxft.from_pretrained(folder))
        return cache[name]

    return get


def test_layer_plans_cover_every_layer_with_its_own_window():
    sliding, full = ("w", 0), (None, 1)
    assert layer_plan([sliding, full] * 12) == (Segment(0, 12, (sliding, full)),)
    gemma3 = ([sliding] * 5 + [full]) * 4 + [sliding] * 2
    assert layer_plan(gemma3) == (Segment(0, 4, (sliding,) * 5 + (full,)), Segment(24, 2, (sliding,)))
    assert layer_plan([full] * 21 + [sliding] * 7) == (Segment(0, 21, (full,)), Segment(21, 7, (sliding,)))
    assert layer_plan([full] * 5) == (Segment(0, 5, (full,)),)
    rng = np.random.default_rng(0)
    for _ in range(50):  # any pattern: the segments, unrolled, are the layers in order
        kinds = [int(k) for k in rng.integers(0, 3, rng.integers(1, 30))]
        plan = layer_plan(kinds)
        assert [k for s in plan for _ in range(s.groups) for k in s.kinds] == kinds
        assert all(len(s.kinds) <= 8 for s in plan)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_models_scan_the_planned_groups(built, name):
    _, model = built(name)
    spec = model.model.spec
    plan = layer_plan(zip(spec.windows, spec.layer_ropes))
    assert [(s.start, s.groups, tuple(w for w, _ in s.kinds)) for s in plan] == PLANS[name]
    # Several segments run as ONE switched scan (slicing the stack per segment would copy weights).
    ids = np.zeros((1, 8), np.int32)
    jaxpr = jax.make_jaxpr(lambda ids: model(ids))(ids).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    conds = [e for e in scans[0].params["jaxpr"].jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == (len(plan) > 1)


@pytest.mark.parametrize("name,impl", RUNS)
def test_fused_kernels_run_in_every_layer_and_give_the_xla_logits(built, name, impl):
    torch_model, model = built(name)
    ids, mask, positions = padded_batch(model.config.vocab_size, batch=2, length=LENGTH)
    real = mask.astype(bool)
    attn.set_attention_implementation(model, "xla")
    want = np.asarray(model(ids, attention_mask=mask))
    expected = torch_logits(torch_model, ids, mask, positions)
    assert np.abs(want - expected)[real].max() <= 1e-4  # the reference is transformers'
    attn.set_attention_implementation(model, impl)
    with attn.record_dispatch() as record:
        got = np.asarray(jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(ids, mask))
    assert not record.fallbacks, dict(record.fallbacks)
    assert record.kernels == {impl: TRACED[name]}, record.kernels  # every layer body ran the kernel
    diff = np.abs(got - want)[real].max()
    assert diff <= 1e-5, f"{name} with {impl}: max |fused - xla| = {diff:.2e}"
    attn.set_attention_implementation(model, "xla")


def test_gemma2_soft_capping_is_a_recorded_fallback_for_jax(built):
    """What cannot run fused is observable: jax.nn.dot_product_attention has no soft-capping."""
    _, model = built("gemma2_softcap")
    ids, mask, _ = padded_batch(model.config.vocab_size, batch=2, length=16)
    attn.set_attention_implementation(model, "jax")
    with attn.record_dispatch() as record:
        jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(ids, mask)
    attn.set_attention_implementation(model, "xla")
    assert not record.kernels and sum(record.fallbacks.values()) == 2
    assert all("soft-capping" in reason for _, reason in record.fallbacks)


@pytest.mark.parametrize("name,impl", [("gemma3_text", "jax"), ("qwen2_max_window_layers", "xla")])
def test_cached_decoding_through_groups_and_switches_gives_the_full_forward_logits(built, name, impl):
    """The KV cache [L, ...] goes through the groups (Gemma 3) and the switched scan (Qwen2)."""
    _, model = built(name)
    attn.set_attention_implementation(model, impl)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.config.vocab_size, (2, 30)).astype(np.int32)  # past both windows
    prompt_mask = np.ones_like(prompt)
    prompt_mask[0, :4] = 0  # left padding
    new = rng.integers(3, model.config.vocab_size, (2, 3)).astype(np.int32)
    full, full_mask = np.concatenate([prompt, new], 1), np.concatenate([prompt_mask, np.ones_like(new)], 1)
    expected = np.asarray(model(full, attention_mask=full_mask))
    decode = jax.jit(lambda ids, cache, mask=None: model.decode(ids, cache, attention_mask=mask))
    cache = model.init_cache(2, full.shape[1])
    logits, cache = decode(prompt, cache, prompt_mask)
    got = [np.asarray(logits)]
    for i in range(new.shape[1]):
        logits, cache = decode(new[:, i:i + 1], cache)
        got.append(np.asarray(logits))
    attn.set_attention_implementation(model, "xla")
    assert cache.keys.shape[0] == model.config.num_hidden_layers
    assert np.abs(np.concatenate(got, 1) - expected)[full_mask.astype(bool)].max() <= 1e-5


def test_remat_through_the_groups_gives_the_gradients_of_no_remat():
    # Gemma 3 with a 3-layer pattern, 8 layers: 2 × (S, S, F), then a remainder of 2 × (S,): the
    # switched scan, its branches differing in window and RoPE table.
    model = _gemma("gemma3_text", 8, sliding_window_pattern=3)
    spec = model.model.spec
    assert [(s.groups, len(s.kinds)) for s in layer_plan(zip(spec.windows, spec.layer_ropes))] == [(2, 3), (2, 1)]
    ids, mask, _ = padded_batch(model.config.vocab_size, batch=2, length=12)
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(remat):
        def loss(params):
            m = nnx.merge(graphdef, params)
            m.remat = remat
            return jnp.mean(jnp.square(m(ids, attention_mask=mask)) * mask[..., None])

        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    reference = grads("none")
    scale = max(float(jnp.abs(g).max()) for g in reference)
    for policy in ("full",):  # the policy is applied per member (layer_groups.py); "dots": test_fidelity.py
        worst = max(float(jnp.abs(a - b).max()) for a, b in zip(grads(policy), reference))
        assert worst <= 1e-5 * scale, f"remat={policy}: max |grad - grad(none)| = {worst:.2e} (max |grad| {scale:.2e})"


def _gemma(model_type: str, layers: int, **fields) -> GemmaForCausalLM:
    """A tiny random Gemma 2/3 built from its config alone (no transformers: compile-time tests)."""
    cfg = GemmaConfig.from_hf(dict(model_type=model_type, vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=8, sliding_window=4, **fields))
    return GemmaForCausalLM(cfg, rngs=nnx.Rngs(0))


def _step(layers: int, grad: bool):
    """(jitted function, params) of a tiny Gemma 2: its forward, or its training gradient under remat=full."""
    model = _gemma("gemma2", layers)
    model.remat = "full" if grad else "none"
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.zeros((2, 16), jnp.int32)

    def forward(params):  # a new function per call: nothing comes from jax's caches
        return nnx.merge(graphdef, params)(ids)

    return jax.jit(jax.grad(lambda p: jnp.mean(forward(p))) if grad else forward), params


def test_compile_time_is_flat_in_depth():
    """24 layers compile in at most 1.5× the time of 2 (best of 2, interleaved, as the machine is
    shared), and the lowered training step is the same size: the depth is a scan length."""
    def program_size(layers):
        fn, params = _step(layers, grad=True)
        return len(fn.lower(params).as_text().splitlines())

    shallow, deep = program_size(2), program_size(24)
    assert deep <= 1.05 * shallow, f"the lowered step has {deep} lines at 24 layers, {shallow} at 2"

    def compile_seconds(layers):
        fn, params = _step(layers, grad=False)
        start = time.perf_counter()
        fn.lower(params).compile()
        return time.perf_counter() - start

    times = {2: [], 24: []}  # the first 2-layer sample also pays jax's one-time costs; the min drops it
    for _ in range(2):
        for layers in times:
            times[layers].append(compile_seconds(layers))
    shallow, deep = min(times[2]), min(times[24])
    assert deep <= 1.5 * shallow, f"24 layers compile in {deep:.2f} s, 2 layers in {shallow:.2f} s"
