"""colab/finetune.ipynb runs top to bottom on CPU in demo mode (the bundled tiny model, no download):
plan, fine-tune, generate, export, reload — and each step does what it says.

The notebook is executed as Colab would, in a fresh Jupyter kernel (nbclient + ipykernel), with the
parameters injected after its `parameters` cell as papermill does (MODEL="demo", INSTALL=False: the
install cell would pip-install jaxft from git).
"""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "finetune.ipynb")


def _with_parameters(nb, **values):
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged `parameters`"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def test_notebook_parameters_offer_every_model():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    source = "\n".join(cell.source for cell in nb.cells)
    for name in ("google/gemma-2b", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.1-8B"):
        assert name in source
    assert 'quantize="nf4"' in source and "jaxft[tpu] @ git+" in source


def test_notebook_runs_the_demo_end_to_end(tmp_path, monkeypatch):
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), MODEL="demo", INSTALL=False, WORKDIR=str(tmp_path))
    # The kernel inherits this environment: one CPU device, like a laptop (the suite's 8 fake devices
    # would run the same code, slower).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["fits"] is True and 0 < result["plan_total_gib"] < 1  # planned against a v5e's 16 GB
    assert result["before"] < 0.2 and result["after"] >= 0.9 and result["after"] > result["before"]
    assert result["format"] == "hf" and os.path.isfile(os.path.join(result["export_dir"], "config.json"))
    assert result["reloaded"] == pytest.approx(result["after"])  # the export answers as the trained model did
    assert len(result["generated"]) == 4 and all(result["generated"])
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "fits" in printed and "transformers:" in printed
