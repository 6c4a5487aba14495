"""Every lesson runs top to bottom in a real Jupyter kernel, in smoke mode (small subset, few batches)."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).resolve().parent.parent/'notebooks').glob('[0-9][0-9]_*.ipynb'))


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, monkeypatch):
    monkeypatch.setenv('MINIAI_SMOKE', '1')
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
    assert not errors


def test_there_are_lessons():
    assert len(NBS) >= 1
