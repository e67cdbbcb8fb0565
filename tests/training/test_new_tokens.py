"""New tokens on a base model (model.add_special_tokens + data.chat_template): the embedding grows,
only the new rows train in a LoRA run, and both exports carry the new vocabulary into PyTorch."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxft import config as config_lib
from jaxft import export, hf, train
from jaxft import run as run_lib
from jaxft.demo import FACTS_TRAIN, MODEL_DIR
from jaxft.pretrained import flat_params
from jaxft.testing import torch_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")
NEW = ("<|user|>", "<|assistant|>", "<|end|>")  # none of them in the demo tokenizer (1024 tokens)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
            "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
OLD_VOCAB = 1024


def chat_file(folder) -> str:
    path = os.path.join(folder, "chat.jsonl")
    with open(FACTS_TRAIN) as f, open(path, "w") as out:
        for line in list(f)[:16]:
            row = json.loads(line)
            out.write(json.dumps({"messages": [{"role": "user", "content": row["prompt"]},
                                               {"role": "assistant", "content": row["completion"].strip()}]}) + "\n")
    return path


def config_for(workdir, base, data, *overrides):
    # A high learning rate so that a few steps move every trained weight well away from its init.
    return config_lib.load(DEMO, [
        f"--config.workdir={workdir}", f"--config.model.path={base}", f"--config.data.train={data}",
        "--config.data.validation=None", "--config.data.format=chat", f"--config.data.chat_template={TEMPLATE}",
        f"--config.model.add_special_tokens={list(NEW)}", "--config.eval.task_file=None", "--config.train.steps=3",
        "--config.train.warmup_steps=0", "--config.train.learning_rate=0.05", "--config.checkpoint.async_save=False",
        "--config.eval.samples=0",  # no generation pass at the end: only what these tests check
        *overrides])


def untied_demo(folder) -> str:
    """The demo model with an lm_head of its own (the embedding plus noise)."""
    tied = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    config = tied.config
    config.tie_word_embeddings = False
    untied = transformers.LlamaForCausalLM(config)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        untied.lm_head.weight.copy_(tied.model.embed_tokens.weight + 0.02 * torch.randn(
            tied.model.embed_tokens.weight.shape, generator=generator))
    untied.save_pretrained(folder)
    hf.copy_tokenizer_files(MODEL_DIR, folder)
    return os.fspath(folder)


def batch(tokenizer):
    """Chat-rendered rows that use every new token, right-padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "Where does Ada Finch live?"},
                                            {"role": "assistant", "content": "Greywick"}], tokenize=False),
             "<|user|>Hello<|end|><|assistant|>"]
    enc = tokenizer(texts, padding=True, return_tensors="np", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert set(range(OLD_VOCAB, OLD_VOCAB + 3)) <= set(ids.ravel().tolist())
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def trained_model(workdir):
    training, _ = run_lib.restore_training(str(workdir))  # the whole train state, as a resumed run holds it
    return training.model_def.merge(training.state.params, training.state.frozen)


def jax_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def base_table(folder, key):
    return load_file(os.path.join(folder, "model.safetensors"))[key]


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """LoRA + new rows on the (tied) demo model, chat SFT for 3 steps."""
    root = tmp_path_factory.mktemp("tied")
    train.train(config_for(root / "run", MODEL_DIR, chat_file(root)))
    export.export(str(root / "run"), str(root / "hf"), format="hf")
    export.export(str(root / "run"), str(root / "peft"), format="peft")
    return root


def test_old_rows_bit_identical_new_rows_trained(tied_run):
    old = base_table(MODEL_DIR, "model.embed_tokens.weight")
    merged = base_table(tied_run / "hf", "model.embed_tokens.weight")
    assert merged.shape == (OLD_VOCAB + 3, old.shape[1])
    assert np.array_equal(merged[:OLD_VOCAB], old)  # bit for bit
    trained = trained_model(tied_run / "run")
    assert np.array_equal(np.asarray(trained.model.embed_tokens.weight[...])[:OLD_VOCAB], old)
    # The new rows started as mean-resized rows (within ~1e-4 of the old rows' mean) and moved away.
    mean = old.astype(np.float32).mean(0)
    start = np.asarray(trained.model.embed_tokens.weight[...])[OLD_VOCAB:]
    assert np.abs(start - mean).max() < 1e-3
    assert (np.abs(merged[OLD_VOCAB:] - mean).max(axis=1) > 1e-2).all(), "every new row trains"


def test_merged_export_carries_the_vocabulary(tied_run):
    out = tied_run / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert len(tokenizer) == model.config.vocab_size == OLD_VOCAB + 3
    assert tokenizer.convert_tokens_to_ids(list(NEW)) == [1024, 1025, 1026]
    assert tokenizer.chat_template == TEMPLATE
    assert tokenizer.decode([1024, 59, 1026], skip_special_tokens=True) == tokenizer.decode([59])  # special tokens
    ids, mask, positions = batch(tokenizer)
    valid = mask.astype(bool)
    expected = jax_logits(trained_model(tied_run / "run"), ids, mask)
    assert np.abs(torch_logits(model, ids, mask, positions) - expected)[valid].max() <= 1e-4


def test_peft_export_loads_on_the_resized_base(tied_run):
    import peft

    out = tied_run / "peft"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["trainable_token_indices"] == [1024, 1025, 1026]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == OLD_VOCAB + 3 and tokenizer.chat_template == TEMPLATE
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))  # as PEFT documents: random new rows the adapter replaces
    with_adapter = peft.PeftModel.from_pretrained(base, out).eval()
    ids, mask, positions = batch(tokenizer)
    valid = mask.astype(bool)
    expected = jax_logits(trained_model(tied_run / "run"), ids, mask)
    assert np.abs(torch_logits(with_adapter, ids, mask, positions) - expected)[valid].max() <= 1e-4


def test_untied_padded_vocabulary_exports_and_resumes(tmp_path):
    """An untied lm_head grows too; model.pad_vocab_multiple=8 pads 1027 to 1032 rows, which all
    train (they enter the softmax); the run resumes 2 + 2 = 4 steps exactly, resized shapes and all."""
    import peft

    base = untied_demo(tmp_path / "base")
    data = chat_file(tmp_path)
    overrides = ["--config.model.pad_vocab_multiple=8", "--config.train.steps=4", "--config.checkpoint.every=2"]
    train.train(config_for(tmp_path / "run", base, data, *overrides))
    # Resume: the same run stopped after its step-2 checkpoint, then continued to 4.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    report = train.train(config_for(tmp_path / "resumed", base, data, *overrides))
    assert report["resumed_from"] == 2
    straight, resumed = trained_model(tmp_path / "run"), trained_model(tmp_path / "resumed")
    a, b = flat_params(straight)[1], flat_params(resumed)[1]
    assert a["model.embed_tokens.adapter.rows"].shape == a["lm_head.adapter.rows"].shape == (8, 128)
    assert a["model.embed_tokens.weight"].shape == a["lm_head.weight"].shape == (1032, 128)
    for name in a:
        assert np.array_equal(np.asarray(a[name].get_value()), np.asarray(b[name].get_value())), name

    export.export(str(tmp_path / "run"), str(tmp_path / "hf"), format="hf")
    export.export(str(tmp_path / "run"), str(tmp_path / "peft"), format="peft")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        old, merged = base_table(base, key), base_table(tmp_path / "hf", key)
        assert merged.shape == (1032, 128) and np.array_equal(merged[:OLD_VOCAB], old), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (len(tokenizer), merged_model.config.vocab_size) == (OLD_VOCAB + 3, 1032)
    ids, mask, positions = batch(tokenizer)
    valid = mask.astype(bool)
    expected = jax_logits(straight, ids, mask)
    assert expected.shape[-1] == 1032
    assert np.abs(torch_logits(merged_model, ids, mask, positions) - expected)[valid].max() <= 1e-4

    rows = list(range(OLD_VOCAB, 1032))
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["trainable_token_indices"] == {"embed_tokens": rows, "lm_head": rows}
    resized = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    resized.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    with_adapter = peft.PeftModel.from_pretrained(resized, tmp_path / "peft").eval()
    assert np.abs(torch_logits(with_adapter, ids, mask, positions) - expected)[valid].max() <= 1e-4
