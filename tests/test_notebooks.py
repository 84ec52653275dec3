"""The notebooks run top to bottom (with a short training budget)."""
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _execute(name: str, tmp_path, timeout: int):
    """(printed text, number of PNG outputs) of the executed notebook."""
    nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return outputs, len(images)


@pytest.mark.slow
def test_reward_modeling_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_NB_STEPS", "12")
    outputs, images = _execute("reward_modeling.ipynb", tmp_path, timeout=600)
    assert "ava_p: test accuracy" in outputs and "bt: test accuracy" in outputs
    assert images == 2


@pytest.mark.slow
def test_direct_optimisation_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_NB_STEPS", "4")
    monkeypatch.setenv("AVA_NB_SMALL", "1")
    outputs, images = _execute("direct_optimisation.ipynb", tmp_path, timeout=900)
    assert "dpo: gold reward" in outputs and "ava_p: gold reward" in outputs and "=== dpo" in outputs
    assert images == 2


@pytest.mark.slow
def test_ppo_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_NB_SMALL", "1")
    outputs, images = _execute("ppo.ipynb", tmp_path, timeout=900)
    assert "dense: gold reward" in outputs and "sparse: gold reward" in outputs and "=== dense" in outputs
    assert images == 2
