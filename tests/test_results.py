"""The committed lessons and results page: real outputs, consistent with each other, clean for diffs.

Also checks that tools/run_lessons.py stops on a failing notebook, names the cell, and leaves the file untouched.
"""
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('run_lessons', ROOT/'tools'/'run_lessons.py')
run_lessons = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_lessons)
NBS = run_lessons.lessons()


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_committed_notebook_is_a_clean_error_free_run(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert any(c.outputs for c in code), f"{path.name} has no outputs: run `uv run python tools/run_lessons.py {path.name[:2]}`"
    assert not [o for c in code for o in c.outputs if o.output_type == 'error'], f"{path.name} has an error output"
    assert all(c.execution_count is None for c in code), f"{path.name} is not cleaned (execution counts)"
    assert set(nb.metadata) <= {'kernelspec', 'miniai', 'language_info'}, f"{path.name} metadata: {set(nb.metadata)}"
    assert 'full_run_seconds' in nb.metadata.get('miniai', {}), f"{path.name} was not written by the full-run command"


def test_committed_full_run_fits_the_budget():
    "The recorded wall time of the last full run (written by tools/run_lessons.py), not a timing here: 35 minutes in all."
    seconds = {p.stem: nbformat.read(p, as_version=4).metadata['miniai']['full_run_seconds'] for p in NBS}
    assert sum(seconds.values()) <= run_lessons.BUDGET_S, f"full run took {sum(seconds.values()):.0f} s: {seconds}"
    over = {k: v for k, v in seconds.items() if v > run_lessons.lesson_budget(k)}
    assert not over, f"over their own budget (5 min; 8 for {sorted(run_lessons.LONG_LESSONS)}): {over}"


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_committed_notebook_is_small(path):
    size = path.stat().st_size
    assert size <= run_lessons.MAX_NOTEBOOK_BYTES, f"{path.name} is {size/1e3:.0f} KB (at most 400 KB: smaller figures?)"


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_lesson_ends_with_three_to_five_exercises(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'markdown']
    heads = [i for i, c in enumerate(cells) if re.match(r'#+\s*Exercises', c.source)]
    assert heads, f"{path.name} has no Exercises section"
    text = '\n'.join(c.source for c in cells[heads[-1]:])
    n = len(re.findall(r'^\d+\.\s', text, flags=re.M))
    assert 3 <= n <= 5, f"{path.name}: {n} numbered exercises, want 3 to 5"


def _output_numbers(nb) -> list[float]:
    texts = []
    for c in nb.cells:
        for o in c.get('outputs', []) if c.cell_type == 'code' else []:
            texts.append(o.get('text', ''))
            texts += [v for k, v in o.get('data', {}).items() if k.startswith('text/') or k == run_lessons.RESULTS_MIME]
    return [float(x) for t in texts for x in re.findall(r'\d+\.\d+', t if isinstance(t, str) else str(t))]


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_four_digit_numbers_in_prose_are_printed_by_the_notebook(path):
    "Each accuracy-like number in the text (0.dddd) is one that an output of the same notebook shows (to that rounding)."
    nb = nbformat.read(path, as_version=4)
    shown = _output_numbers(nb)
    missing = []
    for c in nb.cells:
        if c.cell_type != 'markdown': continue
        for m in re.findall(r'(?<![\d.])0\.\d{4}(?![\d])', c.source):
            if not any(abs(round(x, 4) - float(m)) < 1e-9 for x in shown): missing.append(m)
    assert not missing, f"{path.name}: prose numbers no output shows: {missing}"


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_committed_outputs_are_clean(path):
    "No stderr, no machine paths, no raw-HTML copies of progress tables in the outputs the current runner wrote."
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata['miniai'].get('outputs_tidied'), f"{path.name}: outputs from an old runner; re-run it"
    for i, c in enumerate(nb.cells):
        for o in c.get('outputs', []) if c.cell_type == 'code' else []:
            assert not (o.output_type == 'stream' and o.name == 'stderr'), f"{path.name} cell {i}: stderr {o.text[:200]!r}"
            text = o.get('text', '') + ''.join(v for k, v in o.get('data', {}).items() if k.startswith('text/'))
            assert not re.search(r'/(work|home|root|tmp|usr)/\S', text), f"{path.name} cell {i}: a machine path"
            assert '```html' not in o.get('data', {}).get('text/markdown', ''), f"{path.name} cell {i}: raw-HTML copy"
            assert not o.get('data', {}).get('text/plain', '').lstrip().startswith('<div'), f"{path.name} cell {i}: raw HTML as text"


def test_results_page_shows_the_notebooks_numbers():
    page = (ROOT/'results'/'results.md').read_text()
    rows = run_lessons.collect()
    assert rows, "no lesson has a closing results table"
    table = re.findall(r'^\| (\d\d_\w+) \| (.+?) \| ([^|]+) \| ([\d, ]*) \| (\d+) \| ([\d.]+|nan) \| ([\d.]+) \|$', page, flags=re.M)
    want = [(r['lesson'], r['technique'], run_lessons._acc(r), ', '.join(map(str, r['seeds'])), str(r['epochs']),
             f"{r['train_seconds']:.1f}", f"{r['epoch_time']:.2f}") for r in rows]
    assert table == want
    assert (ROOT/'results'/'accuracy.png').stat().st_size > 1000


def test_runner_stops_on_a_failing_cell_and_leaves_the_notebook_alone(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1'),
                                         nbformat.v4.new_code_cell('raise ValueError("bad input")')])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    path = tmp_path/'99_broken.ipynb'
    nbformat.write(nb, path)
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=r'FAILED 99_broken.ipynb, cell 1: ValueError: bad input'):
        run_lessons.run_one(path, timeout=60)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_runner_stores_figures_as_smaller_palette_pngs_that_look_the_same():
    import base64, io
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    fig, ax = plt.subplots(figsize=(6, 3))
    for k in range(8): ax.plot(np.cumsum(np.random.default_rng(k).normal(size=500)), label=f'run {k}')
    ax.legend(); ax.set_xlabel('batch'); ax.set_ylabel('value')
    buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=100); plt.close(fig)
    before = base64.b64encode(buf.getvalue()).decode()
    after = run_lessons.palette_png(before)
    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x))).convert('RGBA'), dtype=float) for x in (before, after))
    assert a.shape == b.shape and len(after) < len(before)
    assert np.abs(a - b).mean() < 2.0                      # mean channel error out of 255: indistinguishable
    assert run_lessons.palette_png(after) == after         # idempotent


def test_runner_drops_empty_progress_outputs_and_keeps_real_ones():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x')])
    empty = nbformat.v4.new_output('display_data', data={'text/html': '<div></div>', 'text/plain': '<IPython...>'})
    table = nbformat.v4.new_output('display_data', data={'text/html': '<table class="fastprogress"><tr><th>a</th></tr>'
                                                                      '<tr><td>1</td></tr></table>', 'text/plain': 'x'})
    nb.cells[0].outputs = [empty, table]
    run_lessons.tidy_outputs(nb)
    assert [o['data']['text/plain'] for o in nb.cells[0].outputs] == ['a\n1']


def test_results_figure_leaves_out_rows_with_a_collapsed_seed(tmp_path, monkeypatch):
    "A row with one seed at chance would stretch its lesson's scale to 0.1: the page names it instead of plotting it."
    monkeypatch.setattr(run_lessons, 'RESULTS', tmp_path)
    row = lambda lesson, technique, accs: {'lesson': lesson, 'technique': technique, 'accuracies': accs,
                                           'accuracy': sum(accs)/len(accs), 'spread': 0.01, 'seeds': [0, 1, 42][:len(accs)],
                                           'epochs': 2, 'train_seconds': 10.0, 'epoch_time': 5.0}
    rows = [row('03_a', 'steady', [0.86, 0.85, 0.87]), row('03_a', 'one seed collapsed', [0.82, 0.83, 0.10]),
            row('04_b', 'other lesson', [0.88, 0.89, 0.88])]
    info = {'cpu': 'x', 'cores': 2, 'gpu': 'none', 'torch': 't', 'python': 'p', 'os': 'o'}
    run_lessons.write_results(rows, info, {})
    page = (tmp_path/'results.md').read_text()
    left_out = [l for l in page.splitlines() if l.startswith('Left out of the figure')]
    assert len(left_out) == 1 and 'one seed collapsed' in left_out[0] and 'steady' not in left_out[0]
    assert (tmp_path/'accuracy.png').stat().st_size > 1000
