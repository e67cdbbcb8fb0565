"""A new objective defined here, outside jaxft, trains through jaxft.train.train with no edit to
jaxft: "predict the parity of the next token" with a head of its own (Task.attach), its own loss
on the hidden states, its own eval metric and config section. It learns, resumes exactly, and is
refused with the messages its validate() gives."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft import sharding, tasks, train
from jaxft.demo.config import get_config as demo_config
from jaxft.losses import hidden_states
from jaxft.models.layers import Axis, Linear
from jaxft.peft.lora import OUTPUT_HEAD, linear_modules
from jaxft.tasks.base import Task, need
from jaxft.tasks.causal_lm import TASK as CAUSAL_LM


class ParityLoss:
    """Cross-entropy of the parity head's two logits against (next token id) mod 2 on the trained
    tokens, with label smoothing; mean over those tokens of the whole batch."""

    def __init__(self, smoothing: float):
        self.smoothing = smoothing

    def normalizer(self, batch):
        return batch["loss_mask"].astype(jnp.float32).sum()

    def sums(self, model, batch):
        logits = model.parity(hidden_states(model, batch)).astype(jnp.float32)  # [B, T, 2]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        target = jax.nn.one_hot(batch["targets"] % 2, 2)
        target = target * (1 - self.smoothing) + self.smoothing / 2
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = -(target * log_probs).sum(-1) * mask
        right = (jnp.argmax(logits, -1) == batch["targets"] % 2) * mask
        return nll.sum(), right.sum()

    def loss(self, model, batch, normalizer):
        nll, right = self.sums(model, batch)
        return nll / normalizer, {"parity_accuracy": right / normalizer}


class Parity(Task):
    name = "parity"
    section = "parity"
    resume_keys = ("parity.smoothing",)

    def defaults(self):
        c = ml_collections.ConfigDict()
        c.smoothing = 0.0  # label smoothing of the two parity classes
        return c

    def validate(self, config):
        CAUSAL_LM.validate(config)  # the same data and loss-chunk rules
        need(0.0 <= config.parity.smoothing < 1.0, f"parity.smoothing must be in [0, 1), got {config.parity.smoothing}")

    def attach(self, model, config, *, training, mesh=None, abstract=False):
        hidden = model.model.spec.hidden_size
        model.parity = Linear(hidden, 2, use_bias=False, axes=(None, Axis.EMBED), param_dtype=jnp.float32, dtype=model.dtype,
                              rngs=nnx.Rngs(config.train.seed))
        return model

    def lora_targets(self, model, targets):
        if targets != "all-linear":
            return targets
        return tuple(sorted({path[-1] for path in linear_modules(model)} - {"parity", OUTPUT_HEAD}))  # the head trains whole

    def trainable(self, predicate):
        return lambda path, variable: path.startswith("parity.") or predicate(path, variable)

    def data(self, config, tokenizer):
        return CAUSAL_LM.data(config, tokenizer)  # the pipeline's targets are the next tokens: their parity is ours

    def batch_spec(self, config, rows):
        return CAUSAL_LM.batch_spec(config, rows)

    def objective(self, config):
        return ParityLoss(config.parity.smoothing)

    def eval_step(self, model_def, mesh, config):
        loss = ParityLoss(0.0)

        def eval_step(params, frozen, batch):
            nll, right = loss.sums(model_def.merge(params, frozen), batch)
            return {"nll_sum": nll, "num_targets": loss.normalizer(batch), "right": right}

        return jax.jit(eval_step)

    def evaluate(self, eval_step, params, frozen, data, mesh):
        batches = data.validation_batches()
        if not batches:
            return None
        totals = {"nll_sum": 0.0, "num_targets": 0.0, "right": 0.0}
        for batch in batches:
            out = eval_step(params, frozen, sharding.global_batch(batch, mesh))
            totals = {k: v + float(out[k]) for k, v in totals.items()}
        return {"eval_loss": totals["nll_sum"] / totals["num_targets"],
                "parity_accuracy": totals["right"] / totals["num_targets"]}


@pytest.fixture
def parity_task():
    tasks.register(Parity())
    yield
    tasks.unregister("parity")


DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "demo.py")


def parity_config(workdir, **train_overrides):
    config = demo_config()  # the bundled model, its facts as prompt/completion rows, LoRA r8
    config.task = "parity"
    config.workdir = str(workdir)
    config.eval.task_file = None
    config.train.schedule = "constant"  # so that a run stopped at 2 and continued to 4 is the run of 4
    config.train.warmup_steps = 0
    config.train.learning_rate = 3e-3
    config.lora.dropout = 0.1  # the step RNG must resume too
    config.checkpoint.async_save = False
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_a_plugin_objective_learns_through_the_train_loop(parity_task, tmp_path):
    summary = train.train(parity_config(tmp_path / "run", steps=24))
    losses = [r["loss"] for r in rows(tmp_path / "run") if "loss" in r]
    print(f"\n[parity plug-in] loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {summary['eval']}")
    assert losses[0] == pytest.approx(0.693, abs=0.1)  # a fresh head: about a coin toss
    assert losses[-1] < 0.5 * losses[0]
    assert summary["eval"]["parity_accuracy"] > 0.8  # its own eval metric, in the report
    assert "parity_accuracy" in rows(tmp_path / "run")[0]  # and its own train metric, in metrics.jsonl
    trained = run_lib.restore(str(tmp_path / "run"))  # export/eval path: the head is a trained param
    assert trained.params["parity.weight"].shape == (2, 128) and trained.step == 24


def test_a_plugin_objective_resumes_exactly(parity_task, tmp_path):
    straight = train.train(parity_config(tmp_path / "a", steps=4))
    train.train(parity_config(tmp_path / "b", steps=2))
    resumed = train.train(parity_config(tmp_path / "b", steps=4))
    assert resumed["resumed_from"] == 2 and resumed["data"]["batches"] == straight["data"]["batches"] == 4
    loss = lambda workdir: {r["step"]: r["loss"] for r in rows(workdir) if "loss" in r}  # noqa: E731
    assert loss(tmp_path / "b") == loss(tmp_path / "a")
    a, b = run_lib.restore(str(tmp_path / "a")), run_lib.restore(str(tmp_path / "b"))
    for path, value in a.params.items():
        assert jnp.array_equal(value, b.params[path]), path
    # Its own resume key: a changed smoothing is another run.
    changed = parity_config(tmp_path / "b", steps=6)
    changed.parity.smoothing = 0.1
    with pytest.raises(run_lib.ResumeMismatchError, match=r"parity\.smoothing: 0\.0 → 0\.1"):
        train.train(changed)


def test_a_plugin_objective_owns_its_config_section(parity_task):
    config = config_lib.load(DEMO, ["--config.task=parity", "--config.parity.smoothing=0.2"])
    assert config_lib.get(config, "parity.smoothing") == 0.2
    with pytest.raises(KeyError, match="unknown config key 'parity.smothing'; did you mean parity.smoothing"):
        config_lib.load(DEMO, ["--config.parity.smothing=0.2"])
    config.parity.smoothing = 1.5
    with pytest.raises(ValueError, match=r"parity.smoothing must be in \[0, 1\), got 1.5"):
        config_lib.validate(config)
