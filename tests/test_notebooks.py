"""Both notebooks run top to bottom (on the CPU, in a scratch directory) and are committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["attention_maps.ipynb", "ablations.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DIR", str(tmp_path / "no_sweep_yet"))  # the ablation notebook runs its demo sweep
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if name == "attention_maps.ipynb":  # 4 layers of maps + the shift plot + 3 items x 4 methods of kept masks
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert len(images) >= 4 + 1 + 12


def test_the_notebooks_are_what_make_notebooks_writes(tmp_path):
    import runpy

    mod = runpy.run_path(str(REPO / "notebooks" / "make_notebooks.py"))
    for name, cells in (("attention_maps.ipynb", mod["ATTENTION"]), ("ablations.ipynb", mod["ABLATIONS"])):
        committed = nbformat.read(REPO / "notebooks" / name, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in cells], f"run notebooks/make_notebooks.py ({name})"
