"""The lessons' website (tools/build_site.py): built into a tmp folder, opened from file:// in headless Chromium.

For every page the DOM must show: every image loaded (and every file the page asked for: a MathJax font, say); the math typeset by the local MathJax (no `$`, `$$`, `\\(`
left in the prose, no TeX errors); no raw HTML or fastprogress markdown shown as text; each fastprogress table
once and each results table as a `<table>`; no `#|` directive and no `In [ ]:` prompt; a table of contents whose
links all land; the previous/next links. Every request the page made (Chrome's performance log, plus the page's
own resource timing) must stay on this machine (file: or data: URLs); the browser also blocks every http(s) URL,
so a page that tries anyway fails here without reaching the network. A screenshot of each page (and of its first
display math, fastprogress table and results table) is saved under pytest's tmp folder, e.g.
/tmp/pytest-of-$USER/pytest-current/screenshots0 (the path is printed; `pytest -s` shows it). Chromium is Debian's (`apt-get install chromium chromium-driver`); selenium is
pointed at /usr/bin/chromedriver, so nothing is ever downloaded. If Chromium cannot start, the tests fail.
"""
import importlib.util
import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('build_site', ROOT/'tools'/'build_site.py')
build_site = importlib.util.module_from_spec(spec); spec.loader.exec_module(build_site)

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
LESSONS = build_site.lesson_paths()
PAGES = ['index'] + [p.stem for p in LESSONS]
RESULTS_MIME = 'application/vnd.miniai.results+json'
LOCAL_SCHEMES = {'file', 'data', 'blob', 'about'}

# One call in the page gathers every fact the checks need.
FACTS_JS = r"""
const texts = (skip) => { const out = [], w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (w.nextNode()) { if (!w.currentNode.parentElement.closest(skip)) out.push(w.currentNode.nodeValue); }
  return out; };
const headerOf = (t) => [...t.querySelectorAll('tr:first-child th')].map(th => th.textContent.trim()).join(' | ');
return {
  images: [...document.images].map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
  texts: texts('script, style'),
  code: [...document.querySelectorAll('pre')].map(p => p.innerText),
  prose: texts('script, style, pre, code, .MathJax_Preview'),
  mathjax: typeof window.MathJax !== 'undefined',
  math: document.querySelectorAll('span.MathJax, div.MathJax_Display').length,
  math_errors: document.querySelectorAll('.merror, .noError, #MathJax_Message:not([style*="none"])').length,
  fastprogress: document.querySelectorAll('table.fastprogress').length,
  table_headers: [...document.querySelectorAll('table')].map(headerOf),
  toc: [...document.querySelectorAll('nav.toc a[href^="#"]')].map(a => a.getAttribute('href').slice(1)),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  prev: document.querySelector('a[rel=prev]')?.getAttribute('href') ?? null,
  next: document.querySelector('a[rel=next]')?.getAttribute('href') ?? null,
  resources: performance.getEntriesByType('resource').map(e => e.name),
};
"""


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    """The site, built once for the module by the same function the command runs."""
    out = tmp_path_factory.mktemp('site')/'_site'
    build_site.build(out)
    return out


def start_chromium():
    """Headless Debian Chromium driven by Debian's chromedriver, with every http(s) URL blocked and the performance
    log on; fails the test (never skips) when it cannot start."""
    os.environ['SE_OFFLINE'] = 'true'                      # selenium-manager, should it ever run, stays offline
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install Debian's `apt-get install -y chromium chromium-driver`")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1280,1000', '--no-first-run', '--disable-background-networking',
                '--disable-component-update', '--disable-sync'):
        opts.add_argument(arg)
    opts.set_capability('goog:loggingPrefs', {'performance': 'ALL'})
    try:
        driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    except WebDriverException as e:
        pytest.fail(f"headless Chromium ({CHROMIUM} with {CHROMEDRIVER}) could not start: {e.msg}")
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd('Network.enable', {})
    # Should a page ask for anything on the web, the browser refuses it (the request still shows in the performance
    # log, so the check fails), and the test never reaches the network.
    driver.execute_cdp_cmd('Network.setBlockedURLs', {'urls': ['http://*', 'https://*', 'ws://*', 'wss://*']})
    return driver


@pytest.fixture(scope='module')
def browser():
    """One headless Chromium for the module."""
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope='module')
def shots(tmp_path_factory) -> Path:
    """The folder the screenshots go to."""
    folder = tmp_path_factory.mktemp('screenshots')
    print(f"\nscreenshots of the site: {folder}")
    return folder


def open_page(driver, path: Path) -> dict:
    """Load `path` from file://, wait for MathJax to finish (when the page has it), return the page's facts."""
    driver.get_log('performance')                          # drop what earlier pages logged
    driver.get(path.as_uri())
    if driver.execute_script('return typeof window.MathJax !== "undefined"'):
        typeset = 'return document.documentElement.getAttribute("data-math") === "typeset"'
        try:
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(typeset))   # 60 s: a busy 2-core machine
        except TimeoutException:
            pytest.fail(f"{path.name}: MathJax never finished typesetting (a file it needs may be missing)")
    facts = driver.execute_script(FACTS_JS)
    events = [json.loads(e['message'])['message'] for e in driver.get_log('performance')]
    urls = {e['params']['requestId']: e['params']['request']['url']
            for e in events if e['method'] == 'Network.requestWillBeSent'}
    facts['requests'] = list(urls.values())
    facts['failed'] = [urls.get(e['params']['requestId'], '?') for e in events if e['method'] == 'Network.loadingFailed']
    return facts


def remote_requests(facts: dict) -> list[str]:
    """The URLs the page asked for that are not on this machine."""
    urls = facts['requests'] + facts['resources']
    return sorted({u for u in urls if urlparse(u).scheme not in LOCAL_SCHEMES
                   and urlparse(u).hostname not in ('127.0.0.1', 'localhost')})


def problems(facts: dict) -> list[str]:
    """What is wrong with a page, whatever page it is, in words."""
    found = []
    found += [f"image not loaded: {i['src']}" for i in facts['images'] if not i['ok']]
    found += [f"request off this machine: {u}" for u in remote_requests(facts)]
    # (MathJax's check for web-font support loads `about:blank` as a font, which fails by design)
    found += [f"file failed to load: {u[:120]}" for u in facts['failed'] if u != 'about:blank']
    raw = [t.strip()[:80] for t in facts['texts'] if re.search(r'<(div|table|tr|td|style|span)\b|```html', t)]
    found += [f"raw HTML shown as text: {t!r}" for t in raw]
    untypeset = [t.strip()[:80] for t in facts['prose'] if re.search(r'\$|\\\(|\\\[', t)]
    found += [f"math not typeset: {t!r}" for t in untypeset]
    if facts['math_errors']: found.append(f"{facts['math_errors']} math errors or MathJax messages")
    found += [f"directive shown: {l.strip()!r}" for c in facts['code'] for l in c.splitlines() if l.lstrip().startswith('#|')]
    found += [f"input prompt shown: {t.strip()[:40]!r}" for t in facts['texts'] if re.match(r'\s*In\s*\[', t)]
    found += [f"table of contents links to a missing #{a}" for a in facts['toc'] if a not in facts['ids']]
    return found


def expected(path: Path) -> dict:
    """What the notebook says its page must show: fastprogress tables, results tables, math."""
    nb = nbformat.read(path, as_version=4)
    outs = [o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    return {'fastprogress': sum('class="fastprogress"' in d.get('text/html', '') for d in outs),
            'results': sum(RESULTS_MIME in d for d in outs),
            'math': any('$' in c.source for c in nb.cells if c.cell_type == 'markdown')}


def screenshot(driver, shots: Path, name: str, element_js: str | None = None) -> None:
    """Save the top of the page, or the view scrolled to the element `element_js` finds (if any), as a PNG."""
    if element_js and not driver.execute_script(f'const e = {element_js}; e?.scrollIntoView(); return !!e'):
        return
    driver.save_screenshot(str(shots/f'{name}.png'))


@pytest.mark.parametrize('name', PAGES)
def test_page_reads_well_offline(site, browser, shots, name):
    """Every check above on one page, plus what its notebook says it must show, and its prev/next links."""
    facts = open_page(browser, site/f'{name}.html')
    screenshot(browser, shots, name)
    assert not problems(facts), f"{name}.html: " + '; '.join(problems(facts))
    results = [h for h in facts['table_headers'] if 'test accuracy' in h]
    if name == 'index':
        assert facts['images'] and results, "index.html: the results figure or the results table is missing"
        return
    path = ROOT/'notebooks'/f'{name}.ipynb'
    want = expected(path)
    assert facts['fastprogress'] == want['fastprogress'], \
        f"{name}.html shows {facts['fastprogress']} fastprogress tables, the notebook has {want['fastprogress']}"
    assert len(results) == want['results'], f"{name}.html: {len(results)} results <table>s, want {want['results']}"
    assert facts['toc'], f"{name}.html has no table of contents"
    i = LESSONS.index(path)
    assert facts['prev'] == (LESSONS[i-1].stem + '.html' if i else 'index.html'), f"{name}.html: prev {facts['prev']}"
    assert facts['next'] == (LESSONS[i+1].stem + '.html' if i+1 < len(LESSONS) else None), f"{name}.html: next"
    if want['math']:
        assert facts['mathjax'] and facts['math'] > 0, f"{name}.html: its notebook has math, none was typeset"
        screenshot(browser, shots, f'{name}_math', 'document.querySelector("div.MathJax_Display")')
    if want['fastprogress']:
        screenshot(browser, shots, f'{name}_fastprogress', 'document.querySelector("table.fastprogress")')
    if want['results']:
        screenshot(browser, shots, f'{name}_results',
                   '[...document.querySelectorAll("table")].findLast(t => t.textContent.includes("test accuracy"))')


def test_some_lesson_has_math():
    """So that the 'math is typeset' check above is exercised on a real page."""
    assert any(expected(p)['math'] for p in LESSONS), "no lesson has math: the typesetting check would prove nothing"


def test_the_checks_catch_a_bad_page(site, browser):
    """The checks can fail: a copy of the index (which loads no MathJax) with an image and a style sheet from the web,
    raw HTML and TeX shown as text, a directive and a prompt. The browser blocks the two requests; the performance
    log still records them."""
    page = (site/'index.html').read_text()
    junk = ('<link rel="stylesheet" href="https://cdn.example.com/x.css"><img src="https://example.com/x.png" alt="remote"><p>&lt;div class="x"&gt;</p><pre>```html\n</pre>'
            '<p>$$ x^2 $$</p><p>\\(x\\)</p><pre>#| export\nx = 1</pre><div>In&nbsp;[&nbsp;]:</div>')
    (site/'bad.html').write_text(page.replace('</main>', junk + '</main>'))
    found = '\n'.join(problems(open_page(browser, site/'bad.html')))
    for want in ('request off this machine: https://example.com/x.png', 'off this machine: https://cdn.example.com/x.css', 'image not loaded: https://example.com',
                 "raw HTML shown as text: '<div", "raw HTML shown as text: '```html", "math not typeset: '$$ x^2 $$",
                 "math not typeset: '\\\\(x", "directive shown: '#| export'", "input prompt shown: 'In"):
        assert want in found, f"missing {want!r} in:\n{found}"


def test_build_never_empties_a_folder_it_did_not_build(tmp_path):
    (tmp_path/'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not a site built by'):
        build_site.build(tmp_path)
    assert (tmp_path/'notes.txt').read_text() == 'keep me' and not list(tmp_path.parent.glob('.*.building'))
