"""Every public function of the package documents its parameters and what it returns (numpydoc)."""

import ast
import pathlib
import sys

import ntps_nb

PACKAGE = pathlib.Path(ntps_nb.__file__).parent


def undocumented() -> list[str]:
    """Public module-level functions whose docstring lacks a Parameters section (when they take
    arguments) or a Returns / Yields section, as ``path:line:name``."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            arguments = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            if ("Parameters" not in doc and arguments) or not ("Returns" in doc or "Yields" in doc):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}:{node.name}")
    return missing


def test_every_public_function_has_numpydoc_parameters_and_returns():
    assert undocumented() == []


def test_the_check_finds_a_function_without_them(tmp_path, monkeypatch):
    (tmp_path / "ntps_nb").mkdir()
    (tmp_path / "ntps_nb" / "bare.py").write_text('def f(x):\n    """Only a summary."""\n    return x\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "ntps_nb")
    assert undocumented() == ["ntps_nb/bare.py:1:f"]
