"""`jaxft eval --lm-eval`: lm-evaluation-harness on a LoRA run (adapters unmerged) equals lm-eval's own
`hf` model on the run's merged export, request by request (local JSONL tasks, no download)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from jaxft.demo import FACTS_EVAL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 48  # small, so that the rolling task's texts span several windows
TASKS = "jaxft_facts_mc,jaxft_facts_gen,jaxft_topics_continue,jaxft_topics_ppl"
GENERATION = ("jaxft_facts_gen", "jaxft_topics_continue")


def _write_tasks(folder):
    """Four local tasks over the demo's facts and topics: multiple choice (the true answer among
    three others'), generation of the answers (the trained model ends them with EOS), free
    continuation of sentences cut at '.' or 16 tokens (the stop strings and the token limit do the
    cutting), and rolling log-likelihood."""
    folder.mkdir()
    facts = [json.loads(line) for line in open(FACTS_EVAL)]
    rng = np.random.default_rng(0)
    answers = sorted({f["answer"] for f in facts})
    with open(folder / "mc.jsonl", "w") as f:
        for fact in facts:
            others = [a for a in answers if a != fact["answer"]]
            choices = [fact["answer"], *rng.choice(others, 3, replace=False)]
            order = rng.permutation(4)
            f.write(json.dumps({"question": fact["prompt"], "choices": [choices[i] for i in order],
                                "label": int(np.argmax(order == 0))}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for fact in facts:
            f.write(json.dumps({"prompt": fact["prompt"], "answer": " " + fact["answer"]}) + "\n")
    topics = [json.loads(line)["text"] for line in open(os.path.join(ROOT, "jaxft", "demo", "topics_valid.jsonl"))]
    with open(folder / "ppl.jsonl", "w") as f:
        for start in range(0, 24, 4):
            f.write(json.dumps({"text": " ".join(topics[start:start + 4])}) + "\n")
    with open(folder / "continue.jsonl", "w") as f:
        for text in topics[:10]:
            words = text.split()
            f.write(json.dumps({"start": " ".join(words[:4]), "rest": " " + " ".join(words[4:])}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: jaxft_facts_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "target_delimiter: ' '\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        f"task: jaxft_facts_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['\\n', 'Q:']\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "continue.yaml").write_text(
        f"task: jaxft_topics_continue\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'continue.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{start}}'\ndoc_to_target: '{{rest}}'\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "ppl.yaml").write_text(
        f"task: jaxft_topics_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run of the demo (adapters trained, never merged) and its merged HF export."""
    root = tmp_path_factory.mktemp("harness")
    workdir, export = root / "run", root / "hf"
    for command in (["train", "--config", os.path.join(ROOT, "configs", "demo.py"), f"--config.workdir={workdir}",
                     "--config.eval.task_file=None"],
                    ["export", "--workdir", str(workdir), "--out", str(export), "--format", "hf"]):
        out = subprocess.run([sys.executable, "-m", "jaxft.cli", *command], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return workdir, export, _write_tasks(root / "tasks")


def _responses(samples):
    """doc_id → the per-request model outputs lm-eval logged (log-likelihoods / generated text)."""
    return {s["doc_id"]: s["resps"] for s in samples}


def test_lm_eval_on_a_lora_run_equals_lm_eval_hf_on_its_export(lora_run):
    import lm_eval
    from lm_eval.tasks import TaskManager

    workdir, export, tasks = lora_run
    out = subprocess.run([sys.executable, "-m", "jaxft.cli", "eval", "--workdir", str(workdir), "--lm-eval", TASKS,
                          "--lm-eval-include", str(tasks), "--max-length", str(MAX_LENGTH), "--batch-size", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    ours = json.load(open(workdir / "lm_eval" / "results.json"))["results"]

    reference = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(export), "dtype": "float32", "max_length": MAX_LENGTH},
        tasks=TASKS.split(","), task_manager=TaskManager(include_path=str(tasks)), batch_size=4, device="cpu",
        log_samples=True, bootstrap_iters=0)
    theirs = reference["results"]

    # the demo run learned the facts: both sides see it, and agree exactly on accuracy and exact match
    assert theirs["jaxft_facts_mc"]["acc,none"] >= 0.9 and theirs["jaxft_facts_gen"]["exact_match,none"] >= 0.8, theirs
    for task, metric in [("jaxft_facts_mc", "acc,none"), ("jaxft_facts_mc", "acc_norm,none"),
                         ("jaxft_facts_gen", "exact_match,none"), ("jaxft_topics_continue", "exact_match,none")]:
        assert ours[task][metric] == theirs[task][metric], (task, metric, ours[task], theirs[task])
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["jaxft_topics_ppl"][metric] == pytest.approx(theirs["jaxft_topics_ppl"][metric], rel=1e-5)

    print("\n[lm-eval] jaxft:", {t: {k: v for k, v in m.items() if "," in k and "stderr" not in k} for t, m in ours.items()})
    # request by request: log-likelihoods within 1e-4, the same greedy flags, the same generations
    for task in TASKS.split(","):
        mine = _responses(map(json.loads, open(workdir / "lm_eval" / f"samples_{task}.jsonl")))
        reference_rows = _responses(reference["samples"][task])
        assert mine.keys() == reference_rows.keys() and len(mine) >= 6
        for doc in mine:
            for a, b in zip(mine[doc], reference_rows[doc], strict=True):
                if task in GENERATION:
                    assert a == b, (doc, a, b)
                elif task == "jaxft_facts_mc":  # [log-likelihood, is-greedy]
                    assert abs(a[0][0] - b[0][0]) <= 1e-4 and a[0][1] == b[0][1], (doc, a, b)
                else:  # rolling: one total per text, over several 48-token windows
                    assert abs(a[0] - b[0]) <= 1e-4, (doc, a, b)
    # the run's report gained the table
    report = json.load(open(workdir / "report.json"))
    assert {r["task"] for r in report["lm_eval"]} == set(TASKS.split(","))
    assert "lm-evaluation-harness" in open(workdir / "report.html").read()
    assert "jaxft_facts_mc" in out.stdout


def test_rolling_windows_span_the_text(lora_run):
    """The rolling task is not one window per text: the 48-token limit cuts each into several."""
    from transformers import AutoTokenizer

    _, export, tasks = lora_run
    tokenizer = AutoTokenizer.from_pretrained(export)
    lengths = [len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in open(tasks / "ppl.jsonl")]
    assert min(lengths) > MAX_LENGTH, lengths


def test_hf_folder_and_errors(lora_run, tmp_path):
    """--model on an HF folder runs the same way, with --limit."""
    from jaxft import harness

    _, export, tasks = lora_run
    out = subprocess.run([sys.executable, "-m", "jaxft.cli", "eval", "--model", str(export), "--lm-eval",
                          "jaxft_facts_mc", "--lm-eval-include", str(tasks), "--limit", "5", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert results["n-samples"]["jaxft_facts_mc"]["effective"] == 5
    assert harness._bucket(17, 48) == 32 and harness._bucket(3, 48) == 16 and harness._bucket(40, 48) == 48
