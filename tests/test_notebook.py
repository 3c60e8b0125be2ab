"""The Colab/TPU demo notebook (`notebooks/kunjax_demo.ipynb`) runs top to bottom on CPU with small settings, in
a fresh kernel, and writes its plots; its outputs are stripped in git."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kunjax_demo.ipynb"


class LiveCounting(NotebookClient):
    """Counts the figure redraws a cell sends while it runs (`update_display_data`)."""

    updates = 0

    def process_message(self, msg, cell, cell_index):
        if msg.get("msg_type") == "update_display_data":
            self.updates += 1
        return super().process_message(msg, cell, cell_index)


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(1200)
def test_the_notebook_runs_top_to_bottom_on_cpu_and_writes_its_plots(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("KUNJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("KUNJAX_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = LiveCounting(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert client.updates >= 3, "the burst's figure was not redrawn while it ran"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "passages recited exactly" in text and "drop" in text and "restore" in text, text[-2000:]
    for png in (out / "live_burst.png", out / "bench" / "ttft_p99.png", out / "bench" / "timeline.png"):
        assert png.is_file() and png.stat().st_size > 10_000, png
