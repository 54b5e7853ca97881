"""The offline parts of scripts/browser_check.py: the notebook it opens, how it reads errors from
the saved notebook, how it compares figures, and that CI runs it after the tests.

The browser run itself (JupyterLab + Chromium, about a minute) is CI's `make browser-check`, not
a test here: the suite must not need a browser.
"""

import importlib.util
import io
import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("browser_check", REPO / "scripts" / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(pixels):
    from PIL import Image

    image = Image.new("RGB", (len(pixels[0]), len(pixels)))
    image.putdata([p for row in pixels for p in row])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepared_notebook_builds_the_live_explorer_on_the_given_results(check, tmp_path):
    from ntps_nb.notebooks import SMOKE_PARAMETERS

    results = REPO / "data" / "results" / "default"
    path = check.prepare_notebook(REPO / "notebooks" / "05_explorer.ipynb", tmp_path, results, smoke=True)
    nb = nbformat.read(path, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    params = {}
    exec(injected[0].source, params)  # the values the kernel will see
    assert params["results_dir"] == str(results.resolve())
    assert params["interactive"] is True  # the smoke parameters alone would turn the widgets off
    assert SMOKE_PARAMETERS["05_explorer"]["interactive"] is False
    assert params["model"] == SMOKE_PARAMETERS["05_explorer"]["model"]
    # the injected cell comes right after the parameters cell, so it overrides it
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert nb.cells[at + 1] is injected[0]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert any("widgets.explorer(" in c.source for c in code)


def test_prepare_refuses_a_notebook_without_parameters_cell(check, tmp_path):
    source = tmp_path / "bare.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), source)
    with pytest.raises(check.CheckFailed, match="parameters"):
        check.prepare_notebook(source, tmp_path, REPO / "data" / "results" / "default", smoke=False)


def test_saved_notebook_problems_name_error_and_unrun_cells(check, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("text"),
        nbformat.v4.new_code_cell("x = 1", execution_count=1),
        nbformat.v4.new_code_cell("1 / 0", execution_count=2, outputs=[nbformat.v4.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])]),
        nbformat.v4.new_code_cell("y = 2"),
        nbformat.v4.new_code_cell("   "),  # an empty cell is never run and is not a problem
        nbformat.v4.new_code_cell("import warnings", execution_count=3, outputs=[nbformat.v4.new_output(
            "stream", name="stderr", text="UserWarning: a warning is not an error\n")]),
    ])
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    assert check.notebook_problems(path) == ["cell 2 ('1 / 0') raised ZeroDivisionError: division by zero",
                                             "cell 3 ('y = 2') did not run"]
    for cell in nb.cells[2:4]:
        cell.outputs, cell.execution_count = [], 9
    path.write_text(json.dumps(nb))
    assert check.notebook_problems(path) == []


def test_image_difference_counts_changed_pixels_over_the_shared_area(check):
    white, black = (255, 255, 255), (0, 0, 0)
    a = _png([[white] * 10 for _ in range(10)])
    b = _png([[white] * 10 for _ in range(9)] + [[white] * 7 + [black] * 3])
    assert check.image_difference(a, a) == 0.0
    assert check.image_difference(a, b) == pytest.approx(3 / 100)
    wider = _png([[white] * 12 for _ in range(10)])  # same content, two more columns
    assert check.image_difference(a, wider) == 0.0
    assert check.image_size(wider) == (12, 10)
    assert check.image_colours(a) == 1 and check.image_colours(b) == 2
    assert check.decode_png("data:image/png;base64," + __import__("base64").b64encode(b).decode()) == b
    assert check.decode_png("data:image/svg+xml;base64,AAAA") == b""


def test_ci_runs_the_browser_check_after_the_tests():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    test_line = next(i for i, line in enumerate(lines) if line.startswith("make test"))
    assert test_line < lines.index("make browser-check")
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/browser_check.py" in makefile and "'.[browser]'" in makefile
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'browser = ["playwright==' in pyproject
    assert "playwright install" not in (REPO / ".ci" / "run").read_text() + makefile
