"""notebooks/quickstart.ipynb runs top to bottom and its run reaches the quickstart's bar.

Executed with nbclient in a temp folder (its CSV log goes there); it reads only the committed assets.
"""

import re
import warnings
from pathlib import Path

import nbformat
from conftest import quiet_trainer
from nbclient import NotebookClient

from dpo_lightning import DPOModule, PreferenceDataModule

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_learns(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    accuracy = float(re.search(r"final val/rewards/accuracies: ([0-9.]+)", printed).group(1))
    assert accuracy >= 0.9
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def seed_rows() -> dict[str, list[str]]:
    """The seed tutorial's 4-row dict of columns, in the ASCII tokenizer's alphabet."""
    return {"prompt": ["hello", "how are you", "What is your name?", "Which is the best programming language?"],
            "chosen": [" hi nice to meet you", " I am fine", " My name is Mary", " Python"],
            "rejected": [" leave me alone", " I am not fine", " Whats it to you?", " Javascript"]}


def test_a_run_without_eval_data_says_so_once_naming_the_settings(tiny_llama, tmp_path):
    data = PreferenceDataModule(dataset=seed_rows(), tokenizer=tiny_llama, max_length=48, max_prompt_length=24,
                                batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, max_steps=2).fit(DPOModule(tiny_llama), data)
    ours = [str(w.message) for w in caught if "no validation data" in str(w.message)]
    assert len(ours) == 1
    for setting in ("eval_dataset", "eval_split", "eval_fraction"):
        assert f"--data.{setting}" in ours[0]
    with warnings.catch_warnings(record=True) as caught:  # held-out pairs given: nothing said
        warnings.simplefilter("always")
        data = PreferenceDataModule(dataset=seed_rows(), tokenizer=tiny_llama, max_length=48, max_prompt_length=24,
                                    eval_fraction=0.25)
        quiet_trainer(tmp_path, max_steps=1).fit(DPOModule(tiny_llama), data)
    assert not [w for w in caught if "no validation data" in str(w.message)]
