"""Every public function of the package documents its parameters and what it returns (numpydoc)."""

import ast
import pathlib
import re
import sys

import ntps_nb

PACKAGE = pathlib.Path(ntps_nb.__file__).parent


#: A numpydoc parameter entry at the section's indentation: one name or several separated by commas (``**kwargs``
#: included), then " : type or description", or nothing (a bare ``**kwargs``), or a comma where the names go on.
ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(,?)\s*(?::|$)")
#: Where the Parameters section ends.
NEXT_SECTION = re.compile(r"\n(?:Returns|Yields|Raises|Notes|Examples|See Also)\n-+\n")


def named_parameters(doc: str) -> set[str]:
    """The names a numpydoc docstring's Parameters section gives entries to (empty without the section)."""
    if "Parameters\n----------\n" not in doc:
        return set()
    section = NEXT_SECTION.split(doc.split("Parameters\n----------\n", 1)[1])[0]
    named, names_go_on = set(), False
    for line in section.splitlines():
        if line[:1].isspace() and not names_go_on:   # a description's line
            continue
        entry = ENTRY.match(line.strip())
        if entry:
            named |= {name.strip().lstrip("*") for name in entry.group(1).split(",")}
        names_go_on = bool(entry and entry.group(2))
    return named


def undocumented() -> list[str]:
    """Public module-level functions whose docstring lacks a Parameters section (when they take
    arguments) or a Returns / Yields section, or whose Parameters section gives no entry to one of
    their arguments, as ``path:line:name`` (and the arguments left out)."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            signature = node.args
            arguments = [a.arg for a in signature.posonlyargs + signature.args + signature.kwonlyargs
                         if a.arg not in ("self", "cls")]
            arguments += [a.arg for a in (signature.vararg, signature.kwarg) if a is not None]
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}:{node.name}"
            if ("Parameters" not in doc and arguments) or not ("Returns" in doc or "Yields" in doc):
                missing.append(where)
            elif left_out := [name for name in arguments if name not in named_parameters(doc)]:
                missing.append(f"{where} ({', '.join(left_out)})")
    return missing


def test_every_public_function_has_numpydoc_parameters_and_returns():
    assert undocumented() == []


def test_the_check_finds_a_function_without_them(tmp_path, monkeypatch):
    (tmp_path / "ntps_nb").mkdir()
    (tmp_path / "ntps_nb" / "bare.py").write_text('def f(x):\n    """Only a summary."""\n    return x\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "ntps_nb")
    assert undocumented() == ["ntps_nb/bare.py:1:f"]


def test_the_check_finds_an_argument_the_parameters_section_leaves_out(tmp_path, monkeypatch):
    (tmp_path / "ntps_nb").mkdir()
    (tmp_path / "ntps_nb" / "partial.py").write_text(
        'def f(x, y, *, z=1, w=2, **extra):\n    """Summary.\n\n    Parameters\n    ----------\n'
        '    x, y : the inputs,\n'
        '        named once.\n    **extra\n        Passed on.\n\n    Returns\n    -------\n    The sum; z and w\n'
        '        are mentioned here only.\n    """\n    return x + y + z + w\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "ntps_nb")
    assert undocumented() == ["ntps_nb/partial.py:1:f (z, w)"]
    # names that go on after a comma on the next line count
    assert named_parameters("Parameters\n----------\na, b,\n    c : numbers.\n") == {"a", "b", "c"}


def test_the_package_docstrings_way_to_a_number_to_report_runs_from_the_top_level():
    """The route `ntps_nb`'s docstring shows for a reportable NTPS (per-layer shards, `ntps_estimate`,
    `estimate_by_n`) works from the top-level names, on a sharded extraction's `LayerMoments`, and gives the
    rows of the functions in `ntps_nb.core.estimators`."""
    import numpy as np

    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.moments import LayerMoments
    from ntps_nb.core.simulate import lds_model, sample_shards

    model = lds_model(d=8, n_classes=2, n_tokens=8, seed=3)
    per_layer = {layer: sample_shards(model, 320, 10, np.random.default_rng(layer)) for layer in (0, 4)}
    result_shards = [LayerMoments({layer: per_layer[layer][s] for layer in per_layer}) for s in range(10)]
    shards = ntps_nb.layer_shards(result_shards)[4]
    rows = ntps_nb.ntps_estimate(shards, [1, 2])
    assert rows["k"].tolist() == [1, 2] and rows["estimate"].notna().all()
    assert rows.equals(ntps_estimate(per_layer[4], [1, 2]))
    settles = ntps_nb.estimate_by_n(shards, [1, 2])
    assert set(settles["n_texts"]) == {160, 320} and {"drift", "inside_first"} <= set(settles.columns)
