"""The notebook executes end to end (small budget) and is stored without outputs."""

from __future__ import annotations

import signal
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "anysize_finetune.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSIZE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp() lands in this test's folder
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    sigint = signal.getsignal(signal.SIGINT)
    try:
        client.execute()
    finally:  # the client leaves Python's Ctrl-C handler installed in this process (an xdist worker had it ignored)
        signal.signal(signal.SIGINT, sigint)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "zero-shot at 64 px" in text and "pos_embed: resampled: grid 8x8 -> 16x16" in text
