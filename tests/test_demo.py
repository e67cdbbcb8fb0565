"""The embedded demo does what the README promises: the bundled model is a real pre-trained HF
model; `jaxft train --config configs/demo.py` runs, its loss falls, and it teaches the model facts it
could not know (exact match from ~0 to >= 90%); the export loads in transformers and answers alike."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from jaxft import run as run_lib
from jaxft.demo import FACTS_EVAL, FACTS_TRAIN, MODEL_DIR, build
from jaxft.generate import greedy_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 8


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def answers(model, tokenizer, prompts):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = greedy_generate(model, ids, MAX_NEW_TOKENS, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def exact_match(outputs, rows):
    return float(np.mean([o == r["answer"] for o, r in zip(outputs, rows)]))


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_bundled_model_matches_transformers(tokenizer):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    enc = tokenizer(["The baker opens the shop and", "Q: Where does Hialan Riareal live?\nA:"], padding=True,
                    return_tensors="np")
    mask = enc["attention_mask"]
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.as_tensor(enc["input_ids"]), attention_mask=torch.as_tensor(mask),
                            position_ids=torch.as_tensor(positions)).logits.numpy()
    got = np.asarray(jaxft.from_pretrained(MODEL_DIR)(jnp.asarray(enc["input_ids"]), attention_mask=jnp.asarray(mask)))
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 128 and size < 4.5e6


def test_bundled_base_was_pretrained_and_the_facts_are_new(tokenizer):
    """The base answers questions about people of its corpus (so it learned the format and to look
    facts up), while the fine-tuning files, as the build script writes them, are about others."""
    docs, new_people = build.corpus()
    known = [d for d in docs if d.startswith("Q: ")][:48]
    prompts = [d.rpartition("\nA: ")[0] + "\nA:" for d in known]
    rows = [{"answer": d.rpartition("\nA: ")[2]} for d in known]
    assert exact_match(answers(jaxft.from_pretrained(MODEL_DIR), tokenizer, prompts), rows) >= 0.8
    train_rows, eval_rows = read_jsonl(FACTS_TRAIN), read_jsonl(FACTS_EVAL)
    assert train_rows == [{"prompt": p, "completion": " " + a} for person in new_people for p, a in build.qa_pairs(person)]
    assert [r["prompt"] for r in eval_rows] == [r["prompt"] for r in train_rows]
    assert [r["answer"] for r in eval_rows] == [r["completion"][1:] for r in train_rows]
    corpus_words = set(re.findall(r"\w+", "\n".join(docs)))
    for person in new_people:
        assert not set(person["name"].split()) & corpus_words, person["name"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's command, as a subprocess, in a temp workdir."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    out = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
                          f"--config.workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return workdir


def test_demo_training_teaches_the_facts(demo_run, tokenizer):
    rows = [json.loads(line) for line in open(demo_run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.2 * losses[0], losses

    facts = read_jsonl(FACTS_EVAL)
    prompts = [r["prompt"] for r in facts]
    before = exact_match(answers(jaxft.from_pretrained(MODEL_DIR), tokenizer, prompts), facts)
    after = exact_match(answers(run_lib.restore(str(demo_run)).model(), tokenizer, prompts), facts)
    print(f"\n[demo] exact match {before:.1%} -> {after:.1%}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert before <= 0.10 and after >= 0.90
    report = json.load(open(demo_run / "report.json"))  # the run's own task eval says the same
    assert report["task"]["before"]["exact_match"] == pytest.approx(before)
    assert report["task"]["after"]["exact_match"] == pytest.approx(after)


def test_demo_export_loads_in_transformers_and_answers_the_same(demo_run, tokenizer, tmp_path):
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "jaxft.cli", "export", "--workdir", str(demo_run), "--out", str(out),
                    "--format", "hf"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    facts = read_jsonl(FACTS_EVAL)
    ours = answers(run_lib.restore(str(demo_run)).model(), tokenizer, [r["prompt"] for r in facts])
    theirs = []
    for row in facts:
        ids = hf_tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = hf_model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                          eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
        theirs.append(hf_tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert theirs == ours
    assert exact_match(theirs, facts) >= 0.90
