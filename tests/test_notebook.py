"""The Colab notebook runs top to bottom on CPU (needs the `notebooks` extra)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  path = os.path.join(ROOT, "experiments", "notebooks", "moska_colab_tpu.ipynb")
  nb = nbformat.read(path, as_version=4)
  # Raises CellExecutionError (with the failing cell) on any error.
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "max |logit diff| =" in outputs and "devices:" in outputs
  # The TPU kernel cells: interpret mode against the reference, lowering for every generation.
  assert "max |o - reference| =" in outputs
  assert outputs.count("lowers to a Mosaic kernel: True") == 4, outputs
