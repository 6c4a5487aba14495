"""The library is what the notebooks export: re-export (twice) into a scratch copy and compare file by file.

Also checks the house rules for library modules: no star imports, no `globals()` lookups, no `__getattr__`
forwarding, and a docstring on every public function and class.
"""
import ast
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT/'miniai'
MODULES = sorted(p for p in LIB.glob('*.py') if p.name not in ('__init__.py', '_modidx.py'))


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*.py')) if '__pycache__' not in p.parts}


def test_library_matches_notebook_export(tmp_path):
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT/name, tmp_path/name)
    shutil.copytree(ROOT/'notebooks', tmp_path/'notebooks')
    shutil.copytree(ROOT/'tools', tmp_path/'tools')
    (tmp_path/'miniai').mkdir()
    shutil.copy(LIB/'__init__.py', tmp_path/'miniai'/'__init__.py')
    subprocess.run([sys.executable, 'tools/export.py'], cwd=tmp_path, check=True, capture_output=True, text=True)
    first = _tree(tmp_path/'miniai')
    # a second run, over the modules the first one wrote, gives the same files (nothing appended twice)
    subprocess.run([sys.executable, 'tools/export.py'], cwd=tmp_path, check=True, capture_output=True, text=True)
    want, got = _tree(tmp_path/'miniai'), _tree(LIB)
    assert want == first, f"a second export changed {sorted(k for k in want if want[k] != first.get(k))}"
    assert sorted(want) == sorted(got), f"modules differ: exported {sorted(want)}, committed {sorted(got)}"
    drift = [name for name in want if want[name] != got[name]]
    assert not drift, f"miniai/ differs from the notebooks' export in {drift}: run `uv run python tools/export.py`"


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.name)
def test_library_module_house_rules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert all(a.name != '*' for a in node.names), f"{path.name}:{node.lineno} star import"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != 'globals', f"{path.name}:{node.lineno} globals() lookup"
        if isinstance(node, ast.FunctionDef):
            assert node.name != '__getattr__', f"{path.name}:{node.lineno} __getattr__ forwarding"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith('_'):
            assert ast.get_docstring(node), f"{path.name}: public {node.name} has no docstring"
