"""task=distill: the divergences equal TRL's GKD `generalized_jsd_loss` and torch's kl_div; chunked
equals whole (and holds less); the demo student learns the teacher and its export gives the same
KL in transformers; on-policy steps sample as jaxft generate does; resume is exact; a teacher with
another tokenizer is refused before any weight is read."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import cli, plan, sharding, step
from jaxft import config as config_lib
from jaxft import train
from jaxft import run as run_lib
from jaxft.demo import MODEL_DIR, distill as distill_demo
from jaxft.tasks.distill import DistillLoss, divergence, on_policy_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")


def _trl_loss(student, teacher, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(torch.as_tensor(student), torch.as_tensor(teacher), torch.as_tensor(labels),
                                           beta=beta, temperature=temperature).item()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])  # 0.25: a mixture whose two sides differ
def test_divergence_equals_trl_gkd(beta, temperature):
    rng = np.random.RandomState(0)
    student, teacher = (rng.randn(3, 7, 50).astype(np.float32) * 3 for _ in range(2))
    labels = rng.randint(0, 50, (3, 7))
    labels[0, :3] = -100  # a prompt, and padding
    labels[2, 5:] = -100
    mask = labels != -100
    ours = float((divergence(jnp.asarray(student), jnp.asarray(teacher), beta, temperature) * mask).sum() / mask.sum())
    expected = _trl_loss(student, teacher, labels, beta, temperature)
    print(f"\n[distill β={beta} T={temperature}] jaxft {ours:.7f} TRL {expected:.7f}")
    assert abs(ours - expected) <= 1e-5
    if beta in (0.0, 1.0):  # and the two KLs as torch's kl_div computes them (kl_div(input, target) = KL(target ‖ input))
        s = torch.log_softmax(torch.as_tensor(student) / temperature, -1)
        t = torch.log_softmax(torch.as_tensor(teacher) / temperature, -1)
        first, second = (s, t) if beta == 0.0 else (t, s)
        kl = torch.nn.functional.kl_div(first, second, reduction="none", log_target=True).sum(-1)
        assert abs(ours - float(kl[torch.as_tensor(mask)].mean())) <= 1e-5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's teacher and student (made once), and a distillation run of them."""
    workdir = str(tmp_path_factory.mktemp("distill") / "demo")
    assert cli.main(["demo", "--variant", "distill", "--workdir", workdir, "--config.checkpoint.async_save=False"]) == 0
    return workdir


def _eval_rows(workdir):
    return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "eval_loss" in r]


def test_demo_student_learns_the_teacher_and_its_export_agrees(demo):
    evals = _eval_rows(demo)
    before, after = evals[0]["distill_loss"], evals[-1]["distill_loss"]
    report = json.load(open(os.path.join(demo, "report.json")))
    print(f"\n[distill demo] held-out KL {before:.3f} -> {after:.3f}; exact match "
          f"{report['task']['before']['exact_match']:.0%} -> {report['task']['after']['exact_match']:.0%}")
    assert evals[0]["step"] == 0 and after <= 0.3 * before
    assert report["task"]["after"]["exact_match"] > report["task"]["before"]["exact_match"]
    assert evals[-1]["teacher_ce"] == evals[0]["teacher_ce"]  # the teacher is frozen

    # The exported student in transformers, against the teacher folder in transformers: the same KL.
    config = config_lib.with_values(distill_demo.get_config("", demo), {"data.packing": False})  # torch has no segments
    data = jaxft.tasks.get("distill").data(config, transformers.AutoTokenizer.from_pretrained(MODEL_DIR))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    training, _ = run_lib.restore_training(demo, mesh=mesh)  # the trained student, its teacher attached
    task = jaxft.tasks.get("distill")
    ours = task.evaluate(task.eval_step(training.model_def, mesh, config), training.state.params, training.state.frozen,
                         data, mesh)["distill_loss"]
    student = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(demo, "hf"), dtype=torch.float32).eval()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(config.distill.teacher, dtype=torch.float32).eval()
    total = count = 0.0
    for batch in data.validation_batches():
        ids, mask = torch.as_tensor(batch["input_ids"], dtype=torch.long), torch.as_tensor(batch["attention_mask"])
        positions = torch.as_tensor(batch["positions"], dtype=torch.long)
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
            t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
        kl = (t.exp() * (t - s)).sum(-1).numpy()
        total += float((kl * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    print(f"[distill demo] KL of the exported student in transformers {total / count:.4f} vs jaxft's {ours:.4f}")
    assert abs(total / count - ours) <= 1e-3


def test_chunked_equals_whole_and_holds_less(tmp_path):
    """train.loss_chunk: the same loss and gradients (≤1e-6), and on a 32k vocabulary a compiled
    step that needs less memory than the unchunked one (both models' [B, T, V] logits avoided)."""
    hf_config = {"model_type": "llama", "vocab_size": 32768, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    student, teacher = jaxft.init_random(hf_config, seed=0), jaxft.init_random(hf_config, seed=1)
    student.teacher = teacher
    model_def, params, frozen = step.split_model(student, lambda p, v: not p.startswith("teacher."))
    from jaxft.testing import train_batch

    batch = {k: jnp.asarray(v) for k, v in train_batch(32768, batch=2, length=32, seed=3).items()}
    results = {}
    for chunk in (0, 8):
        objective = DistillLoss(beta=0.5, temperature=2.0, alpha=0.7, chunk=chunk)
        results[chunk] = jax.value_and_grad(step.make_loss_fn(model_def, objective), has_aux=True)(
            params, frozen, batch, objective.normalizer(batch), None)
    (loss, metrics), grads = results[0]
    (chunked, chunked_metrics), chunked_grads = results[8]
    np.testing.assert_allclose(chunked, loss, rtol=1e-6)
    np.testing.assert_allclose(chunked_metrics["teacher_ce"], metrics["teacher_ce"], rtol=1e-6)
    for path in grads:
        np.testing.assert_allclose(chunked_grads[path], grads[path], atol=1e-6, err_msg=path)

    config = distill_demo.get_config("smoke", str(tmp_path / "run"))
    config = config_lib.with_values(config, {"model.path": str(folder), "distill.teacher": str(folder),
                                             "data.seq_len": 256, "train.batch_size": 4, "mesh.shape": {"data": 1}})
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    whole = plan.compiled_memory(config_lib.with_values(config, {"train.loss_chunk": 0}), hf_config, sizes)["peak"]
    chunks = plan.compiled_memory(config_lib.with_values(config, {"train.loss_chunk": 32}), hf_config, sizes)["peak"]
    print(f"\n[distill, vocab 32768, 4 × 256 tokens] compiled step {whole / 2**20:.1f} MiB whole, "
          f"{chunks / 2**20:.1f} MiB in chunks of 32")
    assert chunks < 0.7 * whole


def test_on_policy_samples_as_generate_does(demo):
    """λ = 1: every step trains on the student's own completions; greedy ones are jaxft generate's."""
    from jaxft.generate import generate

    config = distill_demo.get_config("", demo)
    config = config_lib.with_values(config, {"data.packing": False})
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    data = jaxft.tasks.get("distill").data(config, tokenizer)
    batch = next(iter(data.validation_batches()))
    facts = jaxft.tasks.get("causal_lm").data(config_lib.with_values(config, {"data.train": distill_demo.MIXTURE[0]["path"],
                                                                               "data.format": "prompt_completion",
                                                                               "data.weights": None}), tokenizer)
    batch = next(facts.train_iterator())
    model = jaxft.from_pretrained(MODEL_DIR)
    out = on_policy_batch(model, batch, 6, tokenizer.eos_token_id, 0, temperature=0.0, seed=0)
    for row in range(len(batch["input_ids"])):
        start = int(np.argmax(batch["loss_mask"][row] > 0))
        prompt = batch["input_ids"][row, :start + 1].tolist()
        expected = generate(model, [prompt], 6, eos_id=tokenizer.eos_token_id, pad_id=0)[0]
        trained = out["targets"][row][out["loss_mask"][row] > 0].tolist()
        assert out["input_ids"][row, :start + 1].tolist() == prompt and trained == expected, row
    # And a run with λ = 1 trains on them.
    run_config = config_lib.with_values(distill_demo.get_config("smoke", demo), {
        "workdir": os.path.join(demo, "on_policy"), "data.packing": False, "distill.on_policy_fraction": 1.0,
        "distill.sampling_temperature": 0.0, "distill.max_new_tokens": 8, "checkpoint.async_save": False,
        "eval.task_file": None, "eval.at_start": False})
    summary = train.train(run_config)
    assert summary["step"] == 4 and np.isfinite(summary["eval_loss"])


def test_resume_is_exact(demo, tmp_path):
    common = {"train.schedule": "constant", "train.warmup_steps": 0, "checkpoint.async_save": False,
              "train.eval_every": 0, "eval.at_start": False, "eval.task_file": None, "data.packing": False,
              "distill.on_policy_fraction": 0.5, "distill.max_new_tokens": 6}  # some steps on-policy, some not
    load = lambda name, steps: config_lib.with_values(distill_demo.get_config("smoke", demo), {  # noqa: E731
        **common, "workdir": str(tmp_path / name), "train.steps": steps})
    train.train(load("a", 4))
    train.train(load("b", 2))
    resumed = train.train(load("b", 4))
    assert resumed["resumed_from"] == 2
    losses = lambda w: {r["step"]: r["loss"] for r in map(json.loads, open(w / "metrics.jsonl")) if "loss" in r}  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = run_lib.restore(str(tmp_path / "a")), run_lib.restore(str(tmp_path / "b"))
    for path, value in a.params.items():
        assert jnp.array_equal(value, b.params[path]), path


def test_a_teacher_with_another_tokenizer_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    from jaxft import pretrained
    from jaxft.testing_families import word_tokenizer

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    word_tokenizer(["alpha", "beta", "gamma"]).save_pretrained(teacher)  # a tokenizer, and no weights at all

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the tokenizers were compared")

    monkeypatch.setattr(pretrained, "from_pretrained", never)
    monkeypatch.setattr(run_lib, "from_pretrained", never)
    config = config_lib.with_values(distill_demo.get_config("smoke", str(tmp_path / "run")), {
        "model.path": MODEL_DIR, "distill.teacher": str(teacher)})
    with pytest.raises(ValueError, match=rf"distill.teacher {teacher}: its tokenizer is not the student's \(vocabulary "
                                         r"\d+ vs 1024 tokens; first difference at id \d+: .* \(teacher\) vs .* \(student\)\)"):
        train.train(config)


def test_the_plan_counts_the_teacher(demo):
    """jaxft plan of a distillation: the frozen teacher (all of it) beside the student, and an
    estimate within 20% of the compiled step."""
    config = config_lib.with_values(distill_demo.get_config("", demo), {"mesh.shape": {"data": 1}})
    result = plan.plan(config, compile=True, num_devices=1)
    teacher = jaxft.init_random(json.load(open(os.path.join(config.distill.teacher, "config.json"))))
    teacher_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(__import__("flax").nnx.state(teacher)))
    print(f"\n[plan, distill demo] estimate {result.estimate.total / 2**20:.2f} MiB, compiled "
          f"{result.compiled['peak'] / 2**20:.2f} MiB; frozen {result.estimate.get('frozen base') / 2**20:.2f} MiB")
    assert result.estimate.get("frozen base") == teacher_bytes  # the student trains whole: frozen = the teacher
    assert 0.8 < result.estimate.total / result.compiled["peak"] < 1.2, result.table()
