"""The number checker: every number quoted in a notebook's markdown must be printed by an output.

Fast: small notebooks built here, no kernel.
"""

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from ntps_nb import notebooks as nbs
from ntps_nb.cli import main


def _notebook(markdown: str, *printed: str, html: str | None = None, parameters: str | None = None):
    """A notebook whose markdown cell comes after code cells printing ``printed`` (stream) and
    an HTML table; ``parameters`` is the source of a cell tagged ``parameters``."""
    cells = []
    if parameters is not None:
        cells.append(new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    for text in printed:
        cells.append(new_code_cell("print(...)", outputs=[new_output("stream", name="stdout", text=text)]))
    if html is not None:
        cells.append(new_code_cell("table", outputs=[new_output("execute_result", data={"text/html": html,
                                                                                        "text/plain": "a table"})]))
    cells.append(new_markdown_cell(markdown))
    return new_notebook(cells=cells)


def _texts(markdown: str) -> list[str]:
    return [number.text for number in nbs.quoted_numbers(markdown)]


def test_a_planted_number_is_found_and_a_printed_one_passes():
    planted = _notebook("The probe reaches an accuracy of 0.83 on trec6.", "accuracy 0.79\n")
    [finding] = nbs.unprinted_numbers(planted)
    assert (finding.cell, finding.number, finding.line) == (1, "0.83", 1)
    assert "accuracy of 0.83" in finding.context and "cell 1" in str(finding)
    printed = _notebook("The probe reaches an accuracy of 0.83 on trec6.", "accuracy 0.8312\n")
    assert nbs.unprinted_numbers(printed) == []


def test_math_code_and_names_are_not_quoted_numbers():
    markdown = "\n".join([
        "Inline $k = 0.37$ and $$\\lambda_1 = 12.5$$ and \\(x = 0.25\\) are formulas;",
        "`max_train = 300` is code, as is",
        "```toml",
        "max_length = 640",
        "```",
        "SmolLM2-135M, TREC-6, Qwen2-0.5B, Q4_1 and Python 3.11.9 are names; arXiv 2505.17169 and",
        "SPEC section 10, Figure 12, notebooks 03-05 are places; 2025 and 2025-05-22 are dates;",
        "[a link](https://example.org/v0.75/file_10) and <span title='0.5'>x</span> are targets;",
        "k = 32 sets a formula, 95% intervals and a null 95% quantile are levels;",
        "a list of 1, 2 and 8 items is prose.",
        "10. a list marker",
        "## 11. a heading",
        "quoted on purpose: the paper used 5000 steps at lr 1e-4 <!-- quoted: paper, section 4 -->",
    ])
    assert _texts(markdown) == []


def test_values_are_quoted_numbers():
    markdown = ("rho -0.13, +0.77 and 0.75; 63% of pairs; perturbations of 2.6e-02; 1,500 instances; "
                "z between -1.8 and 1.5; 20 permutations over k = 1-8; a 64-token window; 1/11")
    numbers = {n.text: n for n in nbs.quoted_numbers(markdown)}
    assert list(numbers) == ["-0.13", "+0.77", "0.75", "63%", "2.6e-02", "1,500", "-1.8", "1.5", "20", "64", "11"]
    assert numbers["-0.13"].value == -0.13 and numbers["63%"].percent and numbers["63%"].value == 63
    assert numbers["2.6e-02"].value == pytest.approx(0.026) and numbers["2.6e-02"].tolerance == pytest.approx(5e-4)
    assert numbers["1,500"].value == 1500 and numbers["0.75"].tolerance == pytest.approx(0.005)


@pytest.mark.parametrize("output, printed", [
    ("0.7512", True), ("0.751", True), ("0.7549", True), ("0.745", True),
    ("0.7551", False), ("0.76", False), ("0.7", False), ("-0.75", False), ("7.5", False),
])
def test_a_number_with_n_decimals_matches_outputs_that_round_to_it(output, printed):
    nb = _notebook("an accuracy of 0.75", f"value {output}\n")
    assert (nbs.unprinted_numbers(nb) == []) is printed


@pytest.mark.parametrize("markdown, output, printed", [
    ("63% of pairs", "0.632", True), ("63% of pairs", "63.2%", True), ("63% of pairs", "0.64", False),
    ("a change of 2.6e-02", "0.0262", True), ("a change of 2.6e-02", "0.0266", False),
    ("20 permutations", "20.4", True), ("20 permutations", "19.4", False),
    ("rho -0.13", "-0.134", True), ("rho -0.13", "0.13", False), ("rho +0.77", "0.77", True),
])
def test_percentages_exponents_integers_and_signs(markdown, output, printed):
    assert (nbs.unprinted_numbers(_notebook(markdown, f"{output}\n")) == []) is printed


def test_a_default_index_and_a_figure_repr_print_nothing():
    table = pd.DataFrame({"accuracy": [0.61, 0.72]}).to_html()
    nb = _notebook("12 datasets, 0.72 at best, 360 pixels", html=table)
    nb.cells.insert(0, new_code_cell("fig", outputs=[new_output(
        "execute_result", data={"text/plain": "<Figure size 500x360 with 1 Axes>", "image/png": "iVBORw0KGgo="})]))
    assert [f.number for f in nbs.unprinted_numbers(nb)] == ["12", "360"]
    labelled = pd.DataFrame({"accuracy": [0.61, 0.72]}, index=[12, 30]).to_html()
    assert [f.number for f in nbs.unprinted_numbers(_notebook("12 datasets", html=labelled))] == []


def test_values_set_in_the_parameters_cell_count_as_printed():
    nb = _notebook("Defaults: 300 texts, 64 tokens, 1000 resamples.", parameters="max_train = 300\nmax_length = 64  # 1000")
    assert [f.number for f in nbs.unprinted_numbers(nb)] == ["1000"]


def test_cli_check_lists_findings_and_fails(tmp_path, capsys):
    bad, good = tmp_path / "bad.ipynb", tmp_path / "good.ipynb"
    nbformat.write(_notebook("NTPS 0.42 here", "ntps 0.39\n"), bad)
    nbformat.write(_notebook("NTPS 0.42 here", "ntps 0.4213\n"), good)
    assert main(["notebooks", "check", str(good)]) == 0
    assert main(["notebooks", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.ipynb: 1 number(s)" in out and "'0.42' in \"NTPS 0.42 here\"" in out
    with pytest.raises(FileNotFoundError, match="no notebook"):
        nbs.check_quoted_numbers([tmp_path / "missing.ipynb"])
