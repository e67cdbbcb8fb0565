"""Named validation sources ({name: spec}): eval rows carry eval_loss/<name> for each, equal to
evaluating that source alone; early stopping can watch one of them."""

import json
import os

import pytest

from jaxft import cli, train
from jaxft import config as config_lib
from jaxft.demo import FACTS_TRAIN
from jaxft.demo.topics import TOPICS_VALID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")
SOURCES = {"facts": FACTS_TRAIN, "sentences": {"path": TOPICS_VALID, "format": "text"}}


def test_each_named_source_is_evaluated_as_it_would_be_alone(tmp_path, capsys):
    workdir = tmp_path / "run"
    summary = train.train(config_lib.load(f"{DEMO}:smoke", [f"--config.workdir={workdir}", f"--config.data.validation={SOURCES}",
                                                              "--config.checkpoint.async_save=False",
                                                              "--config.eval.early_stopping_metric=eval_loss/sentences"]))
    scores = summary["eval"]
    assert {"eval_loss", "eval_loss/facts", "eval_loss/sentences"} <= set(scores)
    assert scores["eval_loss/facts"] != scores["eval_loss/sentences"]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eval_loss"' in line]
    assert all("eval_loss/facts" in r for r in rows)
    for name, spec in SOURCES.items():  # the run's checkpoint on that source alone
        capsys.readouterr()
        assert cli.main(["eval", "--config", DEMO, "--workdir", str(workdir), f"--config.data.validation={spec}"]) == 0
        out = capsys.readouterr().out
        alone = json.loads(out[out.index("{"):])["eval_loss"]
        print(f"\n[per-task eval] {name}: {scores[f'eval_loss/{name}']:.6f} in the mixture's eval, {alone:.6f} alone")
        assert abs(alone - scores[f"eval_loss/{name}"]) <= 1e-6
    # The pooled eval_loss is the token-weighted mean: it lies between the two.
    assert min(scores["eval_loss/facts"], scores["eval_loss/sentences"]) <= scores["eval_loss"] <= \
        max(scores["eval_loss/facts"], scores["eval_loss/sentences"])


def test_an_unknown_early_stopping_metric_is_named(tmp_path):
    config = config_lib.load(f"{DEMO}:smoke", [f"--config.workdir={tmp_path / 'run'}", "--config.eval.early_stopping_metric=eval_loss/nope"])
    with pytest.raises(KeyError, match=r"eval.early_stopping_metric 'eval_loss/nope' is not one of this run's eval metrics"):
        train.train(config)
