"""Classification fine-tuning: {"text", "label"} rows → LoRA + a trainable head reach >= 95%
validation accuracy on a synthetic routing task that no single token decides."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import optim, step
from jaxft.data import DataError
from jaxft.peft import lora
from jaxft.tasks import classification as task
from jaxft.testing_families import word_tokenizer

INTENTS = ["billing", "technical", "shipping", "account"]
KEYWORDS = {intent: [f"{intent[:4]}{i}" for i in range(6)] for intent in INTENTS}
FILLERS = [f"w{i}" for i in range(40)]
WORDS = [k for keys in KEYWORDS.values() for k in keys] + FILLERS
SEQ_LEN = 16


def routing_rows(count: int, seed: int) -> list[dict]:
    """Two keywords of the row's intent and, in 70% of rows, one of another intent, at random places
    among 3-9 filler words: the label is the majority intent, so neither the first, the last nor any
    single keyword decides it (they are right on about 2 of 3 distractor rows)."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(count):
        words = list(rng.choice(FILLERS, rng.randint(3, 10)))
        intent = rng.randint(len(INTENTS))
        keys = list(rng.choice(KEYWORDS[INTENTS[intent]], 2))
        if rng.rand() < 0.7:
            keys.append(rng.choice(KEYWORDS[INTENTS[(intent + rng.randint(1, len(INTENTS))) % len(INTENTS)]]))
        for key in keys:
            at = rng.randint(0, len(words) + 1)
            words[at:at] = [key]
        rows.append({"text": " ".join(words), "label": INTENTS[intent]})
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def test_lora_classification_reaches_95_percent(tokenizer, tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in routing_rows(2048, seed=0))
    train = task.encode(task.read_rows(str(tmp_path / "train.jsonl")), tokenizer, INTENTS, SEQ_LEN, tokenizer.pad_token_id)
    valid = task.encode(routing_rows(256, seed=1), tokenizer, INTENTS, SEQ_LEN, tokenizer.pad_token_id)
    hf_config = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                 "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id}
    model = jaxft.init_random(hf_config, labels=INTENTS, seed=0)
    before = task.evaluate(model, valid)
    lora.apply_lora(model, lora.LoraConfig(rank=16, alpha=32, targets=task.lora_targets(model)))
    assert "score" not in task.lora_targets(model)

    model_def, params, frozen = step.split_model(model, task.with_head(lora.is_lora_param))
    assert "score.weight" in params and not any(p.endswith("proj.weight") for p in params)
    base_before = {path: np.asarray(value) for path, value in frozen.items()}  # the step donates the state
    steps = 400
    cfg = optim.OptimConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=10, total_steps=steps)
    optimizer = optim.make_optimizer(cfg, params, model_def.axes)
    state = step.init_state(params, frozen, optimizer)
    train_step = jax.jit(step.make_train_step(model_def, optimizer, task.SequenceCrossEntropy()), donate_argnums=0)
    batches = task.batches(train, batch_size=32, seed=0)
    for _ in range(steps):
        state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in next(batches).items()})
    after = task.evaluate(model_def.merge(state.params, state.frozen), valid)
    print(f"\n[LoRA r=16 + head, 4-way routing] validation accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"macro-F1 {after['f1']:.3f}, eval loss {after['eval_loss']:.3f}, final train loss {float(metrics['loss']):.4f}")
    assert before["accuracy"] < 0.4
    assert after["accuracy"] >= 0.95 and after["f1"] >= 0.95
    for path, value in base_before.items():  # the base model did not move
        np.testing.assert_array_equal(np.asarray(state.frozen[path]), value, err_msg=path)


def test_encode_pads_cuts_and_labels_rows_and_names_bad_ones(tokenizer):
    from jaxft.models.classification import last_token_index

    data = task.encode([{"text": "bill0 w1", "label": "billing"}, {"text": "w2 " * 30, "label": 3}],
                       tokenizer, INTENTS, SEQ_LEN, tokenizer.pad_token_id)
    # [BOS] bill0 w1 → the head reads token 2; the long row is cut to SEQ_LEN and read at its end.
    assert np.asarray(last_token_index(data["input_ids"], tokenizer.pad_token_id)).tolist() == [2, SEQ_LEN - 1]
    assert data["labels"].tolist() == [0, 3] and int(data["truncated"]) == 1
    assert sorted(data) == ["attention_mask", "input_ids", "labels", "truncated"]  # no LM targets: its own loss
    assert data["attention_mask"][0].tolist() == [1, 1, 1] + [0] * (SEQ_LEN - 3)
    with pytest.raises(DataError, match=r"row 1: label 'refund' is neither one of \['billing', .*\] nor an id in 0\.\.3"):
        task.encode([{"text": "w1", "label": 0}, {"text": "w1", "label": "refund"}], tokenizer, INTENTS, 8, 0)
    with pytest.raises(DataError, match=r"row 0: field 'text' must be a non-empty string"):
        task.encode([{"text": "", "label": 0}], tokenizer, INTENTS, 8, 0)


def test_metrics_match_hand_counts():
    predicted, labels = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    scores = task.classification_metrics(predicted, labels, num_labels=4)  # class 3 never occurs: not averaged
    f1 = [2 * 1 / (2 + 2), 2 * 1 / (2 + 1), 2 * 2 / (4 + 1)]  # 2tp / (2tp + fp + fn) per class
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["f1"] == pytest.approx(np.mean(f1))


def test_peft_export_loads_with_the_head(tmp_path):
    """LoRA adapters + the trained head written as a PEFT adapter (head in modules_to_save) load with
    PeftModel onto transformers' classifier of the base checkpoint and score exactly as jaxft."""
    import peft
    import torch
    import transformers

    from jaxft.export import write_peft_adapter
    from jaxft.testing import padded_batch, tiny_hf_model

    folder, _ = tiny_hf_model(tmp_path / "base", "llama3_rope")
    model = jaxft.from_pretrained(folder, labels=3, pad_token_id=0)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, targets=task.lora_targets(model)))
    model_def, params, frozen = step.split_model(model, task.with_head(lora.is_lora_param))
    keys = jax.random.split(jax.random.key(1), len(params))  # as if trained: B ≠ 0, head moved
    params = {p: v + 0.05 * jax.random.normal(k, v.shape, v.dtype) for k, (p, v) in zip(keys, sorted(params.items()))}
    meta = {"config": {"lora": dict(rank=4, alpha=8, dropout=0.0, use_rslora=False, use_dora=False)},
            "base": {"path": folder}}
    os.makedirs(tmp_path / "adapter")  # export.export makes it; write_peft_adapter writes into it
    write_peft_adapter(params, meta, str(tmp_path / "adapter"), info=task.TASK.export_info())
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]

    base = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, pad_token_id=0,
                                                                          dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask, positions = padded_batch(model.config.vocab_size)
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                              position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
    got = np.asarray(model_def.merge(params, frozen).classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_loss_and_head_gradient_equal_transformers(tmp_path):
    """SequenceCrossEntropy on a batch equals `*ForSequenceClassification(labels=...).loss` (fp32),
    and so does the gradient of the head and of a decoder weight: the reference run, not a re-derivation."""
    import torch

    from jaxft.testing import tiny_hf_model

    folder, torch_model = tiny_hf_model(tmp_path / "clf", "llama3_rope", task="classification", num_labels=3,
                                        pad_token_id=0)
    model = jaxft.from_pretrained(folder)
    model_def, params, frozen = step.split_model(model)
    ids = np.array([[5, 9, 3, 0, 0], [0, 0, 7, 8, 2], [4, 4, 6, 1, 3], [2, 7, 0, 0, 0]], np.int32)  # right and left pads
    mask = (ids != 0).astype(np.int32)
    labels = np.array([2, 0, 1, 2], np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    objective = task.SequenceCrossEntropy()
    loss_fn = step.make_loss_fn(model_def, objective)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, objective.normalizer(batch),
                                                                       None)
    torch_model.zero_grad()
    out = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                      labels=torch.as_tensor(labels, dtype=torch.long))
    out.loss.backward()
    print(f"\n[classification loss] jaxft {float(loss):.6f} vs transformers {out.loss.item():.6f}")
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    assert float(metrics["accuracy"]) == pytest.approx(float((out.logits.argmax(-1).numpy() == labels).mean()))
    np.testing.assert_allclose(np.asarray(grads["score.weight"]), torch_model.score.weight.grad.numpy(), atol=1e-5)
    layer0 = torch_model.model.layers[0].mlp.down_proj.weight.grad.numpy()
    np.testing.assert_allclose(np.asarray(grads["model.layers.mlp.down_proj.weight"][0]), layer0, atol=1e-5)
