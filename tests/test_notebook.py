"""notebooks/quickstart.ipynb runs top to bottom and its run reaches the quickstart's bar.

Executed with nbclient in a temp folder (its CSV log goes there); it reads only the committed assets.
"""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_learns(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    accuracy = float(re.search(r"final val/rewards/accuracies: ([0-9.]+)", printed).group(1))
    assert accuracy >= 0.9
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
