"""`task = "reward"`: a reward model, the scalar head of a sequence classifier trained on preference pairs.

    jaxft train --config configs/reward_demo.py                  # held-out pair accuracy 0.5 → 1.0
    jaxft export --workdir workdir/reward_demo --out rm --format hf     # LlamaForSequenceClassification, num_labels=1

The model is jaxft.models.classification.SequenceClassifier with one output (HF's
*ForSequenceClassification with num_labels=1, as TRL's RewardTrainer makes): the reward of a
sequence is the head's value at its last non-pad token. The data are data.format="preference"
pairs, each completion scored with its prompt (prompt + completion, as TRL joins them). The loss is
Bradley-Terry, as trl 1.16.0's trl/trainer/reward_trainer.py (`RewardTrainer.compute_loss`):
    −log σ(r_chosen − r_rejected − margin)      (margin: data.margin_field, else 0)
    + reward.center_rewards_coefficient · mean((r_chosen + r_rejected)²)
averaged over the pairs of the batch. Metrics: accuracy (r_chosen > r_rejected), margin
(r_chosen − r_rejected) and mean_reward; eval rows: eval_loss, accuracy, margin, mean_reward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import sharding
from jaxft.data.preference import PreferenceData
from jaxft.tasks.base import ExportInfo, Task, need
from jaxft.tasks.classification import HEAD, lora_targets, with_head
from jaxft.tasks.dpo import validate_preference_data

LABEL = "LABEL_0"  # the one output's name, as transformers names it for num_labels=1


@dataclasses.dataclass(frozen=True)
class BradleyTerry:
    """The reward-model Objective (see jaxft.step.Objective)."""

    center_rewards_coefficient: float = 0.0

    def normalizer(self, batch):
        return batch["weight"].sum()

    def rewards(self, model, batch):
        """[B, 2] rewards of the pairs' chosen and rejected sequences, one forward of the 2B rows."""
        ids, mask = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "attention_mask"))
        return model.classify(ids, attention_mask=mask).astype(jnp.float32)[:, 0].reshape(-1, 2)

    def terms_of(self, batch, rewards) -> dict[str, jax.Array]:
        weight = batch["weight"]
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        loss = -jax.nn.log_sigmoid(chosen - rejected - batch.get("margin", 0.0))
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * (chosen + rejected) ** 2
        per_pair = {"pair_loss": loss, "accuracy": (chosen > rejected).astype(jnp.float32), "margin": chosen - rejected,
                    "mean_reward": (chosen + rejected) / 2}
        return {k: (weight * v).sum() for k, v in per_pair.items()}

    def loss(self, model, batch, normalizer):
        terms = self.terms_of(batch, self.rewards(model, batch))
        loss = terms.pop("pair_loss") / normalizer
        return loss, {"loss": loss, **{k: v / normalizer for k, v in terms.items()}}


class Reward(Task):
    name = "reward"
    section = "reward"
    resume_keys = ("data.format", "reward.center_rewards_coefficient", "reward.max_prompt_length")

    def validate(self, config) -> None:
        r = config.reward
        need(r.center_rewards_coefficient >= 0,
             f"reward.center_rewards_coefficient must be >= 0, got {r.center_rewards_coefficient}")
        need(r.max_prompt_length >= 0, f"reward.max_prompt_length must be >= 0, got {r.max_prompt_length}")
        validate_preference_data(config, "reward")
        for key in ("z_loss", "loss_chunk"):
            need(not config.train[key], f"train.{key}={config.train[key]} is a term of the language-model loss; "
                                        "task=reward has its own loss over the head's scores (set it to 0)")

    def model_options(self, config, pad_token_id):
        # The reward is read at the last token that is not padding: the tokenizer's pad id.
        return {"labels": (LABEL,), "pad_token_id": pad_token_id}

    def lora_targets(self, model, targets):
        return lora_targets(model) if targets == "all-linear" else targets

    def trainable(self, predicate):
        return with_head(predicate)  # the new head trains whole (PEFT's modules_to_save)

    def data(self, config, tokenizer) -> PreferenceData:
        if tokenizer.pad_token_id is None:
            from jaxft.data.errors import DataError

            raise DataError("the tokenizer has no pad token; a reward model scores the last non-pad token, so it "
                            "needs one (add a pad token to the tokenizer files)")
        return PreferenceData(config, tokenizer, causal=False, max_prompt_length=config.reward.max_prompt_length)

    def batch_spec(self, config, rows: int) -> dict:
        shape = (rows, 2, config.data.seq_len)
        spec = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32), "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32),
                "weight": jax.ShapeDtypeStruct((rows,), jnp.float32)}
        if config.data.margin_field:
            spec["margin"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
        return spec

    def objective(self, config) -> BradleyTerry:
        return BradleyTerry(config.reward.center_rewards_coefficient)

    def eval_step(self, model_def, mesh, config):
        objective = self.objective(config)

        def step(params, frozen, batch):
            rewards = objective.rewards(model_def.merge(params, frozen), batch)
            return {"terms": objective.terms_of(batch, rewards), "pairs": objective.normalizer(batch), "rewards": rewards}

        return jax.jit(step, out_shardings=sharding.replicated(mesh))

    def evaluate(self, eval_step, params, frozen, data: PreferenceData, mesh) -> dict | None:
        if data.validation is None:
            return None
        totals, pairs = {}, 0.0
        for batch in data.eval_batches():
            out = jax.device_get(eval_step(params, frozen, sharding.global_batch(batch, mesh)))
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in out["terms"].items()}
            pairs += float(out["pairs"])
        return {("eval_loss" if k == "pair_loss" else k): v / pairs for k, v in totals.items()}

    def examples(self, eval_step, params, frozen, data: PreferenceData, mesh, count: int) -> list[dict]:
        if data.validation is None or not count:
            return []
        batch = next(data.eval_batches())
        rewards = np.asarray(jax.device_get(eval_step(params, frozen, sharding.global_batch(batch, mesh))["rewards"]))
        rows = range(min(count, len(data.validation["tokens"]), len(rewards)))
        return [{"prompt": p, "chosen": c, "rejected": r, "reward_chosen": float(rewards[i, 0]),
                 "reward_rejected": float(rewards[i, 1])} for i, (p, c, r) in zip(rows, data.texts("validation", rows))]

    def export_info(self) -> ExportInfo:
        return ExportInfo(peft_task_type="SEQ_CLS", modules_to_save=(HEAD,))


TASK = Reward()
