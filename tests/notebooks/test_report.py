"""The report of a study (`ntps_nb.notebooks.run_report`, what `make run` renders): its index lists
every notebook and marks a failing one, and the executed copies name their paths from where they
lie, so that rerunning one in place finds the results (two tiny notebooks executed here; the
series itself is executed by the smoke runs of test_notebooks.py)."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from pathlib import Path

import nbformat
import numpy as np
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
    with pytest.raises(FileNotFoundError, match="no combined study results at .*no ntps.csv"):
        nbs.run_report(tmp_path / "series", out, names=[str(source / "91_reads.ipynb")], log=lambda line: None)
    # rerun the executed copy where it lies, with no parameters: its injected cell still holds
    again = tmp_path / "again.ipynb"
    papermill.execute_notebook(str(entries[0].notebook), str(again), cwd=str(out), kernel_name=nbs.ensure_kernel(),
                               progress_bar=False, execution_timeout=120)
    assert "found results: True" in printed(again)
    # executing one of them again keeps the other's row, marked as from the earlier run
    lines = []
    again = nbs.run_report(results, out, names=[str(source / "91_reads.ipynb")], html=True, jobs=1, timeout=120,
                           root=tmp_path, log=lines.append)
    assert [e.name for e in again] == ["91_reads"]  # what this run executed
    assert any("kept the rows of 1 notebooks" in line and "92_fails" in line for line in lines)
    page = (out / "index.html").read_text()
    rows = re.findall(r"<tr><td>.*?</tr>", page, flags=re.S)
    assert len(rows) == 2 and "91_reads" in rows[0] and "92_fails" in rows[1]
    assert "earlier run" not in rows[0] and f"(earlier run, {entries[1].finished})" in rows[1]
    assert 'class="failed"' in rows[1] and "no such table" in rows[1]
    assert "1 of 2 notebooks ran; 1 failed: 92_fails; 1 of the rows are from earlier runs here: 92_fails" in page


def _series_copy(folder, name, results_dir, *, error=False):
    """An executed copy of a notebook of the series as a report leaves it: its injected results_dir, and an
    error output when ``error``."""
    nb = nbformat.read(nbs.notebook_path(name), as_version=4)
    cell = new_code_cell(f"results_dir = {results_dir!r}" if results_dir else "# Parameters",
                         metadata={"tags": ["injected-parameters"]})
    failing = new_code_cell("1/0")
    failing.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                              traceback=[])] if error else []
    nb.cells = [nb.cells[0], cell, failing]
    for added in (cell, failing):  # the series is nbformat 4.4: cells without ids
        added.pop("id", None)
    nbformat.write(nb, folder / f"{name}.ipynb")


def test_a_report_keeps_the_rows_of_the_notebooks_not_executed_again(tmp_path):
    """`earlier_report_entries`: from the record the index writes, rows as they were (time, status, error,
    when); from the executed copies where a folder has no record. Rows of other results, or whose copy is
    gone, are not kept."""
    results, other, out = tmp_path / "results", tmp_path / "other", tmp_path / "report"
    for folder in (results, other, out):
        folder.mkdir()
    names = list(nbs.NOTEBOOKS[:4])
    entries = [dataclasses.replace(_entry(name, out, status="failed" if name == names[1] else "ok",
                                          error="KeyError: 'x'" if name == names[1] else ""),
                                   parameters={"results_dir": "../results"} if name != names[2] else {})
               for name in names]
    entries[2] = dataclasses.replace(entries[2], seconds=float("nan"), finished="2026-01-02 03:04")
    nbs.write_report_index(entries, out, results_dir=results, extra_html="<p>check</p>")
    assert json.loads((out / nbs.REPORT_RECORD).read_text())["results_dir"] == str(results.resolve())
    (out / f"{names[3]}.ipynb").unlink()
    kept, extra = nbs.earlier_report_entries(out, results, skip=[names[0]])
    assert [e.name for e in kept] == names[1:3] and all(e.earlier for e in kept) and extra == "<p>check</p>"
    assert (kept[0].status, kept[0].error, kept[0].seconds) == ("failed", "KeyError: 'x'", 12.4)
    assert np.isnan(kept[1].seconds) and kept[1].finished == "2026-01-02 03:04"
    assert kept[0].notebook == out / f"{names[1]}.ipynb" and kept[0].html == out / f"{names[1]}.html"
    assert [e.name for e in nbs.earlier_report_entries(out, other)[0]] == [names[2]]  # the one reading no results
    page = nbs.write_report_index(sorted(kept + entries[:1], key=lambda e: e.name), out, results_dir=results).read_text()
    assert page.count("(earlier run") == 2 and "(earlier run, 2026-01-02 03:04)" in page and ">-</td>" in page
    # a folder without the record (a report written before it): the executed copies say what ran on these results
    bare = tmp_path / "bare"
    bare.mkdir()
    _series_copy(bare, names[0], "../results")
    _series_copy(bare, names[1], "../results", error=True)
    _series_copy(bare, names[2], "../other")
    _series_copy(bare, names[3], None)
    kept, extra = nbs.earlier_report_entries(bare, results)
    assert [(e.name, e.status, e.error) for e in kept] == [(names[0], "ok", ""),
                                                           (names[1], "failed", "ZeroDivisionError: division by zero"),
                                                           (names[3], "ok", "")]
    assert all(np.isnan(e.seconds) and e.finished == "" for e in kept)
    assert [e.parameters for e in kept] == [{"results_dir": "../results"}] * 2 + [{}]
    assert extra == "" and nbs.earlier_report_entries(bare, results, skip=[names[0]])[0][0].name == names[1]
    # a record cut short or edited by hand: warned of, and the copies answer
    for broken in ('{"entries": [{"name": ', f'{{"entries": [{{"name": "x", "notebook": "{names[0]}.ipynb"}}]}}',
                   "[1, 2]"):
        (bare / nbs.REPORT_RECORD).write_text(broken)
        with pytest.warns(UserWarning, match="report.json cannot be read"):
            again, _ = nbs.earlier_report_entries(bare, results)
        assert [e.name for e in again] == [e.name for e in kept]
    (bare / nbs.REPORT_RECORD).unlink()
    (bare / f"{names[0]}.ipynb").write_text("{}")  # a copy that is no notebook any more
    with pytest.warns(UserWarning, match=f"{names[0]}.ipynb cannot be read as a notebook"):
        assert [e.name for e in nbs.earlier_report_entries(bare, results)[0]] == [names[1], names[3]]


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


@pytest.mark.parametrize("results", [DEFAULT, REPO / "data" / "results" / "default-richardson"],
                         ids=["default", "default-richardson"])
def test_executing_one_committed_copy_again_keeps_the_others_rows(results):
    """What `notebooks report 03 --results <study> --out <study>/report` keeps: the other six copies' rows."""
    committed = results / "report"
    if not sorted(committed.glob("*.ipynb")):
        pytest.skip("no committed report copies")
    kept, _ = nbs.earlier_report_entries(committed, results, skip=["03_per_model_correlation"])
    assert [e.name for e in kept] == [name for name in nbs.NOTEBOOKS if name != "03_per_model_correlation"]
    assert all(e.ok and e.earlier for e in kept)
    reads = [name for name in nbs.NOTEBOOKS if "results_dir" in nbs.notebook_parameters(name)]
    assert reads and [e.name for e in nbs.earlier_report_entries(committed, REPO / "data" / "results" / "fast")[0]] \
        == [name for name in nbs.NOTEBOOKS if name not in reads]


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
    (results / "ntps.csv").write_text("layer,ntps\n0,0.5\n")
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
