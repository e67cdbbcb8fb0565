"""`task = "distill"`: a frozen teacher on the training mesh teaches the student its next-token distribution.

    jaxft train --config configs/distill_demo.py        # a 2-layer student learns the 4-layer demo teacher

The student is model.path as always (full fine-tuning or LoRA); the teacher is distill.teacher,
any family jaxft loads, in its own dtype (distill.teacher_dtype) and optionally quantized
(distill.teacher_quantize: int8 | nf4, the QLoRA code), placed on the same mesh by its own
params' axes and attached to the model as `teacher` (frozen: never adapted, trained or saved; a
resumed run loads it again). Data: any causal_lm format (text, prompt_completion, chat masks);
the loss is on the trained tokens.

The loss per trained token, with s = log softmax(student logits / T), t = the teacher's, T =
distill.temperature, β = 0 (forward_kl), 1 (reverse_kl) or distill.jsd_beta (jsd):
    β = 0:  KL(t ‖ s) = Σ_v e^t (t − s)                 (the usual KD; GKD's β = 0)
    β = 1:  KL(s ‖ t)                                    (reverse KL, mode-seeking)
    else:   β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = log((1 − β)e^s + βe^t)   (GKD's generalized JSD, Eq. 1)
as trl/experimental/gkd/gkd_trainer.py's `generalized_jsd_loss` (trl 1.16) computes it, averaged
over the trained tokens of the whole batch. Temperature convention: the logits are divided by T
and the divergence is NOT multiplied by T² (as TRL's GKD; Hinton et al.'s T² keeps the soft term's
gradients the size of the hard term's at high T: fold it into distill.alpha if you mix). The total
is alpha × divergence + (1 − alpha) × the student's cross-entropy on the data's tokens. Both
models' logits are made over sequence chunks of train.loss_chunk tokens, so neither [B, T, V]
float32 block is held; only the tokenizer's real vocabulary is compared (padded embeddings differ).

On-policy (GKD): with distill.on_policy_fraction λ, that fraction of steps (decided by the seed
and the step, so a resume repeats it) trains on completions the student samples itself
(jaxft.generate, KV cache; distill.sampling_temperature, 0 = greedy) after each row's prompt,
instead of the data's completions. Needs unpacked rows (data.packing=False) and one process.

Metrics: distill_loss, ce_loss, teacher_ce (the teacher's own cross-entropy on the batch: a sanity
line, it should stay low); eval rows the same on data.validation, eval_loss being the total.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import sharding
from jaxft.losses import hidden_states, over_chunks
from jaxft.tasks.base import Task, need
from jaxft.tasks.causal_lm import TASK as CAUSAL_LM

LOSSES = {"forward_kl": 0.0, "reverse_kl": 1.0}  # jsd: distill.jsd_beta


def divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """Per token [...]: the generalized JSD of GKD (β = 0: KL(teacher‖student), β = 1:
    KL(student‖teacher)) of logits [..., V], in float32."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if beta == 0.0:
        return (jnp.exp(t) * (t - s)).sum(-1)
    if beta == 1.0:
        return (jnp.exp(s) * (s - t)).sum(-1)
    mixture = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
    return beta * (jnp.exp(t) * (t - mixture)).sum(-1) + (1 - beta) * (jnp.exp(s) * (s - mixture)).sum(-1)


def _cross_entropy(logits, targets):
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """The distillation Objective (see jaxft.step.Objective): sums over the trained tokens / their
    count in the whole batch."""

    beta: float = 0.0
    temperature: float = 1.0
    alpha: float = 1.0
    vocab: int = 0  # the tokenizer's real vocabulary: logits beyond it (padding rows) are dropped
    chunk: int = 0

    def normalizer(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def sums(self, model, batch) -> dict[str, jax.Array]:
        """Σ over trained tokens of the divergence, the student's CE and the teacher's CE."""
        student = hidden_states(model, batch)
        teacher = jax.lax.stop_gradient(hidden_states(model.teacher, batch))
        vocab = self.vocab

        def one_chunk(sums, hs, ht, targets, mask):
            s_logits, t_logits = model.logits(hs)[..., :vocab], jax.lax.stop_gradient(model.teacher.logits(ht)[..., :vocab])
            mask = mask.astype(jnp.float32)
            terms = (divergence(s_logits, t_logits, self.beta, self.temperature), _cross_entropy(s_logits, targets),
                     _cross_entropy(t_logits, targets))
            return tuple(total + (term * mask).sum() for total, term in zip(sums, terms))

        zero = jnp.zeros((), jnp.float32)
        args = (student, teacher, batch["targets"], batch["loss_mask"])
        totals = over_chunks(one_chunk, (zero,) * 3, self.chunk, *args) if self.chunk else one_chunk((zero,) * 3, *args)
        return dict(zip(("distill", "ce", "teacher_ce"), totals))

    def loss(self, model, batch, normalizer):
        sums = self.sums(model, batch)
        distill, ce = sums["distill"] / normalizer, sums["ce"] / normalizer
        loss = self.alpha * distill + (1 - self.alpha) * ce
        return loss, {"loss": loss, "distill_loss": distill, "ce_loss": ce, "teacher_ce": sums["teacher_ce"] / normalizer}


class Distill(Task):
    name = "distill"
    section = "distill"
    resume_keys = ("data.format", "data.packing", "distill.teacher", "distill.teacher_dtype", "distill.teacher_quantize",
                   "distill.loss", "distill.jsd_beta", "distill.temperature", "distill.alpha",
                   "distill.on_policy_fraction")

    def validate(self, config) -> None:
        d = config.distill
        CAUSAL_LM.validate(config)  # the data and loss-chunk rules of next-token training
        need(bool(d.teacher), "task=distill needs distill.teacher (an HF folder or hub id of the teacher)")
        need(d.loss in ("forward_kl", "reverse_kl", "jsd"), f"distill.loss {d.loss!r} must be forward_kl, reverse_kl or jsd")
        need(0.0 <= d.jsd_beta <= 1.0, f"distill.jsd_beta must be in [0, 1], got {d.jsd_beta}")
        need(d.temperature > 0, f"distill.temperature must be > 0, got {d.temperature}")
        need(0.0 <= d.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {d.alpha}")
        need(d.teacher_dtype in ("float32", "bfloat16"), f"distill.teacher_dtype {d.teacher_dtype!r} must be float32 or bfloat16")
        need(d.teacher_quantize in ("none", "int8", "nf4"),
             f"distill.teacher_quantize {d.teacher_quantize!r} must be none, int8 or nf4")
        need(0.0 <= d.on_policy_fraction <= 1.0, f"distill.on_policy_fraction must be in [0, 1], got {d.on_policy_fraction}")
        if d.on_policy_fraction:
            need(not config.data.packing, "distill.on_policy_fraction > 0 samples a completion after each row's prompt: "
                                          "set data.packing=False (one example per row)")
            need(d.max_new_tokens >= 1, f"distill.max_new_tokens must be >= 1, got {d.max_new_tokens}")
        need(not config.train.z_loss, "train.z_loss: task=distill's loss is the divergence (+ alpha's cross-entropy)")

    def attach(self, model, config, *, training: bool, mesh=None, abstract: bool = False):
        if not training:
            return model  # export and eval: the student alone
        d = config.distill
        if abstract:
            from jaxft import hf
            from jaxft.peft import quant
            from jaxft.pretrained import init_random

            teacher = init_random(hf.config_for(d.teacher, d.teacher_revision), dtype=d.teacher_dtype)
            if d.teacher_quantize != "none":
                quant.quantize_model(teacher, d.teacher_quantize)
        else:
            from jaxft.pretrained import from_pretrained

            teacher = from_pretrained(d.teacher, dtype=d.teacher_dtype, mesh=mesh, revision=d.teacher_revision,
                                      quantize=d.teacher_quantize)
        model.teacher = teacher
        return model

    def trainable(self, predicate):
        return lambda path, variable: not path.startswith("teacher.") and predicate(path, variable)

    def data(self, config, tokenizer):
        check_same_tokenizer(tokenizer, config.distill.teacher, config.distill.teacher_revision)
        return CAUSAL_LM.data(config, tokenizer)

    def batch_spec(self, config, rows: int) -> dict:
        return CAUSAL_LM.batch_spec(config, rows)

    def objective(self, config) -> DistillLoss:
        d = config.distill
        return DistillLoss(beta=LOSSES.get(d.loss, d.jsd_beta), temperature=d.temperature, alpha=d.alpha,
                           vocab=_tokenizer_size(config.model.path, config.model.revision),
                           chunk=config.train.loss_chunk)

    def step_batch(self, training, data, state, batch, step: int):
        d, seed = training.config.distill, training.config.train.seed
        if not d.on_policy_fraction or _draw(seed, step) >= d.on_policy_fraction:
            return batch
        if jax.process_count() > 1:
            raise NotImplementedError("distill.on_policy_fraction > 0 samples on one process only for now")
        model = training.model_def.merge(state.params, state.frozen)
        tok = data.tokenizer  # jaxft.data.formats.TokenizerInfo
        return on_policy_batch(model, batch, d.max_new_tokens, -1 if tok.eos_id is None else tok.eos_id,
                               tok.hf.pad_token_id or 0, d.sampling_temperature, seed=seed * 1_000_003 + step)

    def eval_step(self, model_def, mesh, config):
        objective = self.objective(config)

        def step(params, frozen, batch):
            sums = objective.sums(model_def.merge(params, frozen), batch)
            total = objective.alpha * sums["distill"] + (1 - objective.alpha) * sums["ce"]
            return {**sums, "loss": total, "count": objective.normalizer(batch)}

        return jax.jit(step, out_shardings=sharding.replicated(mesh))

    def evaluate(self, eval_step, params, frozen, data, mesh) -> dict | None:
        batches = data.validation_batches()
        if not batches:
            return None
        totals: dict[str, float] = {}
        for batch in batches:
            out = jax.device_get(eval_step(params, frozen, sharding.global_batch(batch, mesh)))
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in out.items()}
        count = max(totals.pop("count"), 1.0)
        return {"eval_loss": totals["loss"] / count, "distill_loss": totals["distill"] / count,
                "ce_loss": totals["ce"] / count, "teacher_ce": totals["teacher_ce"] / count}


def _draw(seed: int, step: int) -> float:
    """A uniform number in [0, 1) per (seed, step): whether that step is on-policy."""
    return float(np.random.default_rng([seed, step]).random())


def _tokenizer_size(path: str, revision=None) -> int | None:
    """The student tokenizer's real vocabulary (logits past it are embedding padding), or None where
    its files are not on this machine (a plan from shapes only: nothing is sliced)."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=True))
    except (OSError, ValueError):
        return None


def on_policy_batch(model, batch: dict[str, np.ndarray], max_new_tokens: int, eos_id: int, pad_id: int,
                    temperature: float, seed: int) -> dict[str, np.ndarray]:
    """The batch with each row's completion replaced by one the model samples after the row's prompt
    (the tokens before its first trained target): the generated tokens are the trained ones."""
    from jaxft.generate import generate

    rows, length = batch["input_ids"].shape
    trained = batch["loss_mask"] > 0
    starts = [int(np.argmax(trained[r])) if trained[r].any() else int(batch["attention_mask"][r].sum()) for r in range(rows)]
    prompts = [batch["input_ids"][r, :starts[r] + 1].tolist() for r in range(rows)]  # up to the completion's first input
    budget = min(max_new_tokens, length - max(len(p) for p in prompts) + 1)
    completions = generate(model, prompts, max(budget, 1), eos_id=eos_id, pad_id=pad_id, temperature=temperature, seed=seed)
    out = {k: np.zeros_like(v) for k, v in batch.items()}
    out["input_ids"][:] = pad_id
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = (prompt + completion)[:length + 1]
        n = len(tokens) - 1
        out["input_ids"][r, :n], out["targets"][r, :n] = tokens[:-1], tokens[1:]
        out["loss_mask"][r, len(prompt) - 1:n] = 1.0  # the targets that are generated tokens
        out["attention_mask"][r, :n] = 1
        if "segment_ids" in out:
            out["segment_ids"][r, :n] = 1
        if "positions" in out:
            out["positions"][r, :n] = np.arange(n)
    return out


def check_same_tokenizer(student, teacher_path: str, revision=None) -> None:
    """The teacher's tokenizer must be the student's: the same tokens with the same ids (its files
    are read; no weights are)."""
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(teacher_path, revision=revision)
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if ours == theirs:
        return
    by_id = lambda vocab: {i: t for t, i in vocab.items()}  # noqa: E731
    ours_by_id, theirs_by_id = by_id(ours), by_id(theirs)
    first = next((i for i in sorted(set(ours_by_id) | set(theirs_by_id)) if ours_by_id.get(i) != theirs_by_id.get(i)), None)
    raise ValueError(f"distill.teacher {teacher_path}: its tokenizer is not the student's (vocabulary {len(theirs)} vs "
                     f"{len(ours)} tokens; first difference at id {first}: {theirs_by_id.get(first)!r} (teacher) vs "
                     f"{ours_by_id.get(first)!r} (student)); distillation compares the two models token by token")


TASK = Distill()
