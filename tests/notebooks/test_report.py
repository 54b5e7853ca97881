"""The report of a study (`ntps_nb.notebooks.run_report`, what `make run` renders): its index lists
every notebook and marks a failing one, and the executed copies name their paths from where they
lie, so that rerunning one in place finds the results (two tiny notebooks executed here; the
series itself is executed by the smoke runs of test_notebooks.py)."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from ntps_nb import notebooks as nbs

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "data" / "results" / "default"
COMMITTED_REPORT = DEFAULT / "report"


def _entry(name, folder, *, status="ok", error="", html_file=True):
    notebook = folder / f"{name}.ipynb"
    notebook.write_text("{}")
    page = folder / f"{name}.html"
    if html_file:
        page.write_text("<html></html>")
    title = nbs.notebook_title(nbformat.read(nbs.notebook_path(name), as_version=4))
    return nbs.ReportEntry(name, title, nbs.DESCRIPTIONS[name], notebook, page if html_file else None, 12.4, status,
                           error, {})


def test_index_lists_every_notebook_and_marks_a_failing_one(tmp_path):
    failing = "03_per_model_correlation"
    entries = [_entry(name, tmp_path, status="failed" if name == failing else "ok",
                      error="KeyError: 'ntps' <b>" if name == failing else "") for name in nbs.NOTEBOOKS]
    index = nbs.write_report_index(entries, tmp_path, results_dir=DEFAULT)
    page = index.read_text()
    rows = re.findall(r"<tr><td>.*?</tr>", page, flags=re.S)
    assert len(rows) == len(nbs.NOTEBOOKS)
    for row, name in zip(rows, nbs.NOTEBOOKS):
        title = nbs.notebook_title(nbformat.read(nbs.notebook_path(name), as_version=4))
        assert title.startswith(name[:2]) and html.escape(title) in row and html.escape(nbs.DESCRIPTIONS[name]) in row
        assert f'href="{name}.html"' in row and f'href="{name}.ipynb"' in row and "12 s" in row
        assert ('class="failed"' in row) == (name == failing) and ('class="ok"' in row) == (name != failing)
    assert "KeyError: &#x27;ntps&#x27; &lt;b&gt;" in page  # the error, escaped
    assert f"6 of 7 notebooks ran; 1 failed: {failing}" in page
    readme = (tmp_path / "README.md").read_text()
    assert all(f"[{name}.ipynb]({name}.ipynb)" in readme for name in nbs.NOTEBOOKS)
    # without HTML files (the committed copies) the index links to what exists only
    bare = tmp_path / "bare"
    bare.mkdir()
    page = nbs.write_report_index([_entry("00_quickstart", bare, html_file=False)], bare).read_text()
    assert ".html\"" not in page and 'href="00_quickstart.ipynb"' in page


def test_every_notebook_of_the_series_has_a_title_and_a_description():
    for name in nbs.NOTEBOOKS:
        assert nbs.notebook_title(nbformat.read(nbs.notebook_path(name), as_version=4)).startswith(name[:2]), name
        assert nbs.DESCRIPTIONS.get(name), name


def test_report_paths_resolve_from_the_report_folder(tmp_path):
    """Inside the repository the paths are relative to the report folder (they survive a clone
    elsewhere); outside it, absolute. Either way they name the results and data files."""
    data_file = REPO / "data" / "examples" / "support_tickets.csv"
    for report in (COMMITTED_REPORT, REPO / "out" / "run-x" / "report", tmp_path / "report"):
        inside = report.resolve().is_relative_to(REPO)
        for name in nbs.NOTEBOOKS:
            params = nbs.report_parameters(name, DEFAULT, report)
            declared = nbs.notebook_parameters(name)
            assert ("results_dir" in params) == ("results_dir" in declared), name
            paths = {key: value for key, value in params.items() if key not in nbs.REPORT_PARAMETERS.get(name, {})}
            assert params == {**paths, **nbs.REPORT_PARAMETERS.get(name, {})}
            for key, value in paths.items():
                assert Path(value).is_absolute() != inside, (name, key, value)
                target = (report / value).resolve()
                assert target == (DEFAULT.resolve() if key == "results_dir" else data_file.resolve()), (name, key)
    assert nbs.report_parameters("03", DEFAULT, COMMITTED_REPORT) == {"results_dir": ".."}
    assert nbs.portable_path(tmp_path / "a" / "r", tmp_path / "b", root=tmp_path) == os.path.join("..", "a", "r")


def _tiny_notebook(path, body):
    nb = new_notebook(cells=[new_markdown_cell(f"# {path.stem[:2]} · Tiny\n\nA test notebook."),
                             new_code_cell('results_dir = "../results"\nlabel = "x"',
                                           metadata={"tags": ["parameters"]}),
                             new_code_cell(body)])
    nb.metadata.update({"kernelspec": dict(nbs.KERNELSPEC), "language_info": {"name": "python"}})
    nbformat.write(nb, path)


@pytest.mark.notebooks
def test_a_report_runs_in_its_folder_and_its_copies_rerun_in_place(tmp_path):
    import papermill

    source, results = tmp_path / "series", tmp_path / "results"
    source.mkdir(), results.mkdir()
    (results / "ntps.csv").write_text("layer,ntps\n0,0.5\n")
    finds = "from pathlib import Path\nprint('found results:', (Path(results_dir) / 'ntps.csv').is_file())"
    _tiny_notebook(source / "91_reads.ipynb", finds)
    _tiny_notebook(source / "92_fails.ipynb", "raise KeyError('no such table')")
    out = tmp_path / "deep" / "report"
    entries = nbs.run_report(results, out, names=[str(source / "91_reads.ipynb"), str(source / "92_fails.ipynb")],
                             html=True, jobs=1, timeout=120, root=tmp_path, log=lambda line: None)
    assert [(e.name, e.status) for e in entries] == [("91_reads", "ok"), ("92_fails", "failed")]
    assert "KeyError" in entries[1].error and "no such table" in entries[1].error
    assert entries[1].notebook.is_file() and entries[1].html.is_file()  # the failed copy shows its error
    assert entries[0].parameters == {"results_dir": os.path.join("..", "..", "results")}  # relative: inside root
    page = (out / "index.html").read_text()
    assert 'class="failed"' in page and "91_reads.html" in page and "1 of 2 notebooks ran" in page

    def printed(path):
        nb = nbformat.read(path, as_version=4)
        return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    assert "found results: True" in printed(entries[0].notebook)
    # rerun the executed copy where it lies, with no parameters: its injected cell still holds
    again = tmp_path / "again.ipynb"
    papermill.execute_notebook(str(entries[0].notebook), str(again), cwd=str(out), kernel_name=nbs.ensure_kernel(),
                               progress_bar=False, execution_timeout=120)
    assert "found results: True" in printed(again)


@pytest.mark.parametrize("results", [DEFAULT, REPO / "data" / "results" / "default-richardson"],
                         ids=["default", "default-richardson"])
def test_committed_report_copies_find_the_default_results(results):
    """data/results/<study>/report/ holds the series executed on the default study (plug-in, and
    the package's default estimator: what `make run` shows); each copy's injected parameters,
    read from that folder, name the committed results and files."""
    committed = results / "report"
    copies = sorted(committed.glob("*.ipynb"))
    if not copies:
        pytest.skip("no committed report copies")
    assert [p.stem for p in copies] == list(nbs.NOTEBOOKS)
    for path in copies:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, path.name
        injected = [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        expected = nbs.report_parameters(path.stem, results, committed)
        if expected:
            assert len(injected) == 1, path.name
            for key, value in expected.items():
                assert f"{key} = {value!r}" in injected[0].replace('"', "'"), (path.name, key)
                assert not isinstance(value, str) or (committed / value).exists(), (path.name, key)


@pytest.mark.notebooks
def test_notebooks_executed_side_by_side_take_their_share_of_the_cores(tmp_path, monkeypatch):
    """With two notebooks at a time, each kernel's own `ntps_nb.analysis_threads()` bound is
    cores // 2, not every core: two kernels whose OpenBLAS threads spin against each other made
    notebook 00 ~10x slower on 2 cores. Checked inside the kernels of a report of two tiny notebooks."""
    from ntps_nb.core.threads import PROCESSES_ENV, available_cores

    monkeypatch.delenv(PROCESSES_ENV, raising=False)  # as in `make run` (the tests' conftest sets it)
    source, results = tmp_path / "series", tmp_path / "results"
    source.mkdir(), results.mkdir()
    shows = ("import ntps_nb\nwith ntps_nb.analysis_threads() as n:\n"
             "    from threadpoolctl import threadpool_info\n"
             "    print('bound', n, 'blas', max(p['num_threads'] for p in threadpool_info()))")
    for name in ("93_first", "94_second"):
        _tiny_notebook(source / f"{name}.ipynb", shows)
    entries = nbs.run_report(results, tmp_path / "report", names=[str(source / f"{n}.ipynb") for n in ("93_first",
                             "94_second")], html=False, jobs=2, timeout=120, root=tmp_path, log=lambda line: None)
    share = max(1, available_cores() // 2)
    for entry in entries:
        assert entry.status == "ok", entry.error
        nb = nbformat.read(entry.notebook, as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert f"bound {share} blas {share}" in text, text


@pytest.mark.parametrize("results", [DEFAULT, REPO / "data" / "results" / "default-richardson"],
                         ids=["default", "default-richardson"])
def test_committed_report_copies_are_of_the_notebooks_as_they_are(results):
    """Each committed copy holds the cells of its notebook in ``notebooks/``, source for source (papermill's
    injected-parameters cell aside): a notebook changed without its reports re-executed fails here.
    Re-execute with ``python -m ntps_nb notebooks report --results <study> --out <study>/report --no-html``."""
    copies = sorted((results / "report").glob("*.ipynb"))
    if not copies:
        pytest.skip("no committed report copies")
    for path in copies:
        copy_cells = [c for c in nbformat.read(path, as_version=4).cells
                      if "injected-parameters" not in c.metadata.get("tags", [])]
        source_cells = nbformat.read(nbs.notebook_path(path.stem), as_version=4).cells
        assert [(c.cell_type, c.source) for c in copy_cells] == [(c.cell_type, c.source) for c in source_cells], (
            f"{path} is not an execution of {nbs.notebook_path(path.stem).name} as it is: re-execute the report")
