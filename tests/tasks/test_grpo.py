"""task=grpo against TRL's GRPOTrainer (trl 1.16): per-token log-probs, loss and metrics for each
loss type with and without the KL term; advantages; a TRL reward file unchanged; the demo learns;
resume repeats the same completions; a data=8 mesh samples as one device; bad rewards are named."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import export, hf, sharding, train
from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft.demo import MODEL_DIR
from jaxft.demo.grpo import GRPO_TRAIN
from jaxft.peft import lora
from jaxft.rewards import RewardError, load_rewards, score
from jaxft.tasks.grpo import LOSS_TYPES, GRPOLoss, advantages
from jaxft.testing import copy_adapters, tiny_hf_model

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO_DEMO = os.path.join(ROOT, "configs", "grpo_demo.py")
REWARD = os.path.join(ROOT, "jaxft", "demo", "rewards.py")
G, NEW, TEMPERATURE = 2, 5, 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, torch_model = tiny_hf_model(tmp_path_factory.mktemp("grpo") / "base", "llama3_rope", vocab_size=1024)
    hf.copy_tokenizer_files(MODEL_DIR, folder)
    return folder, torch_model, transformers.AutoTokenizer.from_pretrained(folder)


def trl_trainer(torch_model, tokenizer, **kwargs):
    """TRL's GRPOTrainer with a new LoRA (reference: the base, adapters off), its B randomized."""
    from jaxft.demo.rewards import northern_town

    args = trl.GRPOConfig(output_dir="/tmp/jaxft-trl-grpo", report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=G, max_completion_length=NEW,
                          temperature=TEMPERATURE, **kwargs)
    trainer = trl.GRPOTrainer(model=copy.deepcopy(torch_model), reward_funcs=[northern_town], args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": "Q: a?\nA:"}] * 4),
                              processing_class=tokenizer,
                              peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return trainer


def fixed_rollout(vocab: int):
    """4 completions (2 prompts × 2) of different lengths, left-padded prompts as TRL holds them."""
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, vocab, n).tolist() for n in (6, 4)]
    completions = [rng.randint(3, vocab, n).tolist() for n in (5, 3, 2, 5)]
    return [p for p in prompts for _ in range(G)], completions


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_log_probs_loss_and_metrics_equal_trl(tiny, loss_type, beta):
    folder, torch_model, tokenizer = tiny
    trainer = trl_trainer(torch_model, tokenizer, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28)
    prompts, completions = fixed_rollout(1024)
    P = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [0] * (NEW - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (NEW - len(c)) for c in completions])
    adv = advantages(np.array([1.0, 0.2, 0.0, 1.0], np.float32), G, "group")
    trainer.model.train()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), NEW)
        with trainer.model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), NEW)
    old = logps + torch.tensor(np.random.RandomState(1).uniform(-0.5, 0.5, logps.shape), dtype=torch.float32)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor(adv), "old_per_token_logps": old,
              "num_items_in_batch": completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    trainer._metrics["train"].clear()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before a step
    loss = trainer._compute_loss(trainer.model, inputs).item()
    expected = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = jaxft.from_pretrained(folder)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    copy_adapters(trainer.model, model)
    batch = _our_batch(prompts, completions, adv, old.numpy(), length=P + NEW)
    objective = GRPOLoss(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta, max_completion_length=NEW,
                         reference="adapters_off" if beta else "none", temperature=TEMPERATURE)
    ours, _ = objective.per_token(model, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):  # completion token j is target len(p) - 1 + j
        np.testing.assert_allclose(np.asarray(ours[i, len(p) - 1:len(p) - 1 + len(c)]), logps[i, :len(c)].numpy(),
                                   atol=1e-5)
    got_loss, got = objective.loss(model, batch, objective.normalizer(batch))
    print(f"\n[grpo {loss_type} β={beta}] loss jaxft {float(got_loss):.7f} TRL {loss:.7f}")
    assert abs(float(got_loss) - loss) <= 1e-5
    names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    assert float(got["clip_ratio/region_mean"]) > 0  # the perturbed old log-probs make clipping happen
    for name in names:
        assert abs(float(got[name]) - expected[name]) <= 1e-5, (name, float(got[name]), expected[name])


def _our_batch(prompts, completions, adv, old_completion_logps, length):
    rows = len(prompts)
    batch = {k: np.zeros((rows, length), np.float32 if k in ("loss_mask", "old_logps") else np.int32)
             for k in ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "old_logps")}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens = p + c
        n = len(tokens) - 1
        batch["input_ids"][i, :n], batch["targets"][i, :n] = tokens[:-1], tokens[1:]
        batch["attention_mask"][i, :n], batch["positions"][i, :n] = 1, np.arange(n)
        batch["loss_mask"][i, len(p) - 1:n] = 1.0
        batch["old_logps"][i, len(p) - 1:n] = old_completion_logps[i, :len(c)]
    return {**{k: jnp.asarray(v) for k, v in batch.items()}, "advantages": jnp.asarray(adv)}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_trls(scale):
    """TRL's `_generate_and_score_completions` (grpo_trainer.py, sum_then_normalize): group mean
    baseline, Bessel-corrected std (its `nanstd`), + 1e-4; None rewards excluded, their advantage 0.
    Written here independently with torch."""
    rewards = np.array([1.0, 0.2, 0.2, 0.0, np.nan, 1.0, 0.5, 0.5], np.float32)
    t = torch.tensor(rewards).view(-1, 4)
    mean = torch.nanmean(t, 1).repeat_interleave(4)

    def nanstd(x):
        x = x[~torch.isnan(x)]
        return x.std(unbiased=True)

    std = (torch.stack([nanstd(g) for g in t]).repeat_interleave(4) if scale == "group"
           else nanstd(torch.tensor(rewards)).expand(8))
    expected = torch.tensor(rewards) - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    np.testing.assert_allclose(advantages(rewards, 4, scale), torch.nan_to_num(expected, nan=0.0).numpy(), atol=1e-6)


def test_a_trl_reward_file_runs_unchanged(tiny):
    """The demo's reward file, given to TRL's own GRPOTrainer, scores as jaxft scores it."""
    folder, torch_model, tokenizer = tiny
    trainer = trl_trainer(torch_model, tokenizer)
    prompts = ["Q: Where does Mira live?\nA:"] * 4
    completions = [" Greywick", " Oakmere.", " a fox", " Redwater\nQ:"]
    theirs = trainer._calculate_rewards([{"prompt": p, "name": "Mira"} for p in prompts], prompts, completions,
                                        [[1]] * 4)
    ours = score(load_rewards([f"{REWARD}:northern_town"]), prompts, completions, [[1]] * 4,
                 [{"prompt": p, "name": "Mira"} for p in prompts])
    np.testing.assert_allclose(ours[:, 0], theirs[:, 0].numpy())
    np.testing.assert_allclose(ours[:, 0], [1.0, 0.2, 0.0, 1.0], rtol=1e-7)


def test_reward_errors_name_the_function(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def boom(prompts, completions, **kw):\n    raise KeyError('x')\n\n"
                    "def short(prompts, completions, **kw):\n    return [1.0]\n")
    functions = load_rewards([f"{path}:boom", f"{path}:short"])
    with pytest.raises(RewardError, match=r"reward function 'boom' raised KeyError: 'x' \(first prompt of the batch: 'Q: 1'\)"):
        score(functions[:1], ["Q: 1", "Q: 2"], ["a", "b"], [[1], [2]], [{}, {}])
    with pytest.raises(RewardError, match=r"reward function 'short' returned 1 values for 2 completions"):
        score(functions[1:], ["Q: 1", "Q: 2"], ["a", "b"], [[1], [2]], [{}, {}])
    with pytest.raises(ValueError, match=r"has no function 'nope'"):
        load_rewards([f"{path}:nope"])


def _rewards(workdir):
    return [r["reward"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "reward" in r]


def test_demo_learns_and_the_export_scores_higher(tmp_path):
    workdir = tmp_path / "grpo"
    summary = train.train(config_lib.load(GRPO_DEMO, [f"--config.workdir={workdir}", "--config.checkpoint.async_save=False"]))
    rewards = _rewards(workdir)
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    print(f"\n[grpo demo] mean reward of the first 10 steps {first:.3f}, of the last 10 {last:.3f}; "
          f"eval {summary['eval_before']['eval_reward']:.3f} -> {summary['eval']['eval_reward']:.3f}")
    assert last >= 2 * first and last > 0.8
    report = json.load(open(workdir / "report.json"))
    assert report["examples"]["before"] and report["examples"]["after"]

    export.export(str(workdir), str(tmp_path / "hf"), format="hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    prompts = [json.loads(line)["prompt"] for line in open(GRPO_TRAIN)][:32]
    means = {}
    for name, folder in (("export", tmp_path / "hf"), ("base", MODEL_DIR)):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.manual_seed(0)
        texts = []
        for prompt in prompts:  # sampled as the rollouts were: temperature 1, 8 new tokens
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        means[name] = float(np.mean(score(load_rewards([f"{REWARD}:northern_town"]), prompts, texts, [[0]] * 32,
                                          [{}] * 32)))
    print(f"[grpo demo] transformers samples: base reward {means['base']:.3f}, export {means['export']:.3f}")
    assert means["export"] > means["base"]


def test_resume_repeats_the_completions_and_losses(tmp_path):
    common = ["--config.train.schedule=constant", "--config.train.warmup_steps=0", "--config.checkpoint.async_save=False",
              "--config.train.eval_every=0", "--config.eval.at_start=False", "--config.grpo.num_iterations=2",
              "--config.grpo.beta=0.04", "--config.train.learning_rate=2e-3"]
    load = lambda name, *more: config_lib.load(f"{GRPO_DEMO}:smoke", [f"--config.workdir={tmp_path / name}", *common,  # noqa: E731
                                                                      *more])
    train.train(load("a", "--config.train.steps=5"))
    train.train(load("b", "--config.train.steps=3"))  # stops between a rollout's two updates
    resumed = train.train(load("b", "--config.train.steps=5"))
    assert resumed["resumed_from"] == 3
    rows = lambda name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]  # noqa: E731
    for a, b in zip(rows("a"), rows("b"), strict=True):
        for key in ("loss", "reward", "completions/mean_length", "kl"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for name in ("a", "b"):  # num_iterations=2: steps 1-2 and 3-4 train on one rollout each (b's 4 from its checkpoint)
        by_step = {r["step"]: r for r in rows(name)}
        for first in (1, 3):
            for key in ("reward", "completions/mean_length", "sampling/tokens_per_second"):
                assert by_step[first][key] == by_step[first + 1][key], (name, first, key)
        assert by_step[1]["reward"] != by_step[3]["reward"] or by_step[1]["completions/mean_length"] != \
            by_step[3]["completions/mean_length"]  # and a new rollout per group


def test_greedy_rollouts_on_a_data8_mesh_equal_one_device():
    from jaxft.tasks.grpo import TASK, rollout

    config = config_lib.load(f"{GRPO_DEMO}:smoke", ["--config.grpo.temperature=0.0"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    data = TASK.data(config, tokenizer)
    rows = np.arange(8)
    batches = {}
    for name, shape in (("one", {"data": 1}), ("data8", {"data": 8})):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:1] if name == "one" else None)
        training = run_lib.build_training(config, mesh, MODEL_DIR, tokenizer)
        with sharding.activate(mesh):
            model = training.model_def.merge(training.state.params, training.state.frozen)
            batches[name] = rollout(model, data, config, rows, seed=0)
    for key in ("input_ids", "loss_mask", "advantages"):
        np.testing.assert_array_equal(batches["one"][key], batches["data8"][key], err_msg=key)


def test_the_plan_counts_the_rollout_kv_cache():
    from jaxft import plan

    config = config_lib.load(GRPO_DEMO, ["--config.mesh.shape={'data': 1}"])
    result = plan.plan(config, compile=True, num_devices=1)
    # 4 layers × keys and values × 32 completions × 32 tokens × 2 kv heads × head_dim 32 × float32
    assert result.estimate.get("rollout KV cache") == 4 * 2 * 32 * 32 * 2 * 32 * 4
    ratio = (result.estimate.total - result.estimate.get("rollout KV cache")) / result.compiled["peak"]
    print(f"\n[plan, grpo demo] step estimate / compiled = {ratio:.2f}")
    assert 0.8 < ratio < 1.2, result.table()
