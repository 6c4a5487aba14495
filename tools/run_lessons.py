"""Run the lessons headless in a real Jupyter kernel, write their outputs back, and build the results page.

    uv run python tools/run_lessons.py              # every notebook in notebooks/, in order, full mode
    uv run python tools/run_lessons.py 03 05        # only the lessons whose names start with 03 or 05

Each notebook is executed top to bottom with nbclient (cwd = notebooks/). Only when every cell has run without error
is the notebook written back — to a temporary file first, then moved over the original in one rename, and cleaned
with nbdev-clean — so a failure never leaves a notebook half-written. A failure stops the run and names the notebook,
the cell and the error.

The closing table of each lesson (`miniai.experiment.show_results`) carries its rows as JSON; after the run, this script
collects the rows of every committed notebook into `results/results.md` and draws `results/accuracy.png`.

Before a notebook is written back its outputs are tidied for readers: fastprogress shows each table as HTML and also
as a Markdown copy (a ```html block) and a plain-text copy of the raw HTML, plus a `<style>` block before the first
one; the Markdown copy and the style block are dropped and the plain-text copy becomes an aligned text table, so
no viewer shows raw HTML.
"""
import argparse
import base64
import html
import io
import math
import os
import platform
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbdev.clean import clean_nb
from PIL import Image

from miniai.experiment import RESULTS_MIME

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'notebooks'
RESULTS = ROOT/'results'
BUDGET_S = 35*60   # the whole full run, every lesson
LESSON_BUDGET_S = 5*60                                   # each lesson...
LONG_LESSONS = {'07_resnets': 8*60, '09_capstone': 8*60}  # ...except these two
MAX_NOTEBOOK_BYTES = 400_000


def lesson_budget(stem: str) -> int:
    "Seconds the full run of lesson `stem` may take on the project's 2-core CPU."
    return LONG_LESSONS.get(stem, LESSON_BUDGET_S)


def lessons() -> list[Path]:
    return sorted(NBS.glob('[0-9][0-9]_*.ipynb'))


def machine() -> dict:
    """A short description of the machine the lessons ran on."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
    return {'cpu': cpu, 'cores': os.cpu_count(), 'gpu': gpu, 'torch': torch.__version__,
            'python': platform.python_version(), 'os': f'{platform.system()} {platform.release()}'}


def _text_table(table_html: str) -> str:
    "An HTML table (fastprogress's) as aligned plain text."
    rows = [[html.unescape(re.sub(r'<[^>]+>', '', c)).strip() for c in re.findall(r'<t[hd][^>]*>(.*?)</t[hd]>', tr, re.S)]
            for tr in re.findall(r'<tr[^>]*>(.*?)</tr>', table_html, re.S)]
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows), default=0))]
    return '\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def palette_png(b64: str) -> str:
    "A PNG figure (base64) re-encoded with a 256-colour palette: the same look for plots, about a third of the bytes."
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    if im.mode == 'P': return b64                                          # already a palette image
    q = im.convert('RGBA').quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = io.BytesIO(); q.save(buf, format='PNG', optimize=True)
    return base64.b64encode(buf.getvalue()).decode() if buf.tell() < len(b64) * 3 // 4 else b64


def tidy_outputs(nb) -> None:
    """Drop fastprogress's Markdown and style copies of its tables; its plain-text copy becomes a text table.
    Figures are stored as palette PNGs, to keep each notebook small."""
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        kept = []
        for o in cell.outputs:
            data = o.get('data', {})
            page = data.get('text/html', '')
            if o.output_type == 'display_data' and page.lstrip().startswith('<style') and '<table' not in page:
                continue                                                      # the CSS for the progress bars
            if o.output_type == 'display_data' and re.fullmatch(r'\s*(<div>\s*</div>)?\s*', page) and 'text/html' in data \
                    and not any(k.startswith('image/') for k in data):
                continue                                       # an empty progress bar, left by a run stopped early
            if data.get('text/markdown', '').startswith('```html'): del data['text/markdown']
            if '<table class="fastprogress">' in page: data['text/plain'] = _text_table(page)
            if 'image/png' in data: data['image/png'] = palette_png(data['image/png'])
            kept.append(o)
        cell.outputs = kept


def run_one(path: Path, timeout: int) -> float:
    """Execute `path` in a fresh kernel and write it back atomically; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    env_smoke = os.environ.pop('MINIAI_SMOKE', None)   # full mode, always
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name='python3',
                       resources={'metadata': {'path': str(path.parent)}}).execute()
    except CellExecutionError as e:
        idx = next((i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and
                    any(o.output_type == 'error' for o in c.get('outputs', []))), None)
        err = next((o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
                    if o.output_type == 'error'), None)
        what = f"{err.ename}: {err.evalue}" if err is not None else str(e).splitlines()[-1]
        raise SystemExit(f"FAILED {path.name}, cell {idx}: {what}\n(the notebook was left as it was)") from None
    finally:
        if env_smoke is not None: os.environ['MINIAI_SMOKE'] = env_smoke
    took = time.perf_counter() - t0
    nb.metadata['miniai'] = {'full_run_seconds': round(took, 1), 'outputs_tidied': True}
    tidy_outputs(nb)
    tmp = path.with_name(f'.{path.name}.tmp')
    clean_nb(nb, allowed_metadata_keys=['miniai'])   # nbdev's clean: no execution counts or kernel metadata churn
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return took


def collect() -> list[dict]:
    """The closing-table rows of every committed lesson, in order."""
    out = []
    for path in lessons():
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            for o in c.get('outputs', []) if c.cell_type == 'code' else []:
                if o.output_type == 'display_data' and RESULTS_MIME in o.get('data', {}):
                    payload = o['data'][RESULTS_MIME]
                    # rows saved before every row carried seeds, spread, epochs and seconds read as one unnamed seed
                    out += [{'seeds': [], 'spread': 0.0, 'epochs': 0, 'train_seconds': math.nan,
                             'accuracies': [r['accuracy']], **r, 'lesson': path.stem} for r in payload['rows']]
    return out


def _acc(r: dict) -> str:
    "Mean test accuracy, with ± the spread over seeds when there are several."
    if r['accuracy'] is None: return 'diverged'
    return f"{r['accuracy']:.4f} ± {r['spread']:.4f}" if len(r['seeds']) > 1 else f"{r['accuracy']:.4f}"


def write_results(rows: list[dict], info: dict, seconds: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    RESULTS.mkdir(exist_ok=True)
    lines = ['# Results', '',
             'Every number below was printed by the committed notebooks in their last full run '
             '(`uv run python tools/run_lessons.py`). Regenerated by that command; do not edit by hand.', '',
             f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; "
             f"torch {info['torch']}, Python {info['python']}, {info['os']}.", '']
    if seconds:
        lines += ['| notebook | full run (s) |', '|---|---:|']
        lines += [f'| {k} | {v:.0f} |' for k, v in seconds.items()]
        lines += [f'| **all {len(seconds)} notebooks** | **{sum(seconds.values()):.0f}** '
                  f'({sum(seconds.values())/60:.1f} min; budget {BUDGET_S//60} min) |', '']
    lines += ['Test accuracy is the mean over the seeds listed, ± their sample standard deviation; training seconds are '
              'those of one seed\'s run (the training epochs, without evaluation).', '',
              '| lesson | technique | test accuracy | seeds | epochs | training s | s per epoch |',
              '|---|---|---:|---|---:|---:|---:|']
    lines += [f"| {r['lesson']} | {r['technique']} | {_acc(r)} | {', '.join(map(str, r['seeds']))} | {r['epochs']} | "
              f"{r['train_seconds']:.1f} | {r['epoch_time']:.2f} |" for r in rows]
    # a row with a collapsed seed (below 0.5) or a diverged one would stretch its lesson's axis to chance level
    shown = [r for r in rows if r['accuracy'] is not None and all(a is not None and a >= 0.5 for a in r['accuracies'])]
    left_out = [r for r in rows if r not in shown]
    if left_out:
        lines += ['', 'Left out of the figure (a seed below 0.5, or diverged): ' +
                  '; '.join(f"{r['lesson']} {r['technique']} ({_acc(r)})" for r in left_out) + '.']
    lines += ['', '![Test accuracy of every technique, mean and spread over seeds](accuracy.png)', '']
    (RESULTS/'results.md').write_text('\n'.join(lines))
    lessons = list(dict.fromkeys(r['lesson'] for r in shown))
    groups = [[r for r in shown if r['lesson'] == lesson] for lesson in lessons]
    # one panel per lesson, each with its own accuracy range, so that differences within a lesson can be seen
    fig, axs = plt.subplots(len(groups), 1, figsize=(9, 0.28*len(shown) + 0.75*len(groups)), squeeze=False,
                            gridspec_kw={'height_ratios': [len(g) + 1 for g in groups]})
    for j, (ax, group) in enumerate(zip(axs[:, 0], groups)):
        color = f"C{j % 10}"
        for i, r in enumerate(group):
            ax.scatter(r['accuracies'], [i] * len(r['accuracies']), s=12, color=color, alpha=0.5)
            ax.errorbar(r['accuracy'], i, xerr=r['spread'] if len(r['accuracies']) > 1 else None, fmt='o',
                        color=color, capsize=3)
        ax.set_yticks(range(len(group)), [r['technique'] for r in group], fontsize=7)
        ax.set_ylim(len(group) - 0.5, -0.5)
        lo = min(min(r['accuracies']) for r in group)
        hi = max(max(r['accuracies'] + [r['accuracy'] + r['spread']]) for r in group)
        pad = max(0.002, 0.08*(hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(lessons[j], fontsize=8, loc='left'); ax.tick_params(axis='x', labelsize=7)
        ax.grid(axis='x', alpha=0.3)
    axs[-1, 0].set_xlabel('test accuracy (dots: seeds; marker and bar: mean ± sd; each lesson on its own scale)')
    fig.suptitle('Test accuracy of every technique, by lesson')
    fig.tight_layout()
    fig.savefig(RESULTS/'accuracy.png', dpi=80, bbox_inches='tight'); plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('only', nargs='*', help='lesson name prefixes to run (default: all)')
    ap.add_argument('--timeout', type=int, default=1800, help='seconds per cell')
    ap.add_argument('--results-only', action='store_true', help='rebuild the results page without running anything')
    args = ap.parse_args()
    todo = [p for p in lessons() if not args.only or any(p.name.startswith(o) for o in args.only)]
    if args.only and not todo: raise SystemExit(f"no notebook matches {args.only}")
    info = machine()
    seconds = {}
    if not args.results_only:
        for i, path in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {path.name} ...", flush=True)
            took = run_one(path, args.timeout)
            over = '' if took <= lesson_budget(path.stem) else f'  OVER its budget of {lesson_budget(path.stem)} s'
            size = path.stat().st_size
            big = '' if size <= MAX_NOTEBOOK_BYTES else f'  {size/1e3:.0f} KB, OVER {MAX_NOTEBOOK_BYTES/1e3:.0f} KB'
            print(f"[{i}/{len(todo)}] {path.name} done in {took:.0f} s{over}{big}", flush=True)
    for path in lessons():
        s = nbformat.read(path, as_version=4).metadata.get('miniai', {}).get('full_run_seconds')
        if s is not None: seconds[path.stem] = s
    rows = collect()
    write_results(rows, info, seconds)
    print(f"results: {len(rows)} rows from {len(lessons())} notebooks -> {RESULTS/'results.md'}")


if __name__ == '__main__':
    main()
