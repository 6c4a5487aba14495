"""Build the lessons as a small static website in `_site/`, offline, in a few seconds.

    uv run python tools/build_site.py              # writes _site/; open _site/index.html in a browser
    uv run python tools/build_site.py --out DIR    # somewhere else

Every committed lesson (`notebooks/[0-9][0-9]_*.ipynb`, found by glob, titled by its first markdown heading) is
rendered with its outputs as they are, by nbconvert's bare `basic` template (the page body only) wrapped in our own
small page: a table of contents from the headings, links to the previous and next lessons, our own CSS. The index
lists the lessons and shows `results/results.md` with its figure.

Nothing on the pages loads from the network: images are embedded as data URIs, the figure is copied next to the
index, and math is typeset by the MathJax 2 that the `jupyter-server-mathjax` package ships, copied into
`_site/mathjax/` (only the parts used: the combined TeX + HTML-CSS configuration, the STIX web fonts).

What is left out of the lessons: `#|` directive lines in code (`#| export`, `#| default_exp`, ...; a cell that was
nothing else is dropped), input and output prompts, the markdown copy fastprogress writes next to each HTML table
(the HTML is shown), and the JSON payload of the results tables (their markdown copy is shown, as a table).
"""
import argparse
import html
import importlib.util
import re
import shutil
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter, TemplateExporter
from nbconvert.filters import markdown2html_mistune
from nbconvert.filters.highlight import Highlight2HTML
from pygments.formatters import HtmlFormatter

ROOT = Path(__file__).resolve().parent.parent
# Found without importing the package (its import pulls in all of jupyter_server: seconds).
MATHJAX_SRC = Path(importlib.util.find_spec('jupyter_server_mathjax').origin).parent/'static'
# The parts of MathJax the pages use, relative to MATHJAX_SRC; the rest (other output jax, localizations, a11y) stays.
MATHJAX_PARTS = ['MathJax.js', 'LICENSE', 'config/TeX-AMS-MML_HTMLorMML-full.js', 'extensions', 'jax/input',
                 'jax/element', 'jax/output/HTML-CSS', 'fonts/HTML-CSS/STIX-Web/woff']
MATHJAX_SKIP = ['a11y', 'MathML', 'mhchem3']   # extension folders the pages never load

MATHJAX_HEAD = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
            processEscapes: true, processEnvironments: true},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  showMathMenu: false, messageStyle: "none"
});
MathJax.Hub.Queue(function () { document.documentElement.setAttribute("data-math", "typeset"); });
</script>
<script src="mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"></script>"""

CSS = """
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d1d1f; }
.layout { display: flex; align-items: flex-start; max-width: 78rem; margin: 0 auto; }
nav.toc { position: sticky; top: 0; flex: 0 0 16rem; max-height: 100vh; overflow-y: auto; padding: 1.5rem 1rem;
          font-size: 0.85rem; border-right: 1px solid #e3e3e3; box-sizing: border-box; }
nav.toc ul { list-style: none; padding-left: 0; margin: 0.3rem 0; } nav.toc li { margin: 0.25rem 0; }
nav.toc li.h3 { padding-left: 1rem; } nav.toc a { color: #2a5db0; text-decoration: none; }
main { flex: 1 1 auto; min-width: 0; padding: 1rem 2rem 4rem; }
a { color: #2a5db0; }
.pager { display: flex; justify-content: space-between; gap: 1rem; margin: 1rem 0; font-size: 0.9rem; }
h1, h2, h3 { line-height: 1.25; } .anchor-link { display: none; }
pre, code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.85rem; }
:not(pre) > code { background: #f3f3f5; padding: 0.05em 0.3em; border-radius: 3px; }
.jp-InputArea-editor, .input_area { background: #f6f7f9; border: 1px solid #e3e5e8; border-radius: 4px;
                                    margin: 0.8rem 0 0.2rem; }
.highlight pre, .input_area pre { margin: 0; padding: 0.6rem 0.8rem; overflow-x: auto; }
.output_area, .output_subarea { overflow-x: auto; }
.output_subarea { padding: 0.2rem 0 0.2rem 0.9rem; border-left: 3px solid #e3e5e8; margin: 0.2rem 0 0.6rem; }
.output_subarea pre { margin: 0.2rem 0; white-space: pre-wrap; }
.output_stderr { background: #fff3f3; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #dcdfe3; padding: 0.3rem 0.7rem; text-align: left; }
thead tr { background: #f3f4f6; } td:not(:first-child) { font-variant-numeric: tabular-nums; }
ol.lessons li { margin: 0.4rem 0; }
/* MathJax's hidden MathML copy for screen readers would ask for MathJax's TeX fonts, which the package lacks */
.MJX_Assistive_MathML [mathvariant] { font-family: serif !important; }
@media (max-width: 50rem) { .layout { display: block; } nav.toc { position: static; max-height: none;
  border-right: none; border-bottom: 1px solid #e3e3e3; } main { padding: 1rem; } }
"""


def lesson_paths(root: Path = ROOT) -> list[Path]:
    """The committed lessons, in order."""
    return sorted((root/'notebooks').glob('[0-9][0-9]_*.ipynb'))


def lesson_title(nb: nbformat.NotebookNode, path: Path) -> str:
    """The text of the notebook's first markdown heading; a clear error if it has none."""
    for cell in nb.cells:
        if cell.cell_type != 'markdown': continue
        for line in cell.source.splitlines():
            if m := re.match(r'#+\s+(.+)', line.strip()): return m.group(1).strip()
    raise ValueError(f"{path.name}: no markdown heading to take the lesson's title from")


def strip_directives(nb: nbformat.NotebookNode) -> None:
    """Remove `#|` directive lines from code cells; drop code cells that were only directives and show nothing."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'code':
            cell.source = '\n'.join(l for l in cell.source.splitlines() if not l.lstrip().startswith('#|')).strip('\n')
            if not cell.source.strip() and not cell.outputs: continue
        cells.append(cell)
    nb.cells = cells


def pick_outputs(nb: nbformat.NotebookNode) -> None:
    """Keep one copy of each rich output: fastprogress's HTML table (not its markdown copy), the results' markdown."""
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            data = out.get('data', {})
            for mime in [m for m in data if m.startswith('application/vnd.miniai.')]:
                del data[mime]                            # JSON payloads; their text/markdown sibling is shown
            if 'text/html' in data and data.get('text/markdown', '').lstrip().startswith('```html'):
                del data['text/markdown']                 # fastprogress's markdown copy of its HTML table
            if 'text/markdown' in data or 'text/html' in data:
                data.pop('text/plain', None)              # fastprogress's text/plain is the raw HTML again


def trusted_html(element: str | bytes) -> str:
    """Stands in for nbconvert's `clean_html` (bleach): our own notebooks need no sanitizing, and it was slow."""
    return element.decode() if isinstance(element, bytes) else element


def lesson_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter with its bare `basic` template (the body only), no prompts, images embedded."""
    return HTMLExporter(template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True,
                        embed_images=True, filters={'clean_html': trusted_html,
                                                    'highlight_code': Highlight2HTML(pygments_lexer='ipython3')})


def render_lesson(exporter: HTMLExporter, nb: nbformat.NotebookNode) -> str:
    """The lesson's body as HTML, with outputs as they are.

    We call the template step (`TemplateExporter.from_notebook_node`) directly, skipping `HTMLExporter`'s last pass,
    which re-parses the whole page with BeautifulSoup to add placeholder alt texts and tab stops for JupyterLab's
    markup, and took two thirds of the build.
    """
    body, _ = TemplateExporter.from_notebook_node(exporter, nb)
    return body


def headings(body: str) -> list[tuple[int, str, str]]:
    """(level, id, text) of the h1-h3 headings nbconvert rendered, for the table of contents."""
    found = []
    for level, anchor, inner in re.findall(r'<h([1-3]) id="([^"]+)"[^>]*>(.*?)</h\1>', body, flags=re.S):
        text = html.unescape(re.sub(r'<[^>]+>', '', inner)).replace('¶', '').strip()
        found.append((int(level), anchor, text))
    return found


def toc_html(items: list[tuple[int, str, str]]) -> str:
    """A flat list of links to the h2/h3 headings (the h1 is the page title)."""
    rows = [f'<li class="h{lvl}"><a href="#{html.escape(a)}">{html.escape(t)}</a></li>' for lvl, a, t in items if lvl > 1]
    return '<ul>' + ''.join(rows) + '</ul>'


def page(title: str, body: str, side: str, math: bool) -> str:
    """A whole HTML page: our CSS, pygments' colours, optional local MathJax, the side bar and the body."""
    css = CSS + HtmlFormatter(style='default').get_style_defs('.highlight')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{html.escape(title)}</title>\n<style>{css}</style>\n{MATHJAX_HEAD if math else ""}\n</head>\n'
            f'<body><div class="layout"><nav class="toc">{side}</nav><main>\n{body}\n</main></div></body></html>\n')


def pager(prev: tuple[str, str] | None, nxt: tuple[str, str] | None) -> str:
    """Links to the previous and the next lesson (or the index), given as (href, title)."""
    left = f'<a rel="prev" href="{prev[0]}">← {html.escape(prev[1])}</a>' if prev else '<span></span>'
    right = f'<a rel="next" href="{nxt[0]}">{html.escape(nxt[1])} →</a>' if nxt else '<span></span>'
    return f'<div class="pager">{left}{right}</div>'


def copy_mathjax(out: Path) -> None:
    """Copy the used parts of the packaged MathJax 2 into out/mathjax."""
    skip = shutil.ignore_patterns(*MATHJAX_SKIP)
    for part in MATHJAX_PARTS:
        src, dst = MATHJAX_SRC/part, out/'mathjax'/part
        if not src.exists(): raise FileNotFoundError(f"MathJax file missing from jupyter-server-mathjax: {src}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir(): shutil.copytree(src, dst, ignore=skip if part == 'extensions' else None)
        else: shutil.copy2(src, dst)


def index_page(lessons: list[tuple[str, str]], root: Path, out: Path) -> str:
    """The index: the lessons in order, then the results page (its figure copied next to index.html)."""
    items = ''.join(f'<li><a href="{href}">{html.escape(title)}</a></li>' for href, title in lessons)
    results_md = (root/'results'/'results.md').read_text()
    results_md = re.sub(r'\A#\s+Results\s*\n', '', results_md)        # our own heading replaces the page's
    for img in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', results_md):
        shutil.copy2(root/'results'/img, out/Path(img).name)
    body = (f'<h1>miniai: the lessons</h1>\n<ol class="lessons" start="0">{items}</ol>\n'
            f'<h2 id="results">Results</h2>\n{markdown2html_mistune(results_md)}')
    side = ('<strong>miniai</strong><ul>' + ''.join(f'<li><a href="{h}">{html.escape(t)}</a></li>' for h, t in lessons)
            + '<li><a href="#results">Results</a></li></ul>')
    return page('miniai: the lessons', body, side, math=False)


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Write the whole site into `out`; returns the pages written.

    The site is built in a sibling folder and only then moved over `out` (a failed build leaves `out` as it was). An
    existing `out` is replaced only if it is a site built here (it has `mathjax/`), so a wrong --out cannot empty an
    unrelated folder.
    """
    paths = lesson_paths(root)
    if not paths: raise FileNotFoundError(f"no lessons matching notebooks/[0-9][0-9]_*.ipynb under {root}")
    if out.exists() and any(out.iterdir()) and not (out/'mathjax').is_dir():
        raise FileExistsError(f"{out} exists and is not a site built by tools/build_site.py: not replacing it")
    tmp = out.parent/f'.{out.name}.building'
    if tmp.exists(): shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        names = write_site(paths, root, tmp)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    if out.exists(): shutil.rmtree(out)
    tmp.rename(out)
    return [out/name for name in names]


def write_site(paths: list[Path], root: Path, out: Path) -> list[str]:
    """Render the lessons at `paths` and the index into the empty folder `out`; returns the page names."""
    nbs = [nbformat.read(p, as_version=4) for p in paths]
    lessons = [(p.stem + '.html', lesson_title(nb, p)) for p, nb in zip(paths, nbs)]
    exporter = lesson_exporter()
    for i, (nb, (href, title)) in enumerate(zip(nbs, lessons)):
        strip_directives(nb)
        pick_outputs(nb)
        body = render_lesson(exporter, nb)
        prev = lessons[i-1] if i > 0 else ('index.html', 'Index')
        nxt = lessons[i+1] if i+1 < len(lessons) else None
        nav = pager(prev, nxt)
        side = (f'<a href="index.html">miniai lessons</a><p><strong>{html.escape(title)}</strong></p>'
                + toc_html(headings(body)))
        (out/href).write_text(page(title, nav + body + nav, side, math=True))
    (out/'index.html').write_text(index_page(lessons, root, out))
    copy_mathjax(out)
    return ['index.html'] + [href for href, _ in lessons]


def main() -> None:
    """Build the site and print the build time and sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, default=ROOT/'_site', help='output folder, replaced if it holds an earlier build (default _site/)')
    args = ap.parse_args()
    t0, cpu0 = time.perf_counter(), time.process_time()
    pages = build(args.out)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for p in pages: print(f'{p.stat().st_size/1e6:6.2f} MB  {p.name}')
    total = sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file())
    mathjax = sum(f.stat().st_size for f in (args.out/'mathjax').rglob('*') if f.is_file())
    print(f'built {len(pages)} pages in {seconds:.1f} s ({cpu:.1f} s of CPU); {total/1e6:.1f} MB in all '
          f'({mathjax/1e6:.1f} MB of it MathJax)'
          f'\nopen {args.out/"index.html"}')


if __name__ == '__main__':
    main()
