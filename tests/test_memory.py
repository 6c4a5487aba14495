"""miniai.memory: a failed cell's tensors are freed, in plain Python and in a real Jupyter kernel."""
import sys
import weakref

import nbformat
import torch
from nbclient import NotebookClient

from miniai.memory import clean_ipython_hist, clean_mem, clean_tb


def test_clean_mem_outside_ipython_is_safe():
    def fail():
        big = torch.ones(1000)
        fail.ref = weakref.ref(big)
        raise RuntimeError
    try: fail()
    except RuntimeError: sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()
    assert fail.ref() is not None
    clean_mem()
    assert fail.ref() is None and not hasattr(sys, 'last_traceback')
    clean_tb()   # nothing left to clean: still fine


def test_clean_mem_releases_a_failed_cells_tensors_in_a_real_kernel():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in [
        "import torch, weakref\nfrom miniai.memory import clean_mem\n"
        "def fails():\n    big = torch.zeros(10_000_000)\n    fails.ref = weakref.ref(big)\n    raise RuntimeError('boom')",
        "fails()",                                  # an uncaught error, as a user would get
        "alive_before = fails.ref() is not None\nclean_mem()\nprint(alive_before, fails.ref() is not None)",
    ]])
    NotebookClient(nb, timeout=120, kernel_name='python3', allow_errors=True).execute()
    assert nb.cells[1].outputs[0].output_type == 'error'
    assert nb.cells[2].outputs[0].text.split() == ['True', 'False']


def test_clean_ipython_hist_forgets_inputs_and_outputs_in_a_real_kernel():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in [
        "from miniai.memory import clean_ipython_hist\nbig = 'x' * 1000",
        "big",                                      # an output: kept in `_`, `_2` and `Out`
        "print(len(Out), '_i1' in globals(), '_2' in globals())\nclean_ipython_hist()\n"
        "print(len(Out), '_i1' in globals(), '_2' in globals(), repr(_i), len(In[1]))",
    ]])
    NotebookClient(nb, timeout=120, kernel_name='python3').execute()
    assert nb.cells[2].outputs[0].text.split('\n')[:2] == ['1 True True', "0 False False '' 0"]

