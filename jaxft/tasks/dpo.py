"""`task = "dpo"`: preference tuning, DPO and its relatives, on {prompt, chosen, rejected} pairs.

    jaxft train --config configs/dpo_demo.py            # LoRA DPO on the bundled model: reward accuracy 0.5 → 1.0
    jaxft train --config configs/dpo_demo.py --config.dpo.loss_type=ipo

Losses (dpo.loss_type), with π = a completion's log-prob summed over its tokens under the policy,
ρ = the same under the reference, Δ = (π_c − ρ_c) − (π_r − ρ_r), β = dpo.beta, ε = dpo.label_smoothing:
  sigmoid   −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)                 DPO; ε > 0 is conservative DPO (cDPO)
  ipo       ((Δ_c/n_c − Δ_r/n_r) − 1/(2β))², n = completion tokens   (per-token, as TRL confirmed with the authors)
  hinge     max(0, 1 − βΔ)                                     SLiC
  simpo     −(1 − ε)·log σ(β(π̄_c − π̄_r) − γ) − ε·log σ(−…), π̄ = π/n   no reference (γ = dpo.simpo_gamma)
  orpo      NLL of the chosen sequences − β·log σ(log odds(π̄_c) − log odds(π̄_r))   no reference
The formulas are checked against trl 1.16.0: trl/trainer/dpo_trainer.py (`DPOTrainer._compute_loss`:
sigmoid, hinge, ipo and the reward metrics), trl/experimental/cpo/cpo_trainer.py (`cpo_loss`,
loss_type="simpo" with cpo_alpha=0) and trl/experimental/orpo/orpo_trainer.py (`odds_ratio_loss`,
and the chosen NLL over prompt and completion of `concatenated_forward`); tests/tasks/test_dpo.py
runs them. TRL's sigmoid has no label smoothing any more: cDPO is tested against its formula.

The reference: with adapters (LoRA/DoRA/QLoRA) the base with its adapters switched off — the same
arrays, traced inside layers.adapters_disabled(), no second copy; with full fine-tuning a frozen
copy of the initial model sharded like the params (attached as `reference`), or with
dpo.precompute_reference its log-probs computed once before training and kept in the workdir
(reference_logps.npz, reused on resume). simpo and orpo have none. The chosen and rejected
completions of a pair run through the model in one batch ([B, 2, T] → [2B, T]), so a step is one
policy forward/backward plus one reference forward.

Metrics, with TRL's names: rewards/chosen, rewards/rejected (β(π − ρ); simpo/orpo: βπ̄),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (simpo/orpo: π̄), and for orpo
nll_loss, log_odds_ratio, log_odds_chosen; eval rows carry them with the eval_ prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import sharding
from jaxft.data.preference import PreferenceData
from jaxft.losses import masked_log_prob_sums
from jaxft.models import layers
from jaxft.tasks.base import Task, frozen_copy, need

log = logging.getLogger("jaxft.tasks.dpo")

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
PER_TOKEN = ("simpo", "orpo")  # their log-probs are averaged over the completion's tokens
PAIR_KEYS = ("input_ids", "targets", "loss_mask", "sequence_mask", "attention_mask")
REFERENCE_FILE = "reference_logps.npz"


def pair_losses(loss_type: str, beta: float, policy, reference, counts, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per pair: (loss [B], {metric: [B]}). policy / reference: completion log-probs [B, 2] summed
    over their tokens (pair axis: chosen, rejected); counts: the completions' token counts [B, 2]."""
    eps = label_smoothing
    if loss_type in PER_TOKEN:
        average = policy / jnp.maximum(counts, 1.0)
        chosen, rejected = average[:, 0], average[:, 1]
        rewards = beta * average
        metrics = {"logps/chosen": chosen, "logps/rejected": rejected}
        if loss_type == "simpo":
            logits = chosen - rejected - simpo_gamma / beta
            loss = -(1 - eps) * jax.nn.log_sigmoid(beta * logits) - eps * jax.nn.log_sigmoid(-beta * logits)
        else:  # orpo: log odds = log p − log(1 − p), of the per-token probability
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            ratio = jax.nn.log_sigmoid(log_odds)
            loss = -beta * ratio
            metrics.update({"log_odds_ratio": ratio, "log_odds_chosen": log_odds})
    else:
        logratios = policy - reference  # [B, 2]
        delta = logratios[:, 0] - logratios[:, 1]
        rewards = beta * logratios
        metrics = {"logps/chosen": policy[:, 0], "logps/rejected": policy[:, 1]}
        if loss_type == "sigmoid":
            loss = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
        elif loss_type == "hinge":
            loss = jax.nn.relu(1 - beta * delta)
        elif loss_type == "ipo":
            per_token = logratios / jnp.maximum(counts, 1.0)
            loss = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"loss type {loss_type!r} is not one of {LOSS_TYPES}")
    metrics.update({"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
                    "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
                    "rewards/margins": rewards[:, 0] - rewards[:, 1]})
    return loss, metrics


def _log1mexp(x):
    """log(1 − eˣ) for x < 0, stable on both sides of −ln 2."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """The DPO-family Objective (see jaxft.step.Objective): per-pair losses averaged over the pairs
    of the whole batch (weight-0 pairs, the padding of an eval batch, count for nothing); orpo adds
    the chosen sequences' NLL averaged over their tokens, as TRL does."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = "adapters_off"  # adapters_off | copy | precomputed | none
    chunk: int = 0  # > 0: log-probs over sequence chunks (train.loss_chunk)

    def normalizer(self, batch):
        pairs = batch["weight"].sum()
        if self.loss_type != "orpo":
            return pairs
        return {"pairs": pairs, "chosen_tokens": (batch["sequence_mask"][:, 0] * batch["weight"][:, None]).sum()}

    def log_probs(self, model, batch):
        """(policy [B, 2], reference [B, 2] or None, chosen sequence log-prob [B] or None): one
        forward of the 2B sequences, and one of the reference."""
        flat = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in PAIR_KEYS}
        masks = (flat["loss_mask"], flat["sequence_mask"]) if self.loss_type == "orpo" else (flat["loss_mask"],)
        sums = masked_log_prob_sums(model, flat, masks, self.chunk)
        policy = sums[0].reshape(-1, 2)
        sequence = sums[1].reshape(-1, 2)[:, 0] if self.loss_type == "orpo" else None
        reference = None
        if self.reference == "precomputed":
            reference = batch["ref_logps"]
        elif self.reference == "adapters_off":
            with layers.adapters_disabled():
                reference = masked_log_prob_sums(model, flat, masks[:1], self.chunk)[0].reshape(-1, 2)
        elif self.reference == "copy":
            reference = masked_log_prob_sums(model.reference, flat, masks[:1], self.chunk)[0].reshape(-1, 2)
        if reference is not None:
            reference = jax.lax.stop_gradient(reference)
        return policy, reference, sequence

    def terms(self, model, batch) -> dict[str, jax.Array]:
        """Weighted sums over the batch's pairs: "pair_loss", each metric, and (orpo) "nll", the
        chosen sequences' summed negative log-likelihood."""
        return self.terms_of(batch, *self.log_probs(model, batch))

    def terms_of(self, batch, policy, reference, sequence) -> dict[str, jax.Array]:
        weight = batch["weight"]
        counts = batch["loss_mask"].astype(jnp.float32).sum(-1)
        loss, metrics = pair_losses(self.loss_type, self.beta, policy, reference, counts, self.label_smoothing,
                                    self.simpo_gamma)
        out = {"pair_loss": (weight * loss).sum(), **{k: (weight * v).sum() for k, v in metrics.items()}}
        if sequence is not None:
            out["nll"] = -(weight * sequence).sum()
        return out

    def combine(self, terms: dict, normalizer) -> tuple[jax.Array, dict]:
        """(loss, metrics) from summed terms and the normalizer of the pairs they cover."""
        pairs = normalizer["pairs"] if isinstance(normalizer, dict) else normalizer
        metrics = {k: v / pairs for k, v in terms.items() if k not in ("pair_loss", "nll")}
        loss = terms["pair_loss"] / pairs
        if "nll" in terms:
            metrics["nll_loss"] = terms["nll"] / normalizer["chosen_tokens"]
            loss = loss + metrics["nll_loss"]
        return loss, {"loss": loss, **metrics}

    def loss(self, model, batch, normalizer):
        return self.combine(self.terms(model, batch), normalizer)


def reference_mode(config) -> str:
    """Where a run's reference log-probs come from (see the module docstring)."""
    if config.dpo.loss_type in REFERENCE_FREE:
        return "none"
    if config.dpo.precompute_reference:
        return "precomputed"
    return "adapters_off" if config.lora.rank else "copy"


class DPO(Task):
    name = "dpo"
    section = "dpo"
    resume_keys = ("data.format", "dpo.loss_type", "dpo.beta", "dpo.label_smoothing", "dpo.simpo_gamma",
                   "dpo.max_prompt_length", "dpo.precompute_reference")

    def validate(self, config) -> None:
        d = config.dpo
        need(d.loss_type in LOSS_TYPES, f"dpo.loss_type {d.loss_type!r} is not one of {LOSS_TYPES}")
        need(d.beta > 0, f"dpo.beta must be > 0, got {d.beta}")
        need(0.0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        need(d.label_smoothing == 0 or d.loss_type in ("sigmoid", "simpo"),
             f"dpo.label_smoothing applies to loss_type sigmoid and simpo, not {d.loss_type!r}")
        need(d.max_prompt_length >= 0, f"dpo.max_prompt_length must be >= 0, got {d.max_prompt_length}")
        need(not (d.precompute_reference and d.loss_type in REFERENCE_FREE),
             f"dpo.precompute_reference: loss_type {d.loss_type!r} has no reference to precompute")
        validate_preference_data(config, "dpo")
        chunk, seq = config.train.loss_chunk, config.data.seq_len
        need(not chunk or seq % chunk == 0, f"train.loss_chunk={chunk} does not divide data.seq_len={seq}")
        need(not config.train.z_loss, "train.z_loss is a term of the language-model loss; task=dpo has its own loss")

    def attach(self, model, config, *, training: bool, mesh=None, abstract: bool = False):
        if training and reference_mode(config) == "copy":
            return frozen_copy(model)  # full fine-tuning: the initial model, frozen
        return model

    def trainable(self, predicate):
        return lambda path, variable: not path.startswith("reference.") and predicate(path, variable)

    def data(self, config, tokenizer) -> PreferenceData:
        return PreferenceData(config, tokenizer, causal=True, max_prompt_length=config.dpo.max_prompt_length)

    def batch_spec(self, config, rows: int) -> dict:
        shape = (rows, 2, config.data.seq_len)
        spec = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k.endswith("mask") and k != "attention_mask"
                                        else jnp.int32) for k in PAIR_KEYS}
        spec["weight"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
        if reference_mode(config) == "precomputed":
            spec["ref_logps"] = jax.ShapeDtypeStruct((rows, 2), jnp.float32)
        return spec

    def num_tokens(self, batch) -> int:
        return int(np.sum(batch["attention_mask"]))

    def objective(self, config) -> PreferenceLoss:
        d = config.dpo
        return PreferenceLoss(loss_type=d.loss_type, beta=d.beta, label_smoothing=d.label_smoothing,
                              simpo_gamma=d.simpo_gamma, reference=reference_mode(config), chunk=config.train.loss_chunk)

    def before_training(self, training, data: PreferenceData, mesh, workdir: str) -> None:
        if training.objective.reference == "precomputed":
            data.reference = precomputed_reference(training, data, mesh, workdir)

    def eval_step(self, model_def, mesh, config):
        """(params, frozen, batch) → {"terms": summed loss terms and metrics, "normalizer": the
        batch's pair (and orpo: token) counts, "policy": the policy's log-probs [B, 2]}, replicated."""
        objective = self.objective(config)

        def step(params, frozen, batch):
            policy, reference, sequence = objective.log_probs(model_def.merge(params, frozen), batch)
            return {"terms": objective.terms_of(batch, policy, reference, sequence),
                    "normalizer": objective.normalizer(batch), "policy": policy}

        return jax.jit(step, out_shardings=sharding.replicated(mesh))

    def evaluate(self, eval_step, params, frozen, data: PreferenceData, mesh) -> dict | None:
        if data.validation is None:
            return None
        terms = normalizer = None
        for batch in data.eval_batches():
            out = jax.device_get(eval_step(params, frozen, sharding.global_batch(batch, mesh)))
            terms = out["terms"] if terms is None else jax.tree.map(np.add, terms, out["terms"])
            normalizer = out["normalizer"] if normalizer is None else jax.tree.map(np.add, normalizer, out["normalizer"])
        _, metrics = PreferenceLoss(loss_type="orpo" if "nll" in terms else "sigmoid").combine(terms, normalizer)
        return {("eval_loss" if k == "loss" else f"eval_{k}"): float(v) for k, v in metrics.items()}

    def examples(self, eval_step, params, frozen, data: PreferenceData, mesh, count: int) -> list[dict]:
        """The first validation pairs with the policy's log-prob margin log p(chosen) − log p(rejected)."""
        if data.validation is None or not count:
            return []
        batch = next(data.eval_batches())
        policy = np.asarray(jax.device_get(eval_step(params, frozen, sharding.global_batch(batch, mesh))["policy"]))
        rows = range(min(count, len(data.validation["tokens"]), len(policy)))
        return [{"prompt": p, "chosen": c, "rejected": r, "logp_margin": float(policy[i, 0] - policy[i, 1])}
                for i, (p, c, r) in zip(rows, data.texts("validation", rows))]


def validate_preference_data(config, task: str) -> None:
    """The data rules task=dpo and task=reward share (pairs are padded one per row: data.packing
    does not apply)."""
    need(config.data.format == "preference",
         f"task={task} trains on preference pairs: set data.format='preference' (rows {{prompt, chosen, rejected}})")
    need(bool(config.data.train), f"task={task} needs data.train (preference rows)")
    need(not config.eval.task_file or task == "dpo",
         f"eval.task_file (exact match of generated answers) does not apply to task={task}: it does not generate")


def precomputed_reference(training, data: PreferenceData, mesh, workdir: str) -> dict[str, np.ndarray]:
    """{split: [N, 2] reference log-probs} of every pair, computed once with the run's initial model
    (adapters off) and kept in WORKDIR/reference_logps.npz; a later run of the same workdir (a
    resume) reads them back if the pairs and the base are the same."""
    path = os.path.join(workdir, REFERENCE_FILE)
    key = hashlib.sha256(json.dumps(data.fingerprint, sort_keys=True).encode()
                         + str(sorted(training.state.frozen)).encode()).hexdigest()[:16]
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) == key:
                log.info("reference log-probs: read %s", path)
                return {split: saved[split] for split in saved.files if split != "key"}
        log.warning("%s was made for other pairs or another model: computing them again", path)
    objective = dataclasses.replace(training.objective, reference="none")
    model_def = training.model_def

    def reference(params, frozen, batch):
        with layers.adapters_disabled():
            policy, _, _ = objective.log_probs(model_def.merge(params, frozen), batch)
        return policy

    reference = jax.jit(reference, out_shardings=sharding.replicated(mesh))
    tables = {}
    with sharding.activate(mesh):
        for split in ("train", "validation") if data.validation is not None else ("train",):
            count = len((data.train if split == "train" else data.validation)["tokens"])
            parts = [jax.device_get(reference(training.state.params, training.state.frozen,
                                              sharding.global_batch(batch, mesh))) for batch in data.eval_batches(split)]
            tables[split] = np.concatenate(parts)[:count].astype(np.float32)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        np.savez(path + ".tmp.npz", key=np.asarray(key), **tables)
        os.replace(path + ".tmp.npz", path)  # whole or absent: a kill mid-write leaves no half file
    log.info("reference log-probs: computed for %s pairs", {s: len(t) for s, t in tables.items()})
    return tables


TASK = DPO()
