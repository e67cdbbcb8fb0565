"""`task = "causal_lm"`: next-token prediction (pre-training, SFT on prompt/completion or chat rows).

    jaxft train --config configs/demo.py                     # LoRA SFT of the bundled model
    jaxft train --config configs/chat_sft.py                 # loss on assistant turns only

Data: jaxft.data.DataPipeline (text | prompt_completion | chat rows, loss masks, packing). The loss
is the mean token cross-entropy over every trained target token of the global batch (micro-batches
included), optionally with z-loss (train.z_loss: mean logsumexp², PaLM) and over sequence chunks
(train.loss_chunk) so that [B, T, V] float32 logits are never held. Eval: eval_loss and perplexity
on data.validation (or data.validation_fraction).
Mixture-of-experts models add their router losses over the same forward pass (jaxft.models.moe):
train.router_aux_loss_coef × the load-balancing loss (transformers' load_balancing_loss_func, which
it adds with output_router_logits) and train.router_z_loss_coef × the router z-loss, each logged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft import evaluate
from jaxft.losses import chunked_cross_entropy_sums, cross_entropy_sums, forward, hidden_states
from jaxft.models import moe
from jaxft.tasks.base import Task, need

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask")


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The causal-LM Objective (see jaxft.step.Objective): sum of -log p(target) over the masked
    tokens (+ z_loss × logsumexp²) / the batch's masked-token count."""

    z_loss: float = 0.0
    chunk: int = 0  # > 0: over sequence chunks of this many tokens
    router_aux_loss_coef: float = 0.0  # MoE: × load-balancing loss of this micro-batch's forward
    router_z_loss_coef: float = 0.0  # MoE: × router z-loss

    def normalizer(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def sums(self, model, batch):
        """(Σ nll, Σ logsumexp²) over the batch's masked tokens."""
        if self.chunk:
            return chunked_cross_entropy_sums(model, hidden_states(model, batch), batch["targets"], batch["loss_mask"],
                                              self.z_loss, self.chunk)
        return cross_entropy_sums(forward(model, batch), batch["targets"], batch["loss_mask"], self.z_loss)

    def loss(self, model, batch, normalizer):
        with moe.collect_router_stats() as router:
            nll, z = self.sums(model, batch)
        loss, metrics = (nll + self.z_loss * z) / normalizer, {"loss": nll / normalizer, "z_loss": z / normalizer}
        if router:  # a MoE model: transformers adds its aux loss per forward; a micro-batch adds its token share
            (stats,) = router
            experts = (stats.shape[0] - 2) // 2
            share = self.normalizer(batch) / normalizer
            aux, router_z = moe.load_balancing_loss(stats, experts), moe.router_z_loss(stats, experts)
            loss = loss + share * (self.router_aux_loss_coef * aux + self.router_z_loss_coef * router_z)
            metrics.update({"router_aux_loss": share * aux, "router_z_loss": share * router_z})
        return loss, metrics


class CausalLM(Task):
    name = "causal_lm"
    resume_keys = ("data.format", "data.packing")

    def validate(self, config) -> None:
        need(config.data.format != "preference",
             "data.format='preference' holds pairs for task=dpo or task=reward, not documents for task=causal_lm")
        chunk, seq = config.train.loss_chunk, config.data.seq_len
        need(chunk >= 0, f"train.loss_chunk must be >= 0, got {chunk}")
        need(not chunk or seq % chunk == 0, f"train.loss_chunk={chunk} does not divide data.seq_len={seq}")

    def data(self, config, tokenizer):
        from jaxft.data import DataPipeline

        return DataPipeline(config, tokenizer)

    def batch_spec(self, config, rows: int) -> dict:
        shape = (rows, config.data.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}

    def objective(self, config) -> NextTokenLoss:
        return NextTokenLoss(z_loss=config.train.z_loss, chunk=config.train.loss_chunk,
                             router_aux_loss_coef=config.train.get("router_aux_loss_coef", 0.0),
                             router_z_loss_coef=config.train.get("router_z_loss_coef", 0.0))

    def eval_step(self, model_def, mesh, config):
        loss = NextTokenLoss(chunk=config.train.loss_chunk)  # chunked as in training: eval fits where training does

        def eval_step(params, frozen, batch):
            nll, _ = loss.sums(model_def.merge(params, frozen), batch)
            return {"nll_sum": nll, "num_targets": loss.normalizer(batch)}

        return jax.jit(eval_step)

    def evaluate(self, eval_step, params, frozen, data, mesh) -> dict | None:
        """eval_loss and perplexity over all validation data; with named sources ({name: spec}),
        eval_loss/<name> of each too."""
        loss = evaluate.eval_loss(eval_step, params, frozen, data.validation_batches(), mesh)
        if loss is None:
            return None
        scores = {"eval_loss": loss, "eval_perplexity": evaluate.perplexity(loss)}
        for name in data.validation_names():
            scores[f"eval_loss/{name}"] = evaluate.eval_loss(eval_step, params, frozen, data.validation_batches(name), mesh)
        return scores


TASK = CausalLM()
