"""jaxft make-student: the first N decoder layers of an HF folder, loadable in transformers and jaxft."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxft
from jaxft import cli
from jaxft.testing import tiny_hf_model

transformers = pytest.importorskip("transformers")


def test_make_student_keeps_the_first_layers(tmp_path, capsys):
    folder, _ = tiny_hf_model(tmp_path / "teacher", "llama3_rope", num_hidden_layers=3)
    config = json.load(open(f"{folder}/config.json"))
    config["layer_types"] = ["full_attention"] * 3  # a per-layer list: cut with the layers
    json.dump(config, open(f"{folder}/config.json", "w"))
    assert cli.main(["make-student", "--model", folder, "--layers", "2", "--out", str(tmp_path / "student")]) == 0
    student = json.load(open(tmp_path / "student" / "config.json"))
    assert student["num_hidden_layers"] == 2 and student["layer_types"] == ["full_attention"] * 2
    original, kept = load_file(f"{folder}/model.safetensors"), load_file(tmp_path / "student" / "model.safetensors")
    assert not any(k.startswith("model.layers.2.") for k in kept)
    assert set(kept) == {k for k in original if not k.startswith("model.layers.2.")}
    for key, value in kept.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert model.config.num_hidden_layers == 2
    assert jaxft.from_pretrained(str(tmp_path / "student")).config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"a student keeps 1\.\.3 layers, not 4"):
        cli.main(["make-student", "--debug", "--model", folder, "--layers", "4", "--out", str(tmp_path / "bad")])
    capsys.readouterr()
    assert cli.main(["make-student", "--model", folder, "--layers", "4", "--out", str(tmp_path / "bad")]) == 1
    assert capsys.readouterr().err == (f"jaxft make-student: error: {folder}/config.json: num_hidden_layers is 3; "
                                       "a student keeps 1..3 layers, not 4\n")
