"""The core is pure: it imports no torch, no model stack and nothing of ntps_nb outside the core.

Checked twice: statically, over every import statement of every module under ntps_nb/core (at
any depth, including imports inside functions), and at run time, by importing the whole core in a
fresh interpreter and looking at what got loaded.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "ntps_nb" / "core"
FORBIDDEN_TOP = {"torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gguf"}
# The one name a core module forwards to a module above it, lazily and only when asked for it:
# core/probes.py's module __getattr__ keeps the moved torch probe at its old import path.
ALLOWED_FORWARDS = {("probes.py", "ntps_nb.torch_probe")}
# The one core module allowed to import torch: the optional torch backend of the analysis, which
# nothing else in the core imports (checked below), so importing the core still loads no torch.
TORCH_BACKEND = Path("backends") / "torch.py"
ALLOWED_TORCH = {(str(TORCH_BACKEND), "torch")}
# The one place that imports the torch backend: the device dispatch of the core's public functions
# (`ntps_nb.core.backends.analysis_backend`), inside a function body only, so that importing the
# core still loads no torch (checked at run time below) and torch loads when a torch device is asked for.
LAZY_BACKEND = {(str(Path("backends") / "__init__.py"), "ntps_nb.core.backends.torch")}


def lines_inside_functions(tree: ast.AST) -> set[int]:
    """The line numbers of every statement inside a function body (where an import is lazy)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imported_modules(path: Path, *, lazy: bool = False) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in a core module, relative ones resolved;
    with ``lazy``, only the imports inside function bodies."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["ntps_nb", "core"]
    found = []
    inside = lines_inside_functions(tree) if lazy else None
    for node in ast.walk(tree):
        if inside is not None and getattr(node, "lineno", None) not in inside:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from ntps_nb import extract` imports the module ntps_nb.extract (and so for the backends)
            if name in ("ntps_nb", "ntps_nb.core.backends"):
                found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((name, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((str(node.args[0].value), node.lineno))
    return found


def violations(path: Path, *, relative: str | None = None) -> list[str]:
    """The forbidden imports of a core module; ``relative`` is its path under ntps_nb/core."""
    relative = path.name if relative is None else relative
    bad = []
    lazy = set(imported_modules(path, lazy=True))
    for name, line in imported_modules(path):
        top = name.split(".")[0]
        upward = top == "ntps_nb" and name != "ntps_nb" and not name.startswith("ntps_nb.core")
        backend = name.startswith("ntps_nb.core.backends.torch")
        allowed = ((relative, name) in ALLOWED_FORWARDS or (relative, top) in ALLOWED_TORCH
                   or ((relative, name) in LAZY_BACKEND and (name, line) in lazy))
        if (top in FORBIDDEN_TOP or upward or backend) and not allowed:
            bad.append(f"{path.name}:{line} imports {name}")
    return bad


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_the_core_folder_is_found():
    assert len(CORE_FILES) >= 10 and (CORE / "moments.py") in CORE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_no_core_module_imports_torch_or_the_package_above(path):
    assert violations(path, relative=str(path.relative_to(CORE))) == []


def test_only_the_torch_backend_may_import_torch():
    backend = CORE / TORCH_BACKEND
    assert backend in CORE_FILES
    assert any(name == "torch" for name, _ in imported_modules(backend))
    assert violations(backend, relative="score.py") == [f"torch.py:{line} imports torch" for name, line
                                                         in imported_modules(backend) if name == "torch"]


def test_the_check_sees_upward_and_torch_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy\nfrom ntps_nb.core import score\nfrom .stats import correlate\n"
                      "def f():\n    import torch.nn\n    from ntps_nb.cache import atomic_path\n"
                      "    from .. import extract\n    from .backends import torch\n"
                      "    importlib.import_module('ntps_nb.models')\n")
    assert violations(sample) == ["sample.py:5 imports torch.nn", "sample.py:6 imports ntps_nb.cache",
                                  "sample.py:7 imports ntps_nb.extract", "sample.py:8 imports ntps_nb.core.backends.torch",
                                  "sample.py:9 imports ntps_nb.models"]


def test_the_backend_may_be_imported_lazily_by_the_dispatch_only(tmp_path):
    dispatch = tmp_path / "dispatch.py"
    dispatch.write_text("from ntps_nb.core.backends import torch as eager\n"
                        "def backend():\n    from ntps_nb.core.backends import torch as lazy\n    return lazy\n")
    relative = str(Path("backends") / "__init__.py")
    # inside the function: allowed for the dispatch module; at module level: not
    assert violations(dispatch, relative=relative) == ["dispatch.py:1 imports ntps_nb.core.backends.torch"]
    # any other core module: neither
    assert violations(dispatch, relative="score.py") == ["dispatch.py:1 imports ntps_nb.core.backends.torch",
                                                         "dispatch.py:3 imports ntps_nb.core.backends.torch"]


def test_importing_the_whole_core_loads_no_torch_and_nothing_above_it():
    # every core module but the torch backend itself, the backends package included
    modules = ", ".join("ntps_nb.core." + ".".join(p.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
                        for p in CORE_FILES if p != CORE / "__init__.py" and p != CORE / TORCH_BACKEND)
    code = (f"import sys, importlib\nfor m in '{modules}'.split(', '): importlib.import_module(m)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in FORBIDDEN_TOP]
    outside = [m for m in loaded if m.startswith("ntps_nb.") and not m.startswith("ntps_nb.core")]
    assert outside == []
