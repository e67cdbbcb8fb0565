"""`task = "grpo"`: online RL with verifiable rewards (GRPO, DeepSeekMath), rollouts on the training mesh.

    jaxft train --config configs/grpo_demo.py            # the bundled model learns to answer with a town

Each step: the data's next `train.batch_size / grpo.num_generations` prompts, `num_generations`
completions each sampled from the params being trained — the same arrays on the same mesh, no
second copy, no weight sync (jaxft.generate, KV cache, keys from the run seed and the step, so a
resumed run samples the same) — scored by the reward functions, turned into group-relative
advantages, then one clipped policy-gradient update (`grpo.num_iterations` > 1: that many updates on
one rollout, as TRL's steps; the rollout rides in the data state, so a resume between them repeats
it). Formulas as trl 1.16.0's trl/trainer/grpo_trainer.py (`_generate_and_score_completions`:
rewards, advantages; `_compute_loss`: ratio, clipping, k3 KL, the loss types; tests/tasks/test_grpo.py
runs TRL's own `_compute_loss`):
    advantage  A = r − mean_group(r), / (std(r) + 1e-4) with scale_rewards group (per group) | batch
               (all completions) | none; std with Bessel's correction
    per token  −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·(e^{ref − π} − (ref − π) − 1),
               ρ = e^{π − π_old}: π_old = π at the rollout (so ρ = 1 and only its gradient remains
               when num_iterations = 1); π = log-probs of logits / grpo.temperature, the sampled distribution;
               the KL term × ρ with grpo.use_bias_correction_kl (TRL's default: the unbiased gradient)
    loss_type  grpo: mean over completions of each one's token mean; bnpo, dapo: token mean over the
               batch; dr_grpo: token sum / (completions × grpo.max_new_tokens)
The reference (β > 0): the base with adapters off (LoRA), a frozen copy (full fine-tuning).

Rewards: grpo.rewards = ["path/to/file.py:function" or "package.module:function", ...], called as
TRL calls one — keyword arguments prompts, completions (strings; for conversational rows lists of
{"role": "assistant", "content": ...}), completion_ids, and every other row field as a list — and
returning one float (or None: not applicable) per completion; grpo.reward_weights weigh them.
Metrics, TRL's names: reward, reward_std, rewards/<function>/mean and /std, completions/mean_length,
completions/clipped_ratio, kl, entropy, clip_ratio/region_mean (and /low_mean, /high_mean).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.losses import forward, token_log_probs
from jaxft.models import layers
from jaxft.tasks.base import Task, frozen_copy, need
from jaxft.rewards import load_rewards, score

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SEQUENCE_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions")


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """The GRPO Objective (see jaxft.step.Objective) on a rollout batch: sequences [B, L] (prompt +
    completion, right-padded; loss_mask marks the completion's targets), advantages [B], optional
    old_logps [B, L] and ref-free host statistics in `stat/*` columns (their row mean is logged)."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    max_completion_length: int = 16
    reference: str = "none"  # none | adapters_off | copy
    temperature: float = 1.0  # the sampling temperature: log-probs of logits / T, the distribution sampled
    kl_bias_correction: bool = True  # KL × ρ: the unbiased reverse-KL gradient (TRL's use_bias_correction_kl)

    def normalizer(self, batch):
        mask = batch["loss_mask"].astype(jnp.float32)
        return {"sequences": jnp.asarray(mask.shape[0], jnp.float32), "tokens": mask.sum()}

    def per_token(self, model, batch):
        """(log-probs [B, L], entropies [B, L]) of the targets under `model` (float32)."""
        logits = forward(model, {k: batch[k] for k in SEQUENCE_KEYS if k != "targets"}).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits / (self.temperature or 1.0), axis=-1)
        entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
        return jnp.take_along_axis(log_probs, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0], entropy

    def loss(self, model, batch, normalizer):
        logps, entropy = self.per_token(model, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        advantages = batch["advantages"][:, None]
        ratio = jnp.exp(logps - old)
        clipped = jnp.clip(ratio, 1 - self.epsilon, 1 + self.epsilon_high)
        per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
        metrics = {}
        tokens, sequences = normalizer["tokens"], normalizer["sequences"]
        if self.beta:
            scale = 1.0 / (self.temperature or 1.0)
            if self.reference == "copy":
                reference = token_log_probs(forward(model.reference, batch) * scale, batch["targets"])
            else:
                with layers.adapters_disabled():
                    reference = token_log_probs(forward(model, batch) * scale, batch["targets"])
            reference = jax.lax.stop_gradient(reference)
            kl = jnp.exp(reference - logps) - (reference - logps) - 1
            if self.kl_bias_correction:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
            metrics["kl"] = (kl * mask).sum() / tokens
        if self.loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum() / sequences
        elif self.loss_type == "dr_grpo":
            loss = (per_token * mask).sum() / (sequences * self.max_completion_length)
        else:  # bnpo, dapo: over every completion token of the batch
            loss = (per_token * mask).sum() / tokens
        low = (ratio < 1 - self.epsilon) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        token_mean = lambda x: (x.astype(jnp.float32) * mask).sum() / tokens  # noqa: E731
        metrics.update({"entropy": token_mean(entropy), "clip_ratio/low_mean": token_mean(low),
                        "clip_ratio/high_mean": token_mean(high), "clip_ratio/region_mean": token_mean(low | high)})
        for key in batch:
            if key.startswith("stat/"):  # host statistics of the rollout, one value repeated per row
                metrics[key[5:]] = batch[key].astype(jnp.float32).sum() / sequences
        return loss, {"loss": loss, **metrics}


def advantages(rewards: np.ndarray, num_generations: int, scale: str) -> np.ndarray:
    """Group-relative advantages of rewards [B] (NaN: unscorable, advantage 0), as TRL computes them."""
    groups = rewards.reshape(-1, num_generations)
    with np.errstate(invalid="ignore"):
        mean = np.repeat(np.nanmean(groups, axis=1), num_generations)
        if scale == "batch":
            std = np.full_like(rewards, _nanstd(rewards))
        else:
            std = np.repeat(np.array([_nanstd(g) for g in groups]), num_generations)
        out = rewards - mean
        if scale != "none":
            out = out / (std + 1e-4)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def _nanstd(values: np.ndarray) -> float:
    """TRL's nanstd: Bessel-corrected, ignoring NaNs; NaN for fewer than 2 values."""
    values = values[~np.isnan(values)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


class GRPO(Task):
    name = "grpo"
    section = "grpo"
    resume_keys = ("grpo.rewards", "grpo.reward_weights", "grpo.num_generations", "grpo.max_new_tokens",
                   "grpo.temperature", "grpo.top_p", "grpo.top_k", "grpo.loss_type", "grpo.beta", "grpo.epsilon",
                   "grpo.epsilon_high", "grpo.num_iterations", "grpo.scale_rewards", "grpo.max_prompt_length",
                   "grpo.use_bias_correction_kl", "grpo.mask_truncated_completions")

    def validate(self, config) -> None:
        g = config.grpo
        need(bool(g.rewards), "task=grpo needs grpo.rewards: 'file.py:function' or 'package.module:function' entries")
        need(not g.reward_weights or len(g.reward_weights) == len(g.rewards),
             f"grpo.reward_weights has {len(g.reward_weights)} weights for {len(g.rewards)} reward functions")
        need(g.num_generations >= 2, f"grpo.num_generations must be >= 2 (advantages compare completions of a "
                                     f"prompt), got {g.num_generations}")
        need(config.train.batch_size % g.num_generations == 0,
             f"train.batch_size={config.train.batch_size} (completions per step) is not divisible by "
             f"grpo.num_generations={g.num_generations}")
        need(g.loss_type in LOSS_TYPES, f"grpo.loss_type {g.loss_type!r} is not one of {LOSS_TYPES}")
        need(g.scale_rewards in ("group", "batch", "none"),
             f"grpo.scale_rewards {g.scale_rewards!r} must be group, batch or none")
        need(g.max_new_tokens >= 1 and g.max_prompt_length >= 1, "grpo.max_new_tokens and grpo.max_prompt_length must be >= 1")
        need(g.num_iterations >= 1, f"grpo.num_iterations must be >= 1, got {g.num_iterations}")
        need(g.beta >= 0 and g.epsilon > 0, f"grpo.beta must be >= 0 and grpo.epsilon > 0, got {g.beta}, {g.epsilon}")
        need(config.data.seq_len == g.max_prompt_length + g.max_new_tokens,
             f"data.seq_len={config.data.seq_len} must be grpo.max_prompt_length + grpo.max_new_tokens = "
             f"{g.max_prompt_length + g.max_new_tokens} (a rollout row holds both)")
        need(not config.train.loss_chunk and not config.train.z_loss,
             "train.loss_chunk / train.z_loss are for the language-model loss; task=grpo has its own")
        need(not config.eval.task_file, "eval.task_file does not apply to task=grpo: its eval rows score the rewards")
        load_rewards(g.rewards)  # every function importable, before anything loads

    def attach(self, model, config, *, training: bool, mesh=None, abstract: bool = False):
        if training and config.grpo.beta and not config.lora.rank:
            return frozen_copy(model)  # full fine-tuning: the reference is the initial model, frozen
        return model

    def trainable(self, predicate):
        return lambda path, variable: not path.startswith("reference.") and predicate(path, variable)

    def data(self, config, tokenizer):
        from jaxft.data.prompts import PromptData

        g = config.grpo
        data = PromptData(config, tokenizer, max_prompt_length=g.max_prompt_length,
                          prompts_per_step=config.train.batch_size // g.num_generations, repeats=g.num_iterations)
        data.reward_functions = load_rewards(g.rewards)  # imported once per run
        return data

    def batch_spec(self, config, rows: int) -> dict:
        shape = (rows, config.data.seq_len)
        spec = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in SEQUENCE_KEYS}
        spec["advantages"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
        if config.grpo.num_iterations > 1:
            spec["old_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        return spec

    def extra_memory(self, config, hf_config: dict, sizes: dict[str, int]) -> list[tuple[str, int, str]]:
        """The rollout's KV cache: keys and values of every layer for the step's completions (prompt +
        max_new_tokens each), in the compute dtype, split over the data-parallel devices."""
        from jaxft.models import registry

        g = config.grpo
        model_config = registry.family_for(hf_config).config_cls.from_hf(hf_config)  # its head_dim default, per family
        heads, head_dim = model_config.num_key_value_heads, model_config.head_dim
        itemsize = jnp.dtype(config.model.compute_dtype or config.model.dtype).itemsize
        completions = max(config.train.batch_size // (sizes["data"] * sizes["fsdp"]), 1)
        length = g.max_prompt_length + g.max_new_tokens
        tensor = sizes["tensor"] if heads % sizes["tensor"] == 0 else 1
        cache = 2 * model_config.num_hidden_layers * completions * length * heads * head_dim * itemsize // tensor
        return [("rollout KV cache", cache, f"{completions} completions × {length} tokens")]

    def objective(self, config) -> GRPOLoss:
        g = config.grpo
        reference = "none" if not g.beta else "adapters_off" if config.lora.rank else "copy"
        return GRPOLoss(loss_type=g.loss_type, epsilon=g.epsilon,
                        epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, beta=g.beta,
                        max_completion_length=g.max_new_tokens, reference=reference, temperature=g.temperature,
                        kl_bias_correction=g.use_bias_correction_kl)

    def step_batch(self, training, data, state, batch, step: int):
        """The rollout: sample, score, advantages; with num_iterations > 1 the first step of each
        rollout makes it and the next ones reuse it (it rides in the data iterator's state)."""
        config, iterator = training.config, data.iterator
        if batch["repeat"] and iterator.payload is not None:
            return {k: np.asarray(v, np.float32 if k in ("advantages", "old_logps", "loss_mask") or k.startswith("stat/")
                                  else np.int32) for k, v in iterator.payload.items()}
        if jax.process_count() > 1:
            raise NotImplementedError("task=grpo samples on one process for now (each host its own prompts: not yet)")
        model = training.model_def.merge(state.params, state.frozen)
        out = rollout(model, data, config, batch["rows"], seed=_seed(config.train.seed, step))
        if config.grpo.num_iterations > 1:
            out["old_logps"] = np.asarray(_old_logps(training.objective, training.model_def)(
                state.params, state.frozen, {k: jnp.asarray(out[k]) for k in SEQUENCE_KEYS}))
            iterator.attach({k: v.tolist() for k, v in out.items()})
        return out

    def eval_step(self, model_def, mesh, config):
        return _Generator(model_def, config)

    def evaluate(self, eval_step, params, frozen, data, mesh) -> dict | None:
        """The mean reward of greedy completions of the validation prompts (eval_loss: its negative)."""
        if data.validation is None:
            return None
        model = eval_step.model_def.merge(params, frozen)
        rows = np.arange(len(data.validation["rows"]))
        rewards = sample_and_score(model, data, eval_step.config, rows, "validation", greedy=True)[1]
        reward = float(np.nanmean(rewards))
        return {"eval_loss": -reward, "eval_reward": reward}

    def examples(self, eval_step, params, frozen, data, mesh, count: int) -> list[dict]:
        split = "validation" if data.validation is not None else "train"
        pairs = data.validation if split == "validation" else data.train
        rows = np.arange(min(count, len(pairs["rows"])))
        model = eval_step.model_def.merge(params, frozen)
        texts, rewards, prompts = sample_and_score(model, data, eval_step.config, rows, split, greedy=True)[:3]
        return [{"prompt": str(p)[:300], "completion": t[:300], "reward": float(r)}
                for p, t, r in zip(prompts, texts, rewards)]


@dataclasses.dataclass
class _Generator:
    """GRPO's "eval step": what evaluate needs to sample (no jitted function of its own)."""

    model_def: Any
    config: Any


def _seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([seed, step, 0x6E50]).integers(2**31))


def _old_logps(objective: GRPOLoss, model_def):
    return jax.jit(lambda params, frozen, batch: objective.per_token(model_def.merge(params, frozen), batch)[0])


def sample_and_score(model, data, config, rows, split: str, greedy: bool, seed: int = 0, generations: int = 1):
    """(completion texts, rewards [N], prompts, completion ids, prompt ids, rewards per function [N, F])
    of `generations` completions per prompt row."""
    from jaxft.generate import generate

    g = config.grpo
    pairs = data.train if split == "train" else data.validation
    prompt_ids = [pairs["prompt_ids"][r] for r in rows for _ in range(generations)]
    started = time.perf_counter()
    completions = generate(model, prompt_ids, g.max_new_tokens, eos_id=_eos(data), pad_id=_pad(data),
                           temperature=0.0 if greedy else g.temperature, top_k=g.top_k, top_p=g.top_p, seed=seed)
    data.timings = {"sampling_seconds": time.perf_counter() - started}
    started = time.perf_counter()
    reward_rows = [pairs["rows"][r] for r in rows for _ in range(generations)]
    prompts = [row[data.prompt_field] for row in reward_rows]
    texts = [data.tokenizer.hf.decode(c, skip_special_tokens=True) for c in completions]
    shown = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
    per_function = score(data.reward_functions, prompts, shown, completions, reward_rows, data.prompt_field)
    weights = np.asarray(g.reward_weights or [1.0] * len(g.rewards), np.float32)
    rewards = np.nansum(per_function * weights, axis=1)
    rewards[np.isnan(per_function).all(axis=1)] = np.nan  # every function said "not applicable"
    data.timings["reward_seconds"] = time.perf_counter() - started
    return texts, rewards, prompts, completions, prompt_ids, per_function


def rollout(model, data, config, rows, seed: int) -> dict[str, np.ndarray]:
    """The training batch of one GRPO step: num_generations sampled completions per prompt row, as
    prompt + completion rows with the completion's targets trained, their advantages and the
    rollout's statistics (as `stat/*` columns)."""
    g = config.grpo
    texts, rewards, _, completions, prompt_ids, per_function = sample_and_score(
        model, data, config, rows, "train", greedy=g.temperature == 0.0, seed=seed, generations=g.num_generations)
    length = config.data.seq_len
    batch = {k: np.zeros((len(completions), length), np.float32 if k == "loss_mask" else np.int32) for k in SEQUENCE_KEYS}
    batch["input_ids"][:] = _pad(data)
    eos = _eos(data)
    truncated = np.array([not completion or completion[-1] != eos for completion in completions])
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        tokens = (prompt + completion)[:length + 1]
        n = len(tokens) - 1
        batch["input_ids"][i, :n], batch["targets"][i, :n] = tokens[:-1], tokens[1:]
        batch["attention_mask"][i, :n] = 1
        batch["positions"][i, :n] = np.arange(n)
        if not (g.mask_truncated_completions and truncated[i]):
            batch["loss_mask"][i, len(prompt) - 1:n] = 1.0  # the targets that are sampled tokens
    batch["advantages"] = advantages(rewards, g.num_generations, g.scale_rewards)
    groups = rewards.reshape(-1, g.num_generations)
    stats = {"reward": np.nanmean(rewards), "reward_std": _nanstd(rewards),
             "frac_reward_zero_std": np.mean([np.isclose(_nanstd(x), 0.0) for x in groups]),
             "completions/mean_length": np.mean([len(c) for c in completions]),
             "completions/clipped_ratio": np.mean(truncated), **data.timings,
             "sampling/tokens_per_second": sum(len(c) for c in completions) / max(data.timings["sampling_seconds"], 1e-9)}
    for name, column in zip((n for n, _ in data.reward_functions), per_function.T):
        stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = np.nanmean(column), _nanstd(column)
    for key, value in stats.items():
        batch[f"stat/{key}"] = np.full(len(completions), np.nan_to_num(value), np.float32)
    return batch


def _eos(data) -> int:
    return -1 if data.tokenizer.eos_id is None else data.tokenizer.eos_id


def _pad(data) -> int:
    return data.tokenizer.hf.pad_token_id or 0


TASK = GRPO()
