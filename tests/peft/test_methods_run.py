"""Each of prefix tuning, prompt tuning (text init) and (IA)³ through `jaxft train` on the bundled
demo model: 2 steps, then a resume to 4, equal a straight 4-step run (losses and adapter weights);
the run's adapter is all that trains and all that is checkpointed; `jaxft plan` counts each method's
trained parameters and the prefix's extra key/value length."""

import json
import os

import jax
import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft import run as run_lib
from jaxft import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.py")
METHODS = {"prefix_tuning": ["--config.peft.prefix_projection=True"],
           "prompt_tuning": ["--config.peft.prompt_tuning_init=TEXT", "--config.peft.prompt_tuning_init_text=Q: A:"],
           "ia3": []}


def run(workdir, steps, method):
    config = config_lib.load(DEMO, [f"--config.workdir={workdir}", f"--config.train.steps={steps}",
                                    "--config.train.warmup_steps=0",
                                    "--config.train.schedule=constant", "--config.checkpoint.every=2",
                                    "--config.checkpoint.async_save=False", "--config.eval.task_file=None",
                                    "--config.data.validation=None", "--config.data.seq_len=32",
                                    f"--config.peft.method={method}", "--config.peft.num_virtual_tokens=4",
                                    *METHODS[method]])
    return train.train(config)


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "prefix_tuning" else pytest.mark.slow)
                                    for m in sorted(METHODS)])  # ~1 min each on 2 busy cores: one runs by default
def test_two_plus_two_steps_equal_four(method, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, 4, method)
    run(resumed, 2, method)
    assert run(resumed, 4, method)["resumed_from"] == 2
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    first, second = (run_lib.restore(str(w)) for w in (straight, resumed))
    assert first.step == second.step == 4
    prefix = "model.virtual." if method != "ia3" else "model.layers."
    assert first.params and all(p.startswith(prefix) for p in first.params), sorted(first.params)
    for path, value in first.params.items():
        np.testing.assert_array_equal(np.asarray(jax.device_get(value)), np.asarray(jax.device_get(second.params[path])),
                                      err_msg=path)
    export_and_check(str(straight), first, method, tmp_path)


@pytest.mark.parametrize("method, extra", [("prefix_tuning", []), ("prefix_tuning", ["--config.peft.prefix_projection=True"]),
                                           ("prompt_tuning", []), ("ia3", [])])
def test_plan_counts_each_methods_params(method, extra):
    from jaxft import plan

    config = config_lib.load(DEMO, [f"--config.peft.method={method}", "--config.peft.num_virtual_tokens=5", *extra])
    result = plan.plan(config, device="v5e", advise=False)
    layers, hidden, kv_dim, mlp = 4, 128, 2 * 32, 384  # the bundled model: 4 layers, hidden 128, 2 kv heads × 32
    projection = bool(extra)
    expected = {"prefix_tuning": 5 * kv_dim + kv_dim * (kv_dim + 1) + layers * 2 * kv_dim * (kv_dim + 1) if projection
                else 5 * layers * 2 * kv_dim,
                "prompt_tuning": 5 * hidden,
                "ia3": layers * (kv_dim + kv_dim + mlp)}[method]  # llama: k_proj, v_proj out; down_proj in
    assert result.estimate.settings["trainable_params"] == expected
    assert result.estimate.settings["virtual_tokens"] == (5 if method != "ia3" else 0)
    assert f"{expected:,} trained params" in result.header
    if method == "prefix_tuning":
        assert "+5 key/value positions per sequence" in result.header


def export_and_check(workdir, trained, method, tmp_path):
    """`jaxft export` of the run: --format peft loads in PeftModel with the run's logits; --format hf
    merges IA³ (same logits) and is refused for prefix/prompt tuning, naming --format peft."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from jaxft import export
    from jaxft.demo import MODEL_DIR
    from jaxft.testing import demo_batch

    ids, mask, positions = demo_batch(["Q: Where does Hialan Riareal live?\nA: Redwater", "Q: Who?\nA:"])
    ours = np.asarray(trained.model()(ids, attention_mask=mask))
    export.export(workdir, str(tmp_path / "adapter"), format="peft")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32),
                                            str(tmp_path / "adapter")).eval()
    with torch.no_grad():  # right-padded rows: PEFT's positions are ours (prompt tuning counts from its tokens)
        theirs = loaded(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                        position_ids=torch.as_tensor(positions)).logits.numpy()
    theirs = theirs[:, 4:] if method == "prompt_tuning" else theirs
    assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4
    if method == "ia3":
        export.export(workdir, str(tmp_path / "hf"), format="hf")
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = merged(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            position_ids=torch.as_tensor(positions)).logits.numpy()
        assert np.abs(ours - logits)[mask.astype(bool)].max() <= 1e-5
    else:
        with pytest.raises(ValueError, match=f"trained {method}: its virtual tokens cannot be merged.*--format peft"):
            export.export(workdir, str(tmp_path / "hf"), format="hf")
