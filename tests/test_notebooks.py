"""The notebooks run top to bottom (with a short training budget)."""
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_reward_modeling_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_NB_STEPS", "12")
    path = os.path.join(REPO, "notebooks", "reward_modeling.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ava_p: test accuracy" in outputs and "bt: test accuracy" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


@pytest.mark.slow
def test_direct_optimisation_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_NB_STEPS", "4")
    monkeypatch.setenv("AVA_NB_SMALL", "1")
    path = os.path.join(REPO, "notebooks", "direct_optimisation.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "dpo: gold reward" in outputs and "ava_p: gold reward" in outputs and "=== dpo" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
