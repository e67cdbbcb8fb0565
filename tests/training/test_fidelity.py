"""Every training term equals its PyTorch reference, tightly enough that breaking the term fails:
Adafactor, Lion and SGD with momentum over 3 steps (weight decay on and off, clipping binding),
the learning-rate schedules at every step, z-loss, remat policies, and layer freezing as torch's
requires_grad=False.

The optimizer tests feed torch the gradients jaxft computed (mapped onto the torch parameters):
that isolates the optimizer arithmetic, so sign-based updates (Lion, Adafactor's first step) cannot
flip on gradients that differ by float32 rounding between the two frameworks. Loss and gradient
parity of the model itself is test_step_parity's job (and the z-loss test's, below).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from transformers import optimization as hf_optim

import jaxft
from jaxft import optim, step
from jaxft.peft import lora
from jaxft.tasks.causal_lm import NextTokenLoss
from jaxft.testing import tiny_hf_model, train_batch

STEPS = 3  # enough for momentum / moments to matter


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Every weight matrix >= 128 on both sides, so that optax's Adafactor factors it (it factors
    only when the second-largest dim is >= 128), as transformers' does (it factors every matrix).
    With biases, so that the decay split (matrices only) is exercised."""
    return tiny_hf_model(tmp_path_factory.mktemp("wide"), "llama3_rope", hidden_size=128, intermediate_size=256,
                         num_key_value_heads=4, attention_bias=True, mlp_bias=True)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def to_torch_name(path: str, layer: int | None) -> str:
    return path.replace("model.layers.", f"model.layers.{layer}.") if layer is not None else path


def per_torch_param(flat: dict) -> dict[str, np.ndarray]:
    """jaxft's flat {path: array} (stacked [L, ...] layers) as {torch parameter name: array}."""
    out = {}
    for path, value in flat.items():
        value = np.asarray(value)
        if path.startswith("model.layers."):
            out.update({to_torch_name(path, i): value[i] for i in range(value.shape[0])})
        else:
            out[path] = value
    return out


def worst_difference(params: dict, torch_model) -> float:
    named = dict(torch_model.named_parameters())
    return max(float(np.abs(v - named[k].detach().numpy()).max()) for k, v in per_torch_param(params).items())


def jax_batch(vocab: int, seed: int):
    return {k: jnp.asarray(v) for k, v in train_batch(vocab, seed=seed).items()}


class Prepared:
    """A model loaded once per module: its split and one compiled gradient of the causal-LM loss."""

    def __init__(self, folder, torch_model):
        self.folder, self.torch_model = folder, torch_model
        self.model_def, self.params, self.frozen = step.split_model(jaxft.from_pretrained(folder))
        self.objective = NextTokenLoss()
        loss_fn = step.make_loss_fn(self.model_def, self.objective)
        normalizer = lambda b: jnp.maximum(self.objective.normalizer(b), 1.0)  # noqa: E731  (as the step does)
        self.grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, self.frozen, b, normalizer(b), jax.random.key(0))[0]))
        self.batches = [jax_batch(torch_model.config.vocab_size, seed=s) for s in range(STEPS)]


@pytest.fixture(scope="module")
def wide(wide_llama):
    return Prepared(*wide_llama)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return Prepared(*tiny_llama)


def run_both(m: Prepared, cfg: optim.OptimConfig, torch_optimizer, frozen_layers: int = 0, steps: int = STEPS):
    """`steps` updates of jaxft's optimizer, and the same steps in torch from jaxft's gradients
    (clip_grad_norm_, then `torch_optimizer(decay_params, no_decay_params)`); the first
    `frozen_layers` decoder layers have requires_grad=False in torch.
    Returns (jaxft params, jaxft optimizer state, torch model)."""
    optimizer = optim.make_optimizer(cfg, m.params, m.model_def.axes, frozen_layers)
    update = jax.jit(optimizer.update)
    params, opt_state = m.params, optimizer.init(m.params)

    torch_model = copy.deepcopy(m.torch_model).train()
    named = dict(torch_model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(layer_of(name) is None or layer_of(name) >= frozen_layers)
    trainable = [p for p in named.values() if p.requires_grad]
    # jaxft's decay mask is torch's usual param-group split: matrices decay, vectors (norms, biases) do not.
    decays = {to_torch_name(k, i) for k, decays in optim.decay_mask(m.params, m.model_def.axes).items() if decays
              for i in (range(m.params[k].shape[0]) if k.startswith("model.layers.") else [None])}
    assert decays == {k for k, p in named.items() if p.ndim >= 2}
    torch_opt = torch_optimizer([p for p in trainable if p.ndim >= 2], [p for p in trainable if p.ndim < 2])

    for s in range(steps):
        grads = m.grad(params, m.batches[s])
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        torch_grads = per_torch_param(jax.device_get(grads))
        torch_opt.zero_grad(set_to_none=True)
        for p_name, p in named.items():
            if p.requires_grad:
                p.grad = torch.from_numpy(np.array(torch_grads[p_name]))
        if cfg.clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)
            assert norm.item() > cfg.clip_norm, "the test must exercise clipping"
        torch_opt.step()
    return jax.device_get(params), jax.device_get(opt_state), torch_model


def moved(params, initial) -> float:
    return max(float(np.abs(np.asarray(params[k]) - np.asarray(initial[k])).max()) for k in initial)


# ---- optimizers -----------------------------------------------------------------------------------
class LionReference(torch.optim.Optimizer):
    """Lion as its reference implementations write it (Chen et al. 2023, arXiv:2302.06675, Program 1;
    google/automl lion/lion_pytorch.py; lucidrains/lion-pytorch lion_pytorch.py `update_fn`):
    decoupled decay p *= 1 - lr·wd; p -= lr·sign(b1·m + (1-b1)·g); m = b2·m + (1-b2)·g."""

    def __init__(self, params, lr, betas, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - lr * wd)
                p.add_((m * b1 + p.grad * (1 - b1)).sign(), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def groups(decay, no_decay, wd):
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# (jaxft config, torch optimizer, tolerance on params after 3 steps). Tolerances sit ~10x above
# what float32 gives here; each term broken on purpose moves params by >= 100x more (see below).
CASES = {
    "sgd_momentum": (dict(name="sgd", learning_rate=0.5, momentum=0.9),
                     lambda d, n, wd: torch.optim.SGD(groups(d, n, wd), lr=0.5, momentum=0.9), 2e-7),
    "lion": (dict(name="lion", learning_rate=1e-3, b1=0.9, b2=0.99),
             lambda d, n, wd: LionReference(groups(d, n, wd), lr=1e-3, betas=(0.9, 0.99)), 5e-7),
    # transformers' Adafactor with optax.adafactor's defaults: external lr (relative_step=False,
    # warmup_init=False), parameter scale on (optax multiply_by_parameter_scale=True), update RMS
    # clipped at 1.0, decay_rate -0.8 (optax's 0.8: beta2_t = 1 - t^-0.8), eps (1e-30, 1e-3), no beta1
    # (optax momentum=None).
    "adafactor": (dict(name="adafactor", learning_rate=0.05),
                  lambda d, n, wd: transformers.Adafactor(groups(d, n, wd), lr=0.05, eps=(1e-30, 1e-3),
                                                          clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                                                          scale_parameter=True, relative_step=False,
                                                          warmup_init=False), 1e-6),
}


@pytest.mark.parametrize("weight_decay", [0.0, 0.3], ids=["no_decay", "decay"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_steps_match_torch(wide, case, weight_decay):
    settings, make_torch, atol = CASES[case]
    cfg = optim.OptimConfig(schedule="constant", weight_decay=weight_decay, clip_norm=0.05, **settings)
    params, _, torch_model = run_both(wide, cfg, lambda d, n: make_torch(d, n, weight_decay))
    assert moved(params, wide.params) > 300 * atol, "the steps must move the params far beyond the tolerance"
    worst = worst_difference(params, torch_model)
    assert worst <= atol, f"{case}: max |jaxft - torch| after {STEPS} steps = {worst:.2e}"


# ---- schedules ------------------------------------------------------------------------------------
def hf_learning_rates(schedule: str, peak: float, warmup: int, total: int, ratio: float) -> list[float]:
    """The lr transformers' LambdaLR gives optimizer step k = 0..total (read before that step, as
    Trainer does: lr_scheduler.step() follows optimizer.step())."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    if schedule == "constant":
        sched = hf_optim.get_constant_schedule_with_warmup(opt, warmup)
    elif schedule == "linear" and ratio == 0:
        sched = hf_optim.get_linear_schedule_with_warmup(opt, warmup, total)
    elif schedule == "linear":  # transformers' linear decay to a floor: polynomial of power 1
        sched = hf_optim.get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=ratio * peak, power=1.0)
    elif ratio == 0:
        sched = hf_optim.get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = hf_optim.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=ratio)
    rates = []
    for _ in range(total + 1):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("ratio", [0.0, 0.1])
@pytest.mark.parametrize("warmup", [0, 3, 9])
@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedule_matches_transformers_at_every_step(schedule, warmup, ratio):
    peak, total = 3e-4, 10
    cfg = optim.OptimConfig(learning_rate=peak, schedule=schedule, warmup_steps=warmup, total_steps=total,
                            end_learning_rate_ratio=ratio)
    ours = [float(optim.make_schedule(cfg)(k)) for k in range(total + 1)]  # optax count k = before update k+1
    np.testing.assert_allclose(ours, hf_learning_rates(schedule, peak, warmup, total, ratio), rtol=1e-6, atol=1e-12)


def test_logged_learning_rate_is_the_one_applied(tiny):
    """Plain SGD moves params by -lr·g: the lr each train step applied, read off the params, equals
    the learning_rate the step logs and transformers' schedule at that step."""
    peak, warmup, total = 0.5, 2, 5
    cfg = optim.OptimConfig(name="sgd", learning_rate=peak, schedule="cosine", warmup_steps=warmup, total_steps=total,
                            clip_norm=None)
    optimizer = optim.make_optimizer(cfg, tiny.params, tiny.model_def.axes)
    state = step.init_state(tiny.params, tiny.frozen, optimizer)
    train_step = jax.jit(step.make_train_step(tiny.model_def, optimizer, tiny.objective,
                                              schedule=optim.make_schedule(cfg)))
    applied, logged = [], []
    for k in range(total + 1):
        batch = tiny.batches[k % STEPS]
        g = jax.device_get(tiny.grad(state.params, batch))
        before = jax.device_get(state.params)
        state, metrics = train_step(state, batch)
        after = jax.device_get(state.params)
        applied.append(sum(float(np.vdot(before[p] - after[p], g[p])) for p in g) /
                       sum(float(np.vdot(g[p], g[p])) for p in g))
        logged.append(float(metrics["learning_rate"]))
    expected = hf_learning_rates("cosine", peak, warmup, total, 0.0)
    np.testing.assert_allclose(logged, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-6)


# ---- z-loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 4], ids=["whole", "chunked"])
def test_z_loss_matches_its_formula_and_gradient(tiny, chunk):
    """train.z_loss adds z · mean over the trained target tokens of logsumexp(logits)² (PaLM,
    Chowdhery et al. 2022 §5; MaxText's z_loss), over the same tokens as the cross-entropy."""
    z = 0.1  # large, so that the term's share of loss and gradient is far above the tolerances
    batch = train_batch(tiny.torch_model.config.vocab_size)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    objective = NextTokenLoss(z_loss=z, chunk=chunk)
    loss_fn = step.make_loss_fn(tiny.model_def, objective)
    (total, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        tiny.params, tiny.frozen, jb, objective.normalizer(jb), jax.random.key(0))

    torch_model = copy.deepcopy(tiny.torch_model)
    logits = torch_model(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                         attention_mask=torch.as_tensor(batch["attention_mask"]),
                         position_ids=torch.as_tensor(batch["positions"], dtype=torch.long)).logits
    lse = torch.logsumexp(logits, dim=-1)
    target = torch.gather(logits, -1, torch.as_tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
    mask = torch.as_tensor(batch["loss_mask"])
    nll, zterm = ((lse - target) * mask).sum() / mask.sum(), (lse.square() * mask).sum() / mask.sum()
    reference = nll + z * zterm
    reference.backward()

    assert abs(float(total) - reference.item()) <= 1e-5 * reference.item()
    assert abs(float(metrics["loss"]) - nll.item()) <= 1e-5 * nll.item()  # the logged loss is the NLL alone
    assert abs(float(metrics["z_loss"]) - zterm.item()) <= 1e-5 * zterm.item()
    assert z * zterm.item() > 0.05 * nll.item(), "the z term must be a visible share of the loss"
    ours = per_torch_param(jax.device_get(grads))
    unregularized = per_torch_param(jax.device_get(tiny.grad(tiny.params, jb)))
    named = dict(torch_model.named_parameters())
    worst = max(float(np.abs(ours[k] - named[k].grad.numpy()).max()) for k in ours)
    effect = max(float(np.abs(ours[k] - unregularized[k]).max()) for k in ours)
    assert worst <= 1e-6, f"max |grad jaxft - grad torch| = {worst:.2e}"
    assert effect > 1e3 * 1e-6, f"the z-loss must change the gradient (it changed it by {effect:.2e})"


# ---- remat ----------------------------------------------------------------------------------------
def remat_policies_in(jaxpr) -> list:
    """The policy of every remat (jax.checkpoint) in a jaxpr, nested ones (in the layer scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name:
            found.append(eqn.params.get("policy"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += remat_policies_in(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += remat_policies_in(sub)
    return found


def remat_gradient(folder, policy: str, batch, rng, lora_dropout: float = 0.0):
    """(jitted gradient of the loss in (params, rng), params, remat policies in the loss's jaxpr) of a
    model split with train.remat=policy."""
    model, trainable = jaxft.from_pretrained(folder), (lambda path, v: True)
    if lora_dropout:
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, dropout=lora_dropout), seed=1)
        trainable = lora.is_lora_param
    model_def, params, frozen = step.split_model(model, trainable, remat=policy)
    if lora_dropout:  # B = 0 at init would give A no gradient
        params = {k: v + 0.05 * jax.random.normal(jax.random.key(len(k)), v.shape) for k, v in params.items()}
    objective = NextTokenLoss()
    loss_fn = step.make_loss_fn(model_def, objective)
    args = (frozen, batch, objective.normalizer(batch))
    found = remat_policies_in(jax.make_jaxpr(loss_fn)(params, *args, rng).jaxpr)
    grad_fn = jax.jit(jax.grad(lambda p, key: loss_fn(p, *args, key)[0]))
    return grad_fn, params, found


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


# What each train.remat value must mean (written out, not read from jaxft's own table).
EXPECTED_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable, "dots": jax.checkpoint_policies.dots_saveable,
                     "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def test_remat_policies_give_the_gradients_of_none(tiny):
    """Same gradients (fp32, 1e-6) under every train.remat policy, and each policy is the one the
    layer scan's jax.checkpoint carries."""
    assert set(step.REMAT_POLICIES) == {"none", *EXPECTED_POLICIES}
    batch, rng = tiny.batches[0], jax.random.key(0)
    reference = tiny.grad(tiny.params, batch)  # remat="none"
    for policy in ("none", "full", "dots", "dots_no_batch"):
        grad_fn, params, found = remat_gradient(tiny.folder, policy, batch, rng)
        if policy == "none":
            assert found == []
            continue
        assert found and all(p == EXPECTED_POLICIES[policy] for p in found), (policy, found)
        worst = max_difference(grad_fn(params, rng), reference)
        assert worst <= 1e-6, f"remat={policy}: max |grad - grad(remat=none)| = {worst:.2e}"


def test_remat_redraws_the_same_dropout_masks(tiny):
    """With LoRA dropout the recomputed forward pass must draw the masks the first one drew."""
    batch, rng = tiny.batches[0], jax.random.key(0)
    grad_none, params, _ = remat_gradient(tiny.folder, "none", batch, rng, lora_dropout=0.3)
    grad_full, _, found = remat_gradient(tiny.folder, "full", batch, rng, lora_dropout=0.3)
    assert found
    reference = grad_none(params, rng)
    assert max_difference(grad_none(params, jax.random.key(1)), reference) > 1e-3, "dropout must be live"
    worst = max_difference(grad_full(params, rng), reference)
    assert worst <= 1e-6, f"remat=full with dropout: max |grad - grad(remat=none)| = {worst:.2e}"


# ---- layer freezing -------------------------------------------------------------------------------
def test_freeze_first_layers_is_torch_requires_grad_false(tiny):
    """train.freeze_first_layers=1 equals torch with layer 0's params requires_grad=False: they add
    nothing to the clipped gradient norm or the AdamW moments and get no update, decay included."""
    lr, wd = 5e-3, 0.1
    cfg = optim.OptimConfig(name="adamw", learning_rate=lr, schedule="constant", weight_decay=wd, clip_norm=0.05)
    params, opt_state, torch_model = run_both(
        tiny, cfg, frozen_layers=1, steps=2,
        torch_optimizer=lambda d, n: torch.optim.AdamW(groups(d, n, wd), lr=lr, betas=(0.9, 0.999), eps=1e-8))
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for path, value in params.items():
        if path.startswith("model.layers."):
            np.testing.assert_array_equal(value[0], np.asarray(tiny.params[path])[0], err_msg=path)
            # No moments for the frozen layer at all: AdamW's m and v hold layers 1.. only.
            assert adam[0].mu[path].shape == adam[0].nu[path].shape == (value.shape[0] - 1, *value.shape[1:]), path
    assert moved(params, tiny.params) > 1e-3
    worst = worst_difference(params, torch_model)
    assert worst <= 1e-6, f"max |jaxft - torch| after 2 steps with layer 0 frozen = {worst:.2e}"


def test_the_config_keys_reach_the_optimizer():
    """train.momentum / b1 / b2 / end_learning_rate_ratio from a config file or the command line are
    the optimizer's (before: SGD from a config was always plain SGD, Lion always had b2 = 0.999)."""
    import os

    from jaxft import config as config_lib

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "demo.py")
    settings = lambda *o: config_lib.optimizer_settings(config_lib.load(demo, list(o)))  # noqa: E731
    assert (settings("--config.train.optimizer=lion").b1, settings("--config.train.optimizer=lion").b2) == (0.9, 0.99)
    assert (settings().b1, settings().b2) == (0.9, 0.999)  # adamw
    sgd = settings("--config.train.optimizer=sgd", "--config.train.momentum=0.9")
    assert sgd.momentum == 0.9
    custom = settings("--config.train.b1=0.8", "--config.train.b2=0.95", "--config.train.end_learning_rate_ratio=0.1")
    assert (custom.b1, custom.b2, custom.end_learning_rate_ratio) == (0.8, 0.95, 0.1)
