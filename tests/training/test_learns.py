"""It learns: 64 made-up key → value facts, unknowable beforehand, are memorized to >= 95% exact
match (greedy argmax of every completion token under teacher forcing), by full fine-tuning and by
LoRA."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft import optim, step
from jaxft.tasks.causal_lm import NextTokenLoss

VOCAB, BOS, SEP, EOS, PAD = 96, 1, 2, 3, 0
HF_CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 64, "tie_word_embeddings": False}


def facts_batch(num_facts: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """[BOS k1 k2 SEP v1 v2 EOS]: the loss covers v1, v2 and EOS; keys are unique pairs."""
    rng = np.random.RandomState(seed)
    pairs = rng.choice((VOCAB - 4) ** 2, num_facts, replace=False)
    keys = np.stack([pairs // (VOCAB - 4), pairs % (VOCAB - 4)], 1) + 4
    values = rng.randint(4, VOCAB, (num_facts, 2))
    rows = np.concatenate([np.full((num_facts, 1), BOS), keys, np.full((num_facts, 1), SEP), values,
                           np.full((num_facts, 1), EOS), np.full((num_facts, 1), PAD)], 1).astype(np.int32)
    loss_mask = np.zeros((num_facts, 7), np.float32)
    loss_mask[:, 3:6] = 1.0  # targets at positions 3..5 are v1, v2, EOS
    attention = (rows[:, :-1] != PAD).astype(np.int32)
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": loss_mask, "attention_mask": attention}


def exact_match(model, batch) -> float:
    logits = model(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]))
    predicted = np.asarray(jnp.argmax(logits, -1))
    trained = batch["loss_mask"] > 0
    correct = np.where(trained, predicted == batch["targets"], True).all(axis=1)
    return float(correct.mean())


def train(model, trainable, learning_rate: float, steps: int, facts_seed: int = 0):
    batch = facts_batch(seed=facts_seed)
    model_def, params, frozen = step.split_model(model, trainable)
    cfg = optim.OptimConfig(name="adamw", learning_rate=learning_rate, schedule="cosine", warmup_steps=10,
                            total_steps=steps, weight_decay=0.0, clip_norm=1.0)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, NextTokenLoss()), donate_argnums=0)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    for _ in range(steps):
        state, metrics = train_step(state, device_batch)
    return model_def.merge(state.params, state.frozen), float(metrics["loss"]), batch


def test_full_fine_tuning_memorizes_facts():
    model = jaxft.init_random(HF_CONFIG, seed=0)
    before = exact_match(model, facts_batch())
    trained, loss, batch = train(model, lambda path, v: True, learning_rate=3e-3, steps=150)
    after = exact_match(trained, batch)
    print(f"\n[full FT] exact match {before:.2f} -> {after:.2f}, final loss {loss:.4f}")
    assert before < 0.05 and after >= 0.95


def test_lora_memorizes_facts():
    """LoRA adapts a model that already knows how: on a random base (attention and lm_head that
    look up nothing) LoRA cannot learn the lookup, in PEFT either. So the base is first fully
    trained on *other* facts (seed 1), as pre-training would; LoRA then learns new ones (seed 0)."""
    from jaxft.peft import lora

    pretrained, _, _ = train(jaxft.init_random(HF_CONFIG, seed=0), lambda path, v: True, learning_rate=3e-3,
                             steps=150, facts_seed=1)
    before = exact_match(pretrained, facts_batch(seed=0))
    lora.apply_lora(pretrained, lora.LoraConfig(rank=16, alpha=32, targets="all-linear"))
    trained, loss, batch = train(pretrained, lora.is_lora_param, learning_rate=1e-2, steps=200)
    after = exact_match(trained, batch)
    print(f"\n[LoRA r=16] exact match {before:.2f} -> {after:.2f}, final loss {loss:.4f}")
    assert before < 0.05 and after >= 0.95
