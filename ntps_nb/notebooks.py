"""The notebook series: run it (papermill), keep it clean (metadata), and the small recipes it calls.

Three things live here:

1. tooling: `run_notebook` executes one notebook of ``notebooks/`` with papermill in the current
   interpreter's ``python3`` kernel and writes the executed notebook plus an HTML rendering;
   `clean_notebook` strips what must not be committed (kernel and papermill metadata, widget
   state, timings); `check_notebooks` lists what is wrong with the committed notebooks;
   `unprinted_numbers` lists the numbers a notebook's markdown quotes that none of its outputs
   prints; `run_report` executes the whole series on one study's results into a folder with an
   ``index.html`` (the main job's report); `register_cli` adds
   ``python -m ntps_nb notebooks run|check|clean|report``;
2. ``SMOKE_PARAMETERS``: tiny models and tiny subsets, so that the whole series runs in a few
   minutes (tests/notebooks);
3. recipes: the few multi-step computations the notebooks show (a model's per-layer NTPS beside
   its probes, the identity against fitted probes on real features, word projections for a
   Figure-1-style view). They orchestrate `ntps_nb.extract` and `ntps_nb.core`; the notebooks
   call them so that no cell carries more than a few lines of logic.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import html
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ntps_nb.core.score import GatheredInterpolationWarnings, integer_ranges, warnings_named

#: The repository's notebooks folder (source checkout / editable install).
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

#: The series, in order.
NOTEBOOKS = (
    "00_quickstart",
    "01_theory_derivation",
    "02_bound_checks",
    "03_per_model_correlation",
    "04_lora_gain_prediction",
    "05_explorer",
    "06_your_model_your_data",
)

#: Parameters that make each notebook run in seconds to a minute on 2 CPU cores: tiny random
#: models and tiny subsets. The numbers they print are smoke values, not results.
SMOKE_PARAMETERS: dict[str, dict[str, Any]] = {
    "00_quickstart": {"model": "tiny-llama", "dataset": "trec6", "max_train": 40, "max_test": 40, "max_length": 32,
                      "n_boot": 20},
    "01_theory_derivation": {"n_texts": 400, "n_checks": 20},
    "02_bound_checks": {"n_angles": 5, "n_texts": 400, "model": "tiny-llama", "dataset": "trec6", "max_train": 60,
                        "max_test": 40, "max_length": 32, "precision": "float64", "truth_draws": 10},
    "03_per_model_correlation": {"n_boot": 50, "n_perm": 20},
    "04_lora_gain_prediction": {"n_boot": 50, "n_perm": 20},
    # headless: a live widget under papermill once left the kernel waiting on its output area
    "05_explorer": {"model": "tiny-llama", "fig1_dataset": "tweet-sentiment", "fig1_max_train": 60, "max_length": 32,
                    "interactive": False},
    "06_your_model_your_data": {"model": "tiny-llama", "max_train": 40, "max_test": 30, "max_length": 32, "shards": 4,
                                "n_boot": 20},
}

#: Notebook-level metadata a committed notebook may carry (everything else is kernel/tool noise).
ALLOWED_NOTEBOOK_METADATA = {"kernelspec", "language_info"}
#: Cell-level metadata a committed notebook may carry: tags, and JupyterLab's hidden source (the
#: exercises' solution cells open collapsed).
ALLOWED_CELL_METADATA = {"tags", "jupyter"}
#: The only ``jupyter`` cell metadata kept: a hidden source (JupyterLab shows "..." until clicked).
HIDDEN_SOURCE = {"source_hidden": True}
#: The kernelspec every committed notebook names: the current environment's ``python3``.
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
#: Output MIME types that only mean something with live widget state.
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class NotebookCheckError(ValueError):
    """A committed notebook has unclean metadata or lacks a ``parameters`` cell."""


# -- names and paths ---------------------------------------------------------------------------


def notebook_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The notebook called ``name``: "00_quickstart", "00", "quickstart" or a path.

    Parameters
    ----------
    name : str
        A notebook's full name, number or name without the number, or the path of an existing
        ``.ipynb`` file (returned as it is).
    folder : str or PathLike, optional
        Folder of the series (default ``NOTEBOOK_DIR``).

    Returns
    -------
    Path
        ``<folder>/<full name>.ipynb`` (not checked to exist).

    Raises
    ------
    ValueError
        When ``name`` matches no notebook of the series, or several.
    """
    folder = Path(folder) if folder is not None else NOTEBOOK_DIR
    as_path = Path(name)
    if as_path.suffix == ".ipynb" and as_path.is_file():
        return as_path
    stem = as_path.stem if as_path.suffix == ".ipynb" else str(name)
    matches = [n for n in NOTEBOOKS if n == stem or n.split("_", 1)[0] == stem or n.split("_", 1)[1] == stem]
    if len(matches) != 1:
        raise ValueError(f"unknown notebook {name!r}; expected one of {list(NOTEBOOKS)} (or its number)")
    return folder / f"{matches[0]}.ipynb"


# -- metadata ----------------------------------------------------------------------------------


def clean_notebook(nb: Any, *, keep_injected: bool = True) -> Any:
    """A copy of ``nb`` (an nbformat node or a plain dict) without committed-file noise.

    Keeps the outputs. Removes notebook metadata other than a fixed ``python3`` kernelspec and
    the language name (papermill timings, widget state, kernel versions, ...), cell metadata
    other than tags and a hidden source (``{"jupyter": {"source_hidden": true}}``), widget-view outputs (meaningless without widget state, and their text/plain
    fallback is only the widget's repr), and renumbers execution counts 1, 2, ... in order. ``keep_injected=False``
    also drops papermill's ``injected-parameters`` cell.

    Parameters
    ----------
    nb : NotebookNode or dict
        The notebook (not modified).
    keep_injected : bool
        Keep papermill's ``injected-parameters`` cell.

    Returns
    -------
    NotebookNode
        The cleaned copy, nbformat 4.4 (no cell ids).
    """
    import nbformat

    nb = nbformat.from_dict(copy.deepcopy(dict(nb)))
    nb.metadata = nbformat.from_dict({"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}})
    cells = []
    count = 0
    for cell in nb.cells:
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if t]
        if "injected-parameters" in tags and not keep_injected:
            continue
        hidden = cell.get("metadata", {}).get("jupyter", {}).get("source_hidden") is True
        cell.metadata = nbformat.from_dict({**({"tags": tags} if tags else {}),
                                            **({"jupyter": dict(HIDDEN_SOURCE)} if hidden else {})})
        cell.pop("id", None)
        if cell.cell_type == "code":
            executed = cell.get("execution_count") is not None or bool(cell.get("outputs"))
            count += executed
            cell.execution_count = count if executed else None
            outputs = []
            for output in cell.get("outputs", []):
                output.pop("metadata", None) if output.get("output_type") == "stream" else None
                data = output.get("data")
                if data is not None:
                    if WIDGET_MIME in data:  # its text/plain fallback is only the widget's repr
                        continue
                    output["metadata"] = {}
                outputs.append(output)
            cell.outputs = outputs
        cells.append(cell)
    nb.cells = cells
    nb.nbformat, nb.nbformat_minor = 4, 4  # 4.4: no cell ids, so no random churn between runs
    return nb


def notebook_problems(nb: Any) -> list[str]:
    """What is unclean about one notebook (empty when it is fine).

    Parameters
    ----------
    nb : NotebookNode or dict

    Returns
    -------
    list of str
        One sentence per problem: extra notebook or cell metadata (a cell's ``jupyter`` metadata
        may only hide its source), another kernelspec,
        kernel-specific language_info, an injected-parameters cell, a widget-view output, or
        other than exactly one cell tagged ``parameters``.
    """
    problems = []
    extra = sorted(set(nb.get("metadata", {})) - ALLOWED_NOTEBOOK_METADATA)
    if extra:
        problems.append(f"notebook metadata has {extra} (only {sorted(ALLOWED_NOTEBOOK_METADATA)} are kept)")
    kernelspec = nb.get("metadata", {}).get("kernelspec", {})
    if kernelspec.get("name") != KERNELSPEC["name"]:
        problems.append(f"kernelspec name is {kernelspec.get('name')!r}, expected {KERNELSPEC['name']!r}")
    if set(nb.get("metadata", {}).get("language_info", {})) - {"name"}:
        problems.append("language_info carries kernel-specific fields (version, codemirror, ...)")
    parameters = 0
    for i, cell in enumerate(nb.get("cells", [])):
        meta = cell.get("metadata", {})
        extra = sorted(set(meta) - ALLOWED_CELL_METADATA)
        if extra:
            problems.append(f"cell {i} metadata has {extra}")
        if "jupyter" in meta and meta["jupyter"] != HIDDEN_SOURCE:
            problems.append(f"cell {i} jupyter metadata is {dict(meta['jupyter'])}; only {HIDDEN_SOURCE} is kept")
        parameters += "parameters" in meta.get("tags", [])
        if "injected-parameters" in meta.get("tags", []):
            problems.append(f"cell {i} is a papermill injected-parameters cell")
        for output in cell.get("outputs", []):
            if WIDGET_MIME in output.get("data", {}):
                problems.append(f"cell {i} has a widget-view output (widget state is not committed)")
    if parameters != 1:
        problems.append(f"{parameters} cells are tagged 'parameters'; expected exactly one")
    return problems


def check_notebooks(names: Sequence[str] | None = None, *, folder: str | os.PathLike | None = None,
                    raise_on_error: bool = True) -> dict[str, list[str]]:
    """`notebook_problems` of every notebook of the series (or ``names``); raise if any has one.

    A missing notebook is a problem too.

    Parameters
    ----------
    names : sequence of str, optional
        Notebooks to check (default: the whole series ``NOTEBOOKS``).
    folder : str or PathLike, optional
        Folder of the series (default ``NOTEBOOK_DIR``).
    raise_on_error : bool
        Raise `NotebookCheckError` listing every problem when any notebook has one.

    Returns
    -------
    dict of str to list of str
        Notebook name to its problems (an empty list when it is clean).
    """
    import nbformat

    report = {}
    for name in names or NOTEBOOKS:
        path = notebook_path(name, folder)
        if not path.is_file():
            report[path.stem] = [f"{path} does not exist"]
            continue
        report[path.stem] = notebook_problems(nbformat.read(path, as_version=4))
    bad = {name: problems for name, problems in report.items() if problems}
    if bad and raise_on_error:
        lines = [f"{name}: {problem}" for name, problems in bad.items() for problem in problems]
        raise NotebookCheckError("unclean notebooks (run `python -m ntps_nb notebooks clean`):\n  " + "\n  ".join(lines))
    return report


# -- numbers quoted in markdown ------------------------------------------------------------------
#
# A notebook's prose must not quote a result that its code does not print: the prose then goes
# stale the day the data or the code changes (notebook 03 once quoted the fast study's numbers
# above outputs of another run). `unprinted_numbers` lists every number of a markdown cell that
# no output of the executed notebook contains. What counts as a quoted number:
#
# * checked: decimals (0.75, -0.13, +0.77, 2.6e-02), percentages (63%), and integers of at least
#   MIN_CHECKED_INTEGER (smaller ones are counts in prose: "two classes", "top-2", "k = 1-8");
# * skipped as formula or code: anything inside $...$, $$...$$, \(...\), \[...\], `code spans`
#   and fenced code blocks;
# * skipped as not a value: parts of names and versions (TREC-6, SmolLM2-135M, Q4_1, 3.11.9),
#   anything in a link target, URL, HTML tag or comment, dates (2025-05-22) and years
#   (1900-2100), list and heading markers ("10. ..." at the start of a line), numbers after a
#   reference word (section 10, Figure 2, notebook 03, arXiv 2505.17169: REFERENCE_WORDS; a range
#   after one, "sections 12-15", too), integers set in a formula after a one-letter name and a
#   relation ("k = 32", "N = 300"), and confidence levels (a percentage followed within three
#   words by interval, confidence, CI, level or quantile: "95% intervals");
# * opted out: every number on a line that carries ``<!-- quoted: SOURCE -->`` (HTML comments do
#   not render), for constants quoted from a named source (the paper, a benchmark) on purpose.
#
# A number with n decimals is printed when some output number rounds to it at n decimals
# (0.75 matches 0.7512 and 0.751, not 0.76 nor 0.7); a percentage p% also matches an output
# p/100 (63% matches 0.632). Outputs are text/plain, text/html, text/markdown, text/latex and
# stream outputs, plus the values assigned in the cell tagged ``parameters`` (and papermill's
# ``injected-parameters``): the settings a reader sees right there.

#: Integers below this are not checked: counts in prose ("two classes", "top-2", "k = 1-8").
MIN_CHECKED_INTEGER = 10
#: Words after which a number names a place, not a value ("section 10", "Figure 2").
REFERENCE_WORDS = frozenset({
    "section", "sections", "sec", "§", "figure", "figures", "fig", "table", "tables", "eq", "eqs", "equation",
    "equations", "chapter", "appendix", "notebook", "notebooks", "cell", "cells", "line", "lines", "step", "steps",
    "issue", "issues", "item", "items", "theorem", "lemma", "proposition", "part", "arxiv", "commit", "version",
    "python", "pr", "#",
})
#: A line carrying this HTML comment quotes its numbers from the named source on purpose.
QUOTED_MARKER = re.compile(r"<!--\s*quoted:\s*[^\s>-][^>]*?-->")
#: Output MIME types whose text is searched for printed numbers.
TEXT_MIME = ("text/plain", "text/html", "text/markdown", "text/latex")

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})[^\n]*\n.*?(?:^\1?\2[`~]*[ \t]*$|\Z)", re.M | re.S)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_MATH = re.compile(r"\$\$.+?\$\$|(?<![\\$])\$(?!\s)(?:\\\$|[^$])+?(?<![\s\\])\$|\\\(.+?\\\)|\\\[.+?\\\]", re.S)
_SKIPPED_TEXT = re.compile(r"<!--.*?-->|\]\([^)]*\)|https?://\S+|<[A-Za-z/][^>\n]*>|\b\d{4}-\d{2}-\d{2}\b", re.S)
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_EXPONENT = re.compile(r"[eE]([-+\u2212]?\d+)")
_FORMULA_BEFORE = re.compile(r"(?:^|[^\w.])[A-Za-z](?:_\w+)?\s*(?:=|<=|>=|≤|≥|<|>|≈|~)\s*$")
_LEVEL_AFTER = re.compile(r"^\s*%?\s*(?:[\w-]+\s+){0,2}(?:intervals?|confidence|CIs?|levels?|quantiles?)\b", re.I)
_MARKER_BEFORE = re.compile(r"^\s*(?:>\s*)*(?:#{1,6}\s*|[-*+]\s+)?$")
_OUTPUT_NUMBER = re.compile(r"([-+\u2212]?)(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+\u2212]?\d+))?(\s?%)?")
_THOUSANDS = re.compile(r"(?<![\d,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])")


@dataclasses.dataclass(frozen=True)
class QuotedNumber:
    """One number a markdown cell quotes as a value.

    Attributes
    ----------
    text : as written, sign and percent sign included ("-0.13", "63%").
    value : its value (a percentage's number before the % sign: 63.0 for "63%").
    decimals : digits after the decimal point (of the mantissa, for 2.6e-02).
    exponent : the power of ten written after it (-2 for 2.6e-02; 0 without one).
    percent : whether it is a percentage.
    line : line of the cell it is on (1 = first).
    context : that line, stripped.
    """

    text: str
    value: float
    decimals: int
    exponent: int
    percent: bool
    line: int
    context: str

    @property
    def tolerance(self) -> float:
        """Half a unit of the last written digit: an output within it rounds to this number."""
        return 0.5 * 10.0 ** (self.exponent - self.decimals)


@dataclasses.dataclass(frozen=True)
class NumberFinding:
    """A number quoted in a markdown cell that no output of the notebook prints."""

    cell: int
    number: str
    line: int
    context: str

    def __str__(self) -> str:
        return f"cell {self.cell}, line {self.line}: {self.number!r} in \"{_shorten(self.context, self.number)}\""


def _shorten(context: str, number: str, width: int = 110) -> str:
    if len(context) <= width:
        return context
    at = max(context.find(number), 0)
    start = max(0, min(at - width // 2, len(context) - width))
    return ("..." if start else "") + context[start:start + width] + ("..." if start + width < len(context) else "")


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, newlines kept (offsets and line numbers stay valid)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _previous_word(text: str) -> str:
    words = text.rstrip().split()
    return words[-1].lower().rstrip(".:,;(") if words else ""


def quoted_numbers(markdown: str) -> list[QuotedNumber]:
    """The numbers a markdown text quotes as values, by the rules of this section (above).

    Parameters
    ----------
    markdown : str
        The source of one markdown cell.

    Returns
    -------
    list of QuotedNumber
        In reading order.
    """
    masked = markdown
    for pattern in (_FENCE, _CODE_SPAN, _MATH, _SKIPPED_TEXT):
        masked = pattern.sub(_blank, masked)
    found = []
    for line_no, (line, original) in enumerate(zip(masked.split("\n"), markdown.split("\n")), start=1):
        if QUOTED_MARKER.search(original):
            continue
        skipped_end = None  # end of the last number skipped as a reference or formula (ranges inherit it)
        for match in _NUMBER.finditer(line):
            start, end = match.span()
            before, after = line[:start], line[end:]
            prev = before[-1:] if before else ""
            if prev and (_is_word_char(prev) or prev == "." or prev == ","):
                continue  # inside a name, a version, a list "1,2"
            sign, range_member = "", False
            if prev in ("-", "+", "\u2212", "\u2013"):
                prev2 = before[-2:-1]
                if prev2 and (prev2.isalpha() or prev2 == "_"):
                    continue  # part of a name: TREC-6, top-2
                if prev2 and (prev2.isdigit() or prev2 in ")]") or prev == "\u2013":
                    range_member = True  # 1-8, 12-15
                else:
                    sign = "-" if prev in ("-", "\u2212") else "+"
            exponent, exponent_text = 0, ""
            exp = _EXPONENT.match(after)
            if exp and not (after[exp.end():exp.end() + 1] and _is_word_char(after[exp.end()])):
                exponent, exponent_text = int(exp.group(1).replace("\u2212", "-")), exp.group(0)
                end += exp.end()
                after = line[end:]
            if after[:1] and (_is_word_char(after[0]) or (after[0] == "." and after[1:2].isdigit())):
                continue  # a unit glued to it (135M, 2x) or a version (3.11.9)
            percent = after[:1] == "%" or after[:2] == " %"
            body = match.group(0)
            decimals = len(body.split(".")[1]) if "." in body else 0
            integer = decimals == 0 and not exponent_text and not percent
            mantissa = float(body.replace(",", "")) * (-1 if sign == "-" else 1)
            if range_member and skipped_end is not None and start - skipped_end <= 2:
                skipped_end = end
                continue
            if _previous_word(before.rstrip("-+\u2212\u2013 ")) in REFERENCE_WORDS or (
                    integer and _FORMULA_BEFORE.search(before[:len(before) - len(sign)])):
                skipped_end = end
                continue
            if integer and (abs(mantissa) < MIN_CHECKED_INTEGER or (not sign and len(body) == 4 and 1900 <= mantissa <= 2100)):
                continue
            if integer and _MARKER_BEFORE.match(before) and re.match(r"[.)](\s|$)", after):
                continue  # "10. item" / "## 7. Heading"
            if percent and _LEVEL_AFTER.match(after):
                continue  # a confidence level: "95% intervals"
            text = sign + body + exponent_text + ("%" if percent else "")
            found.append(QuotedNumber(text, mantissa * 10.0 ** exponent, decimals, exponent, percent, line_no,
                                      original.strip()))
    return found


def _output_texts(nb: Any) -> list[str]:
    texts = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(_joined(output.get("text", "")))
            data = output.get("data", {})
            for mime in TEXT_MIME:
                if mime not in data:
                    continue
                if mime == "text/plain" and ("text/html" in data or any(m.startswith("image/") for m in data)):
                    continue  # the same table again, or a figure's repr ("<Figure size 500x360 ...>")
                text = _joined(data[mime])
                if mime == "text/html":
                    text = html.unescape(re.sub(r"<[^>]+>", " ", _without_range_index(text)))
                texts.append(text)
    return texts


def _without_range_index(text: str) -> str:
    """A pandas HTML table without its row labels when they count 0, 1, 2, ... (a default index
    prints numbers that mean nothing)."""
    def body(match: re.Match) -> str:
        rows = re.findall(r"<tr[^>]*>.*?</tr>", match.group(0), re.S)
        labels = [m.group(1).strip() for m in (re.search(r"<th[^>]*>(.*?)</th>", row, re.S) for row in rows) if m]
        counts = [int(label) for label in labels if label.isdigit()]
        if counts and counts[0] == 0 and all(b > a for a, b in zip(counts, counts[1:])) \
                and len(counts) + labels.count("...") == len(labels) == len(rows):
            return re.sub(r"(<tr[^>]*>\s*)<th[^>]*>.*?</th>", r"\1", match.group(0), flags=re.S)
        return match.group(0)

    return re.sub(r"<tbody>.*?</tbody>", body, text, flags=re.S)


def _joined(text: str | Sequence[str]) -> str:
    return text if isinstance(text, str) else "".join(text)


def _parameter_values(source: str) -> list[float]:
    """The numbers a parameters cell assigns (not those of its comments)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [float(node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)]


def printed_numbers(nb: Any) -> np.ndarray:
    """Every number the outputs of an executed notebook print, and those its parameters cell sets.

    Reads text/html (tags removed, and a pandas table's row labels when they only count 0, 1,
    2, ...), text/plain where an output has neither HTML nor an image (a figure's repr prints its
    size), text/markdown, text/latex and stream outputs; a
    number printed as a percentage counts as p and as p/100, a hyphenated one ("0-30", "1e-6")
    as written. Values assigned in cells tagged ``parameters`` or ``injected-parameters`` count
    too (the settings shown right there).

    Parameters
    ----------
    nb : NotebookNode or dict
        An executed notebook.

    Returns
    -------
    ndarray
        The values, sorted (float64).
    """
    values = []
    for text in _output_texts(nb):
        for match in _OUTPUT_NUMBER.finditer(text):
            sign, body, exponent, percent = match.groups()
            value = float(body.rstrip(".")) * 10.0 ** int((exponent or "0").replace("\u2212", "-"))
            before = text[match.start() - 1:match.start()]
            signed = -value if sign in ("-", "\u2212") else value
            values.append(signed)
            if sign and before and before.isalnum():
                values.append(value)  # "0-30": a range, not a negative number
            if percent:
                values.append(signed / 100)
        values += [float(m.group(0).replace(",", "")) for m in _THOUSANDS.finditer(text)]  # 1,500
    for cell in nb.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.get("cell_type") == "code" and ("parameters" in tags or "injected-parameters" in tags):
            values += _parameter_values(_joined(cell.get("source", "")))
    return np.sort(np.asarray(values, dtype=np.float64))


def _is_printed(number: QuotedNumber, printed: np.ndarray) -> bool:
    tolerance = number.tolerance * (1 + 1e-9) + 1e-12 * abs(number.value)
    for scale in (1.0, 0.01) if number.percent else (1.0,):
        lo = np.searchsorted(printed, (number.value - tolerance) * scale, side="left")
        hi = np.searchsorted(printed, (number.value + tolerance) * scale, side="right")
        if hi > lo:
            return True
    return False


def unprinted_numbers(nb: Any) -> list[NumberFinding]:
    """The numbers quoted in markdown cells of an executed notebook that no output prints.

    See the rules at the top of this section: which numbers count (`quoted_numbers`), where
    printed ones are read from (`printed_numbers`) and the rounding rule (a number with n
    decimals matches an output that rounds to it at n decimals).

    Parameters
    ----------
    nb : NotebookNode or dict
        An executed notebook (its outputs are what the markdown may quote).

    Returns
    -------
    list of NumberFinding
        One per unprinted number: cell index, the number as written, its line and context.
    """
    printed = printed_numbers(nb)
    findings = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "markdown":
            continue
        for number in quoted_numbers(_joined(cell.get("source", ""))):
            if not _is_printed(number, printed):
                findings.append(NumberFinding(index, number.text, number.line, number.context))
    return findings


def check_quoted_numbers(paths: Sequence[str | os.PathLike]) -> dict[str, list[NumberFinding]]:
    """`unprinted_numbers` of each executed notebook file.

    Parameters
    ----------
    paths : sequence of str or PathLike
        Executed notebooks (``.ipynb``), or names of the series (their committed copies, which
        carry the outputs of their default run).

    Returns
    -------
    dict of str to list of NumberFinding
        Path to its findings (an empty list when every quoted number is printed).

    Raises
    ------
    FileNotFoundError
        When a path does not exist.
    """
    import nbformat

    report = {}
    for item in paths:
        path = Path(item) if str(item).endswith(".ipynb") else notebook_path(str(item))
        if not path.is_file():
            raise FileNotFoundError(f"no notebook at {path}")
        report[str(path)] = unprinted_numbers(nbformat.read(path, as_version=4))
    return report


# -- execution ---------------------------------------------------------------------------------


def ensure_kernel(name: str = "python3") -> str:
    """Make sure kernel ``name`` runs THIS interpreter (the project's venv), installing a
    kernelspec into ``sys.prefix`` when it does not; return the name for papermill.

    Parameters
    ----------
    name : str
        Kernel name.

    Returns
    -------
    str
        ``name``.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        argv0 = spec.argv[0]
        runs_here = argv0 in ("python", "python3", "{python}") or Path(argv0).resolve() == Path(sys.executable).resolve()
    except NoSuchKernel:
        runs_here = False
    if not runs_here:
        from ipykernel.kernelspec import install

        install(kernel_name=name, prefix=sys.prefix, display_name=KERNELSPEC["display_name"])
    return name


@dataclasses.dataclass(frozen=True)
class NotebookRun:
    """Where an executed notebook went and how long it took."""

    name: str
    notebook: Path
    html: Path | None
    seconds: float
    parameters: dict[str, Any]


def run_notebook(name: str, parameters: Mapping[str, Any] | None = None, out_dir: str | os.PathLike = "out/notebooks",
                 smoke: bool = False, *, html: bool = True, in_place: bool = False,
                 timeout: int | None = 1800, cwd: str | os.PathLike | None = None) -> NotebookRun:
    """Execute one notebook with papermill; write the cleaned executed copy and its HTML.

    Parameters
    ----------
    name : notebook name or number (see `notebook_path`).
    parameters : values for the cell tagged ``parameters`` (override the smoke ones).
    out_dir : folder of ``<name>.ipynb`` and ``<name>.html``.
    smoke : start from ``SMOKE_PARAMETERS[name]`` (tiny models, tiny subsets).
    in_place : also write the executed, cleaned notebook back over ``notebooks/<name>.ipynb``
        (how the committed outputs are refreshed; only without parameters or smoke).
    html : also write ``<name>.html`` (nbconvert).
    timeout : per-cell timeout in seconds.
    cwd : folder the kernel runs in (default: ``notebooks/``, where the defaults' relative paths
        point from). `run_report` runs each notebook in its output folder, so that the paths it
        passes, relative to that folder, also hold when the executed copy is rerun where it lies.

    Returns
    -------
    NotebookRun
        The notebook's name, the executed copy's path, the HTML path (None without ``html``),
        the wall seconds of the execution and the parameters passed.

    Raises
    ------
    papermill.PapermillExecutionError
        When a cell raises; the executed copy (with the error) is still written, cleaned and
        rendered to HTML first.
    """
    import nbformat
    import papermill

    source = notebook_path(name)
    params = {**(SMOKE_PARAMETERS.get(source.stem, {}) if smoke else {}), **dict(parameters or {})}
    declared = declared_parameters(str(source))
    unknown = sorted(set(params) - set(declared))
    if unknown:  # papermill would inject them and run on the defaults they were meant to replace
        raise ValueError(f"{source.stem} has no parameter(s) {unknown}; its parameters cell sets {declared}")
    if in_place and params:
        raise ValueError("in_place writes the committed notebook: run it with its own defaults (no parameters, no smoke)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(source), str(target), parameters=params, kernel_name=ensure_kernel(),
                                   cwd=str(cwd if cwd is not None else source.parent), progress_bar=False,
                                   log_output=False, execution_timeout=timeout,
                                   # the kernel's own warnings (TCP transport, ...) are noise in a job's output
                                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except Exception:
        if target.is_file():  # papermill wrote the copy up to the failing cell: keep it readable
            _finish_executed(target, html=html, keep_injected=True)
        raise
    seconds = time.perf_counter() - start
    executed, html_path = _finish_executed(target, html=html, keep_injected=not in_place)
    if in_place:
        nbformat.write(executed, source)
    return NotebookRun(source.stem, target, html_path, seconds, params)


def _finish_executed(target: Path, *, html: bool, keep_injected: bool) -> tuple[Any, Path | None]:
    """Clean the executed copy at ``target`` in place and render ``<target>.html`` next to it."""
    import nbformat

    executed = clean_notebook(nbformat.read(target, as_version=4), keep_injected=keep_injected)
    nbformat.write(executed, target)
    html_path = None
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(executed)
        html_path = target.with_suffix(".html")
        html_path.write_text(body, encoding="utf-8")
    return executed, html_path


def _parse_value(text: str) -> Any:
    """A -p value: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cli_run(args) -> int:
    names = list(NOTEBOOKS) if args.all else [args.name]
    if not args.all and args.name is None:
        print("give a notebook name or --all", file=sys.stderr)
        return 2
    params = {key: _parse_value(value) for key, value in (args.parameter or [])}
    if args.in_place and (params or args.smoke):
        print("--in-place writes the committed notebooks: run them with their own defaults (no -p, no --smoke)",
              file=sys.stderr)
        return 2
    declared = {name: declared_parameters(name) for name in names}
    unknown = sorted(set(params) - set().union(*declared.values()))
    if unknown:
        print(f"no notebook of {', '.join(names)} has parameter(s) {unknown}", file=sys.stderr)
        return 2
    for name in names:  # with --all, each notebook gets the parameters it has
        own = {key: value for key, value in params.items() if key in declared[name]}
        result = run_notebook(name, own, args.out, smoke=args.smoke, in_place=args.in_place)
        print(f"{result.name}: {result.seconds:.0f} s -> {result.notebook}" + (f", {result.html}" if result.html else ""))
    return 0


def _cli_check(args) -> int:
    status = 0
    if not args.notebooks:  # the committed series: metadata, then the numbers of their default-run outputs
        report = check_notebooks(raise_on_error=False)
        for name, problems in report.items():
            print(f"{name}: " + ("metadata ok" if not problems else "; ".join(problems)))
        status = int(any(report.values()))
    findings = check_quoted_numbers(args.notebooks or [notebook_path(name) for name in NOTEBOOKS])
    for path, found in findings.items():
        if not found:
            print(f"{path}: every number quoted in markdown is printed")
            continue
        print(f"{path}: {len(found)} number(s) quoted in markdown appear in no output "
              "(print them from a code cell, or mark a quoted constant with <!-- quoted: SOURCE -->):")
        for finding in found:
            print(f"  {finding}")
    return status or int(any(findings.values()))


def _cli_clean(args) -> int:
    import nbformat

    for name in args.names or NOTEBOOKS:
        path = notebook_path(name)
        nbformat.write(clean_notebook(nbformat.read(path, as_version=4), keep_injected=False), path)
        print(f"cleaned {path}")
    return 0


# -- the report of a study: every notebook executed on its results, with an index ----------------

#: The repository (source checkout): a report written inside it points at results and data files
#: through paths relative to itself, so that the executed copies still find them when the
#: repository is cloned elsewhere; a report written outside it uses absolute paths.
REPOSITORY = NOTEBOOK_DIR.parent

#: What each notebook shows, in one line, for the report's index page.
DESCRIPTIONS = {
    "00_quickstart": "NTPS of one model on one dataset: the default estimator per layer with its jackknife "
                     "intervals and reliability flag, beside the held-out probe; how an interval narrows with "
                     "more texts.",
    "01_theory_derivation": "The derivation of NTPS and of the excess-loss identity and bounds, every step checked "
                            "numerically; a 3-d example worked by hand.",
    "02_bound_checks": "The bounds on planted synthetic tasks, then the identity against fitted probes on real "
                       "features, and the held-out excess loss for contrast; last, one NTPS as an estimate of a "
                       "known population value.",
    "03_per_model_correlation": "Does NTPS rank datasets like the probes do? Per model: in-sample vs leave-one-"
                                "dataset-out selection, permutation nulls, baselines, random controls, peers.",
    "04_lora_gain_prediction": "Does NTPS predict the gain of LoRA fine-tuning over the probe? The study's LoRA runs "
                               "beside the paper's Figure 3.",
    "05_explorer": "NTPS by model, dataset, layer and k (live widgets in a kernel; here their first view), and a "
                   "Figure-1-style view of words on the top U and V directions.",
    "06_your_model_your_data": "NTPS on your own model and CSV/parquet file: its cost printed before it runs, then "
                               "NTPS per layer beside the held-out probe.",
}

#: Parameters the report passes beyond the paths (`report_parameters`). No notebook is made
#: faster: each one's defaults fit `make run`'s budget (10 minutes on 2 cores with the fresh unit;
#: measured in the README). 05 runs headless: its live widget cell under papermill now and then
#: leaves the kernel waiting on the widget's output area until the cell limit (seen here on a rerun
#: of the executed copy), and the HTML shows the same first view either way (widget state is not
#: kept); set ``interactive = True`` in the copy to get the widgets in JupyterLab.
REPORT_PARAMETERS: dict[str, dict[str, Any]] = {"05_explorer": {"interactive": False}}

#: Per-cell limit of a report run: a stuck kernel fails its notebook instead of holding the job.
REPORT_CELL_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class ReportEntry:
    """One notebook of a report: what it is, where its executed copy went, and how its run ended."""

    name: str
    title: str
    description: str
    notebook: Path | None
    html: Path | None
    seconds: float
    status: str  # "ok" or "failed"
    error: str
    parameters: dict[str, Any]
    finished: str = ""  # when its run ended ("%Y-%m-%d %H:%M"); "" where unknown
    earlier: bool = False  # kept from an earlier run into the same folder (`run_report` with ``names``)

    @property
    def ok(self) -> bool:
        """True when every cell ran."""
        return self.status == "ok"


def notebook_parameters(name: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The defaults that a notebook's cell tagged ``parameters`` assigns.

    Parameters
    ----------
    name : str
        A notebook of the series (see `notebook_path`) or the path of an ``.ipynb`` file.
    folder : str or PathLike, optional
        Folder of the series (default ``NOTEBOOK_DIR``).

    Returns
    -------
    dict
        Parameter name to its literal value, in the cell's order (assignments that are not
        literals are left out).
    """
    import nbformat

    nb = nbformat.read(notebook_path(name, folder), as_version=4)
    return _tagged_assignments(nb, "parameters")


def declared_parameters(name: str, folder: str | os.PathLike | None = None) -> list[str]:
    """The names a notebook's cell tagged ``parameters`` assigns, literal or not, in its order.

    Parameters
    ----------
    name, folder : as in `notebook_parameters`.

    Returns
    -------
    list of str
        The parameters papermill can set (an empty list for a notebook without the cell).
    """
    import nbformat

    nb = nbformat.read(notebook_path(name, folder), as_version=4)
    names: list[str] = []
    for node in ast.parse(_tagged_source(nb, "parameters")).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def _tagged_source(nb: Any, tag: str) -> str:
    """The source of a notebook's first cell tagged ``tag`` ("" without one)."""
    return next((_joined(c.get("source", "")) for c in nb.get("cells", [])
                 if tag in c.get("metadata", {}).get("tags", [])), "")


def _tagged_assignments(nb: Any, tag: str) -> dict[str, Any]:
    """The literal values the first cell tagged ``tag`` assigns (``parameters``, or papermill's
    ``injected-parameters`` in an executed copy); assignments that are not literals are left out."""
    values: dict[str, Any] = {}
    for node in ast.parse(_tagged_source(nb, tag)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def notebook_title(nb: Any) -> str:
    """The first heading of a notebook's first markdown cell, without the ``#`` marks.

    Parameters
    ----------
    nb : NotebookNode or dict

    Returns
    -------
    str
        The heading, or "" when the first markdown cell has none.
    """
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in _joined(cell.get("source", "")).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
            return ""
    return ""


def portable_path(target: str | os.PathLike, start: str | os.PathLike, *,
                  root: str | os.PathLike = REPOSITORY) -> str:
    """``target`` as a notebook running in ``start`` should name it: relative to ``start`` when
    both lie inside ``root`` (the repository: the path survives a clone elsewhere), else absolute.

    Parameters
    ----------
    target : str or PathLike
        The file or folder to point at.
    start : str or PathLike
        The folder the path is read from (where the notebook runs).
    root : str or PathLike
        The tree inside which relative paths are used (default `REPOSITORY`).

    Returns
    -------
    str
        ``os.path.relpath(target, start)`` or the absolute path of ``target``.
    """
    target, start, root = (Path(p).resolve() for p in (target, start, root))
    if target.is_relative_to(root) and start.is_relative_to(root):
        return os.path.relpath(target, start)
    return str(target)


def report_parameters(name: str, results_dir: str | os.PathLike, report_dir: str | os.PathLike, *,
                      folder: str | os.PathLike | None = None, root: str | os.PathLike = REPOSITORY) -> dict[str, Any]:
    """The parameters one notebook of a report runs with, in ``report_dir``.

    ``results_dir`` (when the notebook declares it) points at the study's results; every other
    default that is a relative path from the notebooks folder to an existing file or folder
    (06's ``data_path``) is re-expressed from ``report_dir``; both by `portable_path`, so the
    executed copy finds them when it is rerun where it lies. `REPORT_PARAMETERS` adds the rest.

    Parameters
    ----------
    name : str
        A notebook of the series or the path of an ``.ipynb`` file.
    results_dir : str or PathLike
        The combined study folder the notebooks read.
    report_dir : str or PathLike
        Where the executed copy is written and the kernel runs.
    folder : str or PathLike, optional
        Folder of the series (default ``NOTEBOOK_DIR``).
    root : str or PathLike
        See `portable_path`.

    Returns
    -------
    dict
        Parameter name to value, for papermill.
    """
    source = notebook_path(name, folder)
    params: dict[str, Any] = {}
    for key, value in notebook_parameters(str(source)).items():
        if key == "results_dir":
            params[key] = portable_path(results_dir, report_dir, root=root)
        elif isinstance(value, str) and value.startswith(("./", "../")) and (source.parent / value).exists():
            params[key] = portable_path(source.parent / value, report_dir, root=root)
    return {**params, **REPORT_PARAMETERS.get(source.stem, {})}


def _error_text(error: BaseException) -> str:
    """One line for the index: a cell's exception name and message, or the runner's error."""
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    return _one_line(f"{ename}: {evalue}" if ename else f"{type(error).__name__}: {error}")


def _one_line(text: str, width: int = 300) -> str:
    """``text`` on one line for the index, cut to ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _report_one(source: str, params: dict[str, Any], out_dir: str, html: bool, timeout: int | None) -> ReportEntry:
    """Run one notebook of a report in ``out_dir``; a failure is returned, not raised."""
    import nbformat

    nb = nbformat.read(source, as_version=4)
    stem = Path(source).stem
    title, description = notebook_title(nb) or stem, DESCRIPTIONS.get(stem, "")
    start = time.perf_counter()
    try:
        run = run_notebook(source, params, out_dir, html=html, timeout=timeout, cwd=out_dir)
    except Exception as error:  # reported in the index; the other notebooks still run
        target = Path(out_dir) / Path(source).name
        html_path = target.with_suffix(".html")
        return ReportEntry(stem, title, description, target if target.is_file() else None,
                           html_path if html and html_path.is_file() else None, time.perf_counter() - start,
                           "failed", _error_text(error), params, time.strftime(STAMP_FORMAT))
    return ReportEntry(stem, title, description, run.notebook, run.html, run.seconds, "ok", "", params,
                       time.strftime(STAMP_FORMAT))


def _limit_threads(threads: int, jobs: int) -> None:
    """In a report worker: the kernels it starts share the cores with the other workers' kernels.

    Both the pools' initial size and the bound a notebook sets itself: `ntps_nb.analysis_threads()`
    in a kernel reads ``NTPS_NB_ANALYSIS_PROCESSES`` (set here to ``jobs``) and takes its share
    (cores // jobs); without it each kernel took every core, and two kernels' OpenBLAS threads
    spinning against each other on 2 cores made notebook 00's interval cell ~10x slower (it ran
    past the 600 s cell timeout)."""
    from ntps_nb.core.threads import PROCESSES_ENV

    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    os.environ.setdefault(PROCESSES_ENV, str(jobs))


def default_jobs() -> int:
    """Notebooks a report runs at once: two where there are two cores (the series' longest two,
    00 and 03, then overlap), else one.

    Returns
    -------
    int
        ``min(2, available cores)`` (``ntps_nb.core.threads.available_cores``: the CPU affinity).
    """
    from ntps_nb.core.threads import available_cores

    return max(1, min(2, available_cores()))


#: The record of a report's rows, next to its index: what a later run of some of its notebooks into the same
#: folder reads to keep the others' rows (`earlier_report_entries`).
REPORT_RECORD = "report.json"

#: How the index stamps a run.
STAMP_FORMAT = "%Y-%m-%d %H:%M"


def _record_of(entries: Sequence[ReportEntry], out: Path, results_dir: str | os.PathLike | None,
               extra_html: str) -> dict[str, Any]:
    def relative(path: Path | None) -> str | None:
        return os.path.relpath(path, out) if path is not None else None

    rows = [{**dataclasses.asdict(e), "notebook": relative(e.notebook), "html": relative(e.html),
             "seconds": e.seconds if np.isfinite(e.seconds) else None} for e in entries]
    for row in rows:
        row.pop("earlier")
    return {"results_dir": None if results_dir is None else portable_path(results_dir, out),
            "extra_html": extra_html, "entries": rows}


def _error_outputs(nb: Any) -> list[str]:
    return [f"{o.get('ename', '')}: {o.get('evalue', '')}" for c in nb.get("cells", []) if c.get("cell_type") == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _entries_of_record(record: dict[str, Any], out: Path, skip: Sequence[str],
                       reads_other_results: Callable[[Mapping[str, Any]], bool]) -> tuple[list[ReportEntry], str]:
    """`earlier_report_entries` from a `REPORT_RECORD`."""
    kept = []
    for row in record["entries"]:
        notebook = out / row["notebook"] if row.get("notebook") else None
        if (row["name"] in skip or notebook is None or not notebook.is_file()
                or reads_other_results(row.get("parameters", {}))):
            continue
        page = out / row["html"] if row.get("html") else None
        kept.append(ReportEntry(**{**row, "notebook": notebook, "html": page if page and page.is_file() else None,
                                   "seconds": float("nan") if row["seconds"] is None else float(row["seconds"]),
                                   "earlier": True}))
    return kept, str(record.get("extra_html", ""))


def earlier_report_entries(out_dir: str | os.PathLike, results_dir: str | os.PathLike,
                           *, skip: Sequence[str] = ()) -> tuple[list[ReportEntry], str]:
    """The rows of an earlier report in ``out_dir`` on the same results, which a run of some of
    its notebooks keeps beside its own.

    From `REPORT_RECORD` where the earlier run wrote one (time, status, error, parameters as they
    were); in a folder without it (a report older than the record) or with one that cannot be
    read (warned of), from the executed copies of
    the series there: their status is read from their outputs (an error output makes a failed
    row) and their time is unknown. A row whose notebook read other results (its ``results_dir``
    parameter points elsewhere) is dropped, and so is one whose executed copy is gone; a notebook
    that reads no results keeps its row.

    Parameters
    ----------
    out_dir : str or PathLike
        The report folder.
    results_dir : str or PathLike
        The results this run reads.
    skip : sequence of str
        Notebooks this run executes again (their rows are its own).

    Returns
    -------
    list of ReportEntry
        The kept rows, marked ``earlier``.
    str
        The earlier run's ``extra_html`` ("" without a record).
    """
    import nbformat

    out, results = Path(out_dir).resolve(), Path(results_dir).resolve()

    def reads_other_results(parameters: Mapping[str, Any]) -> bool:
        reads = parameters.get("results_dir")
        return isinstance(reads, str) and (out / reads).resolve() != results

    record_path = out / REPORT_RECORD
    if record_path.is_file():
        try:
            return _entries_of_record(json.loads(record_path.read_text(encoding="utf-8")), out, skip,
                                      reads_other_results)
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # edited or cut short: read the copies
            warnings.warn(f"{record_path} cannot be read ({type(error).__name__}: {error}); the earlier rows are "
                          "taken from the executed copies", stacklevel=2)
    kept = []
    for name in NOTEBOOKS:
        notebook = out / f"{name}.ipynb"
        if name in skip or not notebook.is_file():
            continue
        try:
            nb = nbformat.read(notebook, as_version=4)
        except Exception as error:  # not a notebook (any more): its row is not kept, and this run's index is written
            warnings.warn(f"{notebook} cannot be read as a notebook ({type(error).__name__}); its row is left out",
                          stacklevel=2)
            continue
        injected = _tagged_assignments(nb, "injected-parameters")
        if reads_other_results(injected):
            continue
        errors = _error_outputs(nb)
        page = notebook.with_suffix(".html")
        kept.append(ReportEntry(name, notebook_title(nb) or name, DESCRIPTIONS.get(name, ""), notebook,
                                page if page.is_file() else None, float("nan"), "failed" if errors else "ok",
                                _one_line(errors[0]) if errors else "", injected, "", True))
    return kept, ""


def check_results_folder(results_dir: str | os.PathLike) -> None:
    """Refuse a folder without a combined study, on which a report's notebooks would show the published values alone.

    Parameters
    ----------
    results_dir : str or PathLike
        The folder a report is to read.

    Returns
    -------
    None
        The folder holds a combined study.

    Raises
    ------
    FileNotFoundError
        When it holds no ``ntps.csv``.
    """
    if not (Path(results_dir) / "ntps.csv").is_file():
        raise FileNotFoundError(f"no combined study results at {results_dir} (no ntps.csv): give --results a study's "
                                "folder, or combine its units first (python -m ntps_nb study combine CONFIG)")


def run_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike, *, names: Sequence[str] | None = None,
               html: bool = True, jobs: int = 1, timeout: int | None = REPORT_CELL_TIMEOUT,
               root: str | os.PathLike = REPOSITORY, log: Any = print, extra_html: str = "") -> list[ReportEntry]:
    """Execute every notebook of the series on one study's results, into ``out_dir``, with an index.

    Each notebook runs with papermill in ``out_dir`` (`report_parameters`: the results folder and
    data files named from there), so its executed copy ``<out_dir>/<name>.ipynb`` finds them
    when it is rerun in place. A notebook that fails is kept (its copy shows the error) and
    reported; the others still run. Writes ``index.html`` and ``README.md`` (`write_report_index`).
    With ``names``, the index also keeps the rows of the folder's other notebooks executed there
    before on the same results (`earlier_report_entries`), marked as from an earlier run.

    Parameters
    ----------
    results_dir : str or PathLike
        The combined study folder (ntps.csv, probes.csv, ...) the notebooks read.
    out_dir : str or PathLike
        Folder of the executed copies, their HTML and the index.
    names : sequence of str, optional
        Notebooks (names of the series or ``.ipynb`` paths; default: the whole series).
    html : bool
        Render each executed copy to HTML.
    jobs : int
        Notebooks executed at once (separate processes; their kernels get ``cores / jobs`` BLAS
        and OpenMP threads unless the environment sets them).
    timeout : int, optional
        Per-cell limit in seconds.
    root : str or PathLike
        See `portable_path`.
    log : callable
        Receives one line per finished notebook.
    extra_html : str
        Passed to `write_report_index`.

    Returns
    -------
    list of ReportEntry
        One per notebook this run executed, in the order given.

    Raises
    ------
    FileNotFoundError
        When ``results_dir`` holds no combined study (no ``ntps.csv``): the notebooks that read
        results would show the published values alone.
    """
    check_results_folder(results_dir)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(notebook_path(name)) for name in (names or NOTEBOOKS)]
    tasks = [(source, report_parameters(source, results_dir, out, root=root), str(out), html, timeout)
             for source in sources]
    entries: dict[str, ReportEntry] = {}

    def done(entry: ReportEntry) -> None:
        entries[entry.name] = entry
        where = entry.html or entry.notebook
        log(f"[{len(entries)}/{len(tasks)}] {entry.name}: {entry.status}, {entry.seconds:.0f} s"
            + (f" -> {where}" if where else "") + (f"\n      {entry.error}" if entry.error else ""))

    if jobs <= 1:
        for task in tasks:
            done(_report_one(*task))
    else:
        import concurrent.futures
        import multiprocessing

        from ntps_nb.core.threads import available_cores

        threads = max(1, available_cores() // jobs)
        # spawn, not fork: the caller may hold torch's thread pools, which a fork does not survive
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_limit_threads, initargs=(threads, jobs)) as pool:
            futures = {pool.submit(_report_one, *task): task for task in tasks}
            for future in concurrent.futures.as_completed(futures):
                try:
                    done(future.result())
                except Exception as error:  # the worker itself died: still one row per notebook
                    source = futures[future][0]
                    done(ReportEntry(Path(source).stem, Path(source).stem, DESCRIPTIONS.get(Path(source).stem, ""),
                                     None, None, 0.0, "failed", _error_text(error), futures[future][1]))
    ordered = [entries[Path(source).stem] for source in sources]
    rows = ordered
    if names:  # the folder's other notebooks keep their rows
        kept, earlier_html = earlier_report_entries(out, results_dir, skip=list(entries))
        if kept:
            log(f"kept the rows of {len(kept)} notebooks executed here before: {', '.join(e.name for e in kept)}")
        rows = sorted(kept + ordered, key=lambda e: e.name)
        extra_html = extra_html or earlier_html
    write_report_index(rows, out, results_dir=results_dir, extra_html=extra_html)
    return ordered


_INDEX_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .4rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; white-space: nowrap; }
.ok { color: #176317; font-weight: bold; } .failed { color: #b00020; font-weight: bold; }
.error { color: #b00020; font-size: .9em; } .small { color: #555; font-size: .9em; }
"""


def _display_path(path: str | os.PathLike) -> str:
    """A results folder as the index names it: from the repository root when inside it (no machine's
    absolute path in a committed index), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPOSITORY)) if path.is_relative_to(REPOSITORY) else str(path)


def _link(path: Path | None, folder: Path, text: str) -> str:
    if path is None or not Path(path).is_file():
        return "-"
    return f'<a href="{html.escape(os.path.relpath(path, folder))}">{html.escape(text)}</a>'


def write_report_index(entries: Sequence[ReportEntry], out_dir: str | os.PathLike, *,
                       results_dir: str | os.PathLike | None = None, extra_html: str = "") -> Path:
    """Write ``index.html`` (and the same table as ``README.md``) listing a report's notebooks.

    One row per notebook: title, one-line description, links to its HTML and executed ``.ipynb``
    (relative, only to files that exist), execution time and status; a failed notebook says so
    and carries its error, and a row kept from an earlier run says when that run was. The rows
    are also recorded in `REPORT_RECORD`, for a later run of some of the notebooks.

    Parameters
    ----------
    entries : sequence of ReportEntry
        The notebooks, in order.
    out_dir : str or PathLike
        The report folder (the index goes there; links are relative to it).
    results_dir : str or PathLike, optional
        The results the notebooks read, named in the heading.
    extra_html : str
        HTML placed between the heading and the table (the main job's fresh-unit check).

    Returns
    -------
    Path
        The path of ``index.html``.
    """
    from ntps_nb import __version__

    out = Path(out_dir).resolve()
    failed = [e for e in entries if not e.ok]
    earlier = [e.name for e in entries if e.earlier]
    verdict = (f"{len(entries) - len(failed)} of {len(entries)} notebooks ran"
               + (f"; {len(failed)} failed: {', '.join(e.name for e in failed)}" if failed else "")
               + (f"; {len(earlier)} of the rows are from earlier runs here: {', '.join(earlier)}" if earlier else ""))
    stamp = time.strftime(STAMP_FORMAT)

    def when(e: ReportEntry) -> str:
        return f"{e.seconds:.0f} s" if np.isfinite(e.seconds) else "-"

    def status_note(e: ReportEntry) -> str:
        return "" if not e.earlier else f" (earlier run{', ' + e.finished if e.finished else ''})"
    with_html = any(e.html is not None and Path(e.html).is_file() for e in entries)  # else no HTML column
    rows = []
    for e in entries:
        status = f'<span class="{e.status}">{e.status}</span>{html.escape(status_note(e))}'
        if e.error:
            status += f'<div class="error">{html.escape(e.error)}</div>'
        page_link = f"<td>{_link(e.html, out, 'HTML')}</td>" if with_html else ""
        rows.append(f"<tr><td><b>{html.escape(e.title)}</b><div class=\"small\">{html.escape(e.name)}</div></td>"
                    f"<td>{html.escape(e.description)}</td>{page_link}<td>{_link(e.notebook, out, '.ipynb')}</td>"
                    f"<td class=\"num\">{when(e)}</td><td>{status}</td></tr>")
    shown = _display_path(results_dir) if results_dir is not None else None
    source = f" on <code>{html.escape(shown)}</code>" if shown is not None else ""
    again = ("python -m ntps_nb notebooks report" + (f" --results {shown}" if shown is not None else "")
             + f" --out {_display_path(out)}" + ("" if with_html else " --no-html"))
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ntps_nb report</title>"
            f"<style>{_INDEX_STYLE}</style></head><body>\n<h1>ntps_nb report</h1>\n"
            f"<p>The notebook series executed{source} (ntps_nb {html.escape(__version__)}, {stamp}). "
            f"{html.escape(verdict)}.</p>\n{extra_html}\n"
            "<table><thead><tr><th>notebook</th><th>what it shows</th>" + ("<th>HTML</th>" if with_html else "")
            + "<th>notebook</th>"
            "<th>time</th><th>status</th></tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
            "<p class=\"small\">Each executed copy keeps the parameters it ran with (the cell tagged "
            "<code>injected-parameters</code>); its paths are written from this folder, so it can be rerun "
            f"where it lies. Made by <code>{html.escape(again)}</code>.</p>\n</body></html>\n")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")

    def md_link(path: Path | None, text: str) -> str:
        return f"[{text}]({os.path.relpath(path, out)})" if path is not None and Path(path).is_file() else "-"

    lines = ["# ntps_nb report", "",
             "The notebook series executed" + (f" on `{shown}`" if shown is not None else "")
             + f" (ntps_nb {__version__}, {stamp}). {verdict}.", "",
             "| notebook | what it shows | " + ("HTML | " if with_html else "") + "notebook | time | status |",
             "|---|---|" + ("---|" if with_html else "") + "---|---|---|"]
    for e in entries:
        status = e.status + status_note(e) + (f": {e.error}".replace("|", "\\|") if e.error else "")
        lines.append(f"| **{e.title}** | {e.description} | " + (f"{md_link(e.html, 'HTML')} | " if with_html else "")
                     + f"{md_link(e.notebook, e.name + '.ipynb')} | {when(e)} | {status} |")
    lines += ["", "Each executed copy keeps the parameters it ran with (its `injected-parameters` cell); its paths are "
              "written from this folder, so it can be rerun where it lies. Made by", "", f"    {again}"]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    record = _record_of(entries, out, results_dir, extra_html)
    (out / REPORT_RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


def _cli_report(args) -> int:
    entries = run_report(args.results, args.out, names=args.names or None, html=not args.no_html,
                         jobs=args.jobs if args.jobs is not None else default_jobs())
    failed = [e.name for e in entries if not e.ok]
    print(f"report: {Path(args.out).resolve() / 'index.html'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return int(bool(failed))


def register_cli(subparsers) -> None:
    """``notebooks run [--all | NAME] [-p key value ...] [--out DIR] [--smoke] [--in-place]``,
    ``notebooks check [NOTEBOOK ...]``, ``notebooks clean [NAME ...]`` and
    ``notebooks report [NAME ...] [--results DIR] [--out DIR] [--jobs N] [--no-html]``.

    Parameters
    ----------
    subparsers : argparse subparsers action
        The ``python -m ntps_nb`` parser's sub-command group.

    Returns
    -------
    None
    """
    parser = subparsers.add_parser("notebooks", help="run, check and clean the notebook series")
    sub = parser.add_subparsers(dest="notebooks_command", required=True)
    run = sub.add_parser("run", help="execute notebooks with papermill (executed copy + HTML in --out)")
    run.add_argument("name", nargs="?", help="notebook name or number, e.g. 00 or 00_quickstart")
    run.add_argument("--all", action="store_true", help="every notebook of the series, in order")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="override a parameter (JSON value, else string); repeatable")
    run.add_argument("--out", default="out/notebooks", help="output folder [out/notebooks]")
    run.add_argument("--smoke", action="store_true", help="tiny models and subsets (SMOKE_PARAMETERS)")
    run.add_argument("--in-place", action="store_true",
                     help="write the executed, cleaned notebook back into notebooks/ (refresh committed outputs)")
    run.set_defaults(func=_cli_run)
    check = sub.add_parser("check", help="fail on unclean metadata, a missing parameters cell, or a number quoted in "
                                          "markdown that no output prints")
    check.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                       help="executed notebooks (.ipynb) to check for unprinted numbers only; default: the committed "
                            "series, metadata and numbers")
    check.set_defaults(func=_cli_check)
    clean = sub.add_parser("clean", help="strip kernel/papermill/widget metadata in place")
    clean.add_argument("names", nargs="*")
    clean.set_defaults(func=_cli_clean)
    report = sub.add_parser("report", help="execute every notebook on one study's results into --out: executed "
                                           "copies, HTML and an index.html (what `make run` renders)")
    report.add_argument("names", nargs="*", help="notebooks (default: the whole series; the index keeps the rows "
                        "of the others executed in --out before)")
    report.add_argument("--results", default=str(REPOSITORY / "data" / "results" / "default-richardson"),
                        help="combined study folder [data/results/default-richardson]")
    report.add_argument("--out", default="out/report", help="output folder [out/report]")
    report.add_argument("--jobs", type=int, default=None, help="notebooks at once [2 on two or more cores]")
    report.add_argument("--no-html", action="store_true", help="executed copies and index only")
    report.set_defaults(func=_cli_report)


# -- recipes the notebooks call ------------------------------------------------------------------


@dataclasses.dataclass
class ModelOnDataset:
    """One model's extraction of one dataset: train moments + pooled features, test pooled features."""

    model: str
    dataset: str
    train: Any  # ntps_nb.extract.Extraction
    test: Any
    settings: dict[str, Any]

    @property
    def n_classes(self) -> int:
        return self.train.n_classes

    @property
    def layers(self) -> list[int]:
        return sorted(self.train.moments.keys())


def extract_model_on_dataset(model: str, dataset: Any, *, max_train: int = 300, max_test: int = 200,
                             max_length: int = 64, seed: int = 0, batch_size: int = 16,
                             drop_bos: bool = True, precision: str = "float32", loaded: tuple | None = None,
                             shards: int | None = None, interval_layers: Any = "grid:4",
                             halves: bool = False, device: str = "cpu", analysis_device: Any = None,
                             progress: bool = True) -> ModelOnDataset:
    """Load ``model`` and ``dataset`` (offline registries), extract every layer's moments and
    pooled features of the train split and the pooled features of the test split (cached).

    ``dataset`` is a registry name or a train/test DatasetDict of your own
    (`ntps_nb.datasets.read_dataset_file`, `ntps_nb.datasets.from_pandas`), named after its file.

    ``shards`` (e.g. 10): also keep per-shard moments of the train split at ``interval_layers``
    ("all", "grid:n" for n evenly spaced layers, or indices; see `ntps_nb.study.resolve_layers`),
    for NTPS intervals (`layer_profile(..., intervals=True)`). Each shard and layer adds three
    float64 d x d matrices to the cached entry (~8 MB at d = 576). ``halves`` (with ``shards``):
    also keep, on every other layer, the moments of the two halves of a ``seed``-ed split of the
    shards (`ntps_nb.core.estimators.split_halves`), all the default estimator, "richardson",
    reads: `layer_profile(..., estimator="richardson")` then has it on every layer.

    ``precision`` is the extraction's (moment products and pooled features). "float32" (default
    here, unlike `extract`'s "auto": the committed notebook outputs were computed with it) sums
    float32 products into float64 totals: the identity of notebook 02 then matches fitted probes
    to ~1e-5 (relative) and NTPS is within ~5e-5 of float64 products (SmolLM2 on 300 rt-polarity
    texts, benchmarks/results), far inside the bootstrap intervals the notebooks draw; a pass whose
    smallest part read has at most 4 d token pairs forms them in float64 anyway
    (`ntps_nb.extract.token_precision`). "float64"
    gives ~1e-9 at ~1.1x the time on one CPU core.

    Parameters
    ----------
    model : str
        A model name of `ntps_nb.models.load_model` (loaded unless ``loaded`` is given).
    dataset : str or DatasetDict
        A registry name or a train/test DatasetDict, as above.
    max_train, max_test : int
        Most texts of each split (stratified subsample).
    max_length : int
        Truncation length in tokens.
    seed : int
        Seed of the subsample, of a random-initialised model and of the shard assignment.
    batch_size, drop_bos : extraction settings (see `ntps_nb.extract.extract`).
    precision : "float32", "float64" or "auto", as above; pooled features are kept at the precision of the
        token products (``pooled_dtype="auto"`` of `ntps_nb.extract.extract`: the vectors Sxx is formed from).
    loaded : tuple, optional
        ``(model, tokenizer, info)`` already loaded.
    shards : int, optional
        Number of shards S of the train split, as above.
    interval_layers : layer spec
        Layers that keep shard moments.
    halves : bool
        Keep the two halves' moments on the other layers, as above (needs ``shards`` >= 2).
    device : str
        Where ``model`` is loaded and runs ("cpu", "cuda", "cuda:1", ...); a model given as ``loaded`` stays where
        it is. The cache key depends on it only through ``precision="auto"``, which is resolved per device.
    analysis_device : optional
        Where `layer_profile` will solve the train split's moments (its ``device``), or a study's setting
        "auto" / "numpy" resolved against the model's device (`ntps_nb.study.stages.resolve_analysis_device`:
        "auto" is the model's GPU, if it is on one). When that is the model's GPU and the moments fit in 40% of
        it (`ntps_nb.extract.keeps_moments_on_device`, a study's rule), they stay there after the extraction,
        or are copied there once when it comes from the cache, so that no solve copies them from the host
        again. Changes no number and no cache key.
    progress : bool
        The extraction's bar over the texts of each split that is not in the cache (False: none).

    Returns
    -------
    ModelOnDataset
        ``train``: the train split's `Extraction` (moments and (N_train, d) pooled features of
        every hidden state, shard moments with ``shards``); ``test``: the test split's pooled
        features (N_test, d) per hidden state; ``settings``: the extraction settings with the
        actual split sizes and the seed.
    """
    from ntps_nb.datasets import load_dataset, subsample
    from ntps_nb.extract import extract_cached, keeps_moments_on_device
    from ntps_nb.models import load_model
    from ntps_nb.study.stages import resolve_analysis_device

    net, tokenizer, info = loaded if loaded is not None else load_model(model, seed=seed, device=device)
    if isinstance(dataset, str):
        ds = load_dataset(dataset, max_train=max_train, max_test=max_test, seed=seed)
    else:
        ds = subsample(dataset, max_train=max_train, max_test=max_test, seed=seed)
        dataset = dataset_name(ds)
    settings = dict(max_length=max_length, drop_bos=drop_bos, batch_size=batch_size, pooled_layers="all",
                    precision=precision, pooled_dtype="auto")
    sharding = {}
    if halves and not shards:
        raise ValueError("halves=True needs shards >= 2: the halves are unions of the shards")
    if shards:
        from ntps_nb.study import resolve_layers

        every = list(range(info.n_hidden_states))
        sharding = dict(shards=int(shards), shard_seed=seed,
                        shard_layers=resolve_layers(interval_layers, every, "interval_layers"))
        if halves:
            sharding.update(half_layers=[layer for layer in every if layer not in sharding["shard_layers"]],
                            half_seed=seed)
    model_on = next(net.parameters()).device
    analysis_on = (resolve_analysis_device(analysis_device, model_on) if analysis_device in ("auto", "numpy")
                   else analysis_device)
    keep = keeps_moments_on_device(analysis_on, model_on, info.hidden_size, info.n_hidden_states, sharding)
    train = extract_cached(net, tokenizer, info, ds["train"], progress=progress, keep_on_device=keep, **settings,
                           **sharding)
    test = extract_cached(net, tokenizer, info, ds["test"], progress=progress, token_moments=False, **settings)
    return ModelOnDataset(model, dataset, train, test,
                          {**settings, **sharding, "max_train": len(train.labels), "max_test": len(test.labels),
                           "seed": seed})


def layer_profile(run: ModelOnDataset, *, k: int, variant: str = "theory", intervals: bool = False,
                  n_boot: int = 50, level: float = 0.95, seed: int = 0, estimator: str = "plugin",
                  progress: bool = True, device: Any = None) -> pd.DataFrame:
    """Per layer: NTPS (``variant``, at ``k``) and the held-out probe accuracy, kappa and MSE.

    One row per layer with the provenance columns (model, dataset, sizes, max_length, drop_bos).
    ``estimator`` "plugin" (default): the NTPS of the pooled moments, and with ``intervals`` the
    shard-bootstrap interval (`ntps_nb.core.intervals.ntps_interval`, ``n_boot`` replicates, method
    "basic", which need not contain the estimate) and the jackknife standard error, as
    ``ntps_lower``, ``ntps_upper``, ``ntps_se`` at the layers the extraction kept shards for (NaN
    elsewhere). Another estimator (theory variant; "richardson", the package's default): its
    estimate on every layer, from the shards where the extraction kept them and from the two
    halves elsewhere (`extract_model_on_dataset(..., halves=True)`), and with ``intervals`` its
    interval at ``level`` and reliability flag as `ntps_nb.core.estimators.ntps_estimate` gives them by
    default (for "richardson" the delete-one-shard jackknife interval less the jackknife's excess on the
    quadratic part of the error, "quadratic"; the plain jackknife's for the others; ``reliable`` False: do not
    read the number as the population NTPS) at the shard layers.

    Parameters
    ----------
    run : ModelOnDataset
        From `extract_model_on_dataset`.
    k : int
        Number of next-token directions.
    variant : str
        NTPS variant (see `ntps_nb.core.score.ntps`).
    intervals : bool
        Add the interval columns (needs an extraction with ``shards``).
    n_boot, level, seed : replicates (bootstrap only), confidence level and seed of the intervals.
    estimator : str
        "plugin" or a name of `ntps_nb.core.estimators.ESTIMATORS` (theory variant only). One of the
        pooled moments alone (not in `SHARD_ESTIMATORS`) is computed from them where there are no
        shards; a shard estimator needs the shards of every layer or, for "richardson", the halves. There a
        ``k`` beyond a layer's retained rank of C0 gives NaN with a `ntps_nb.core.score.BeyondRankWarning`
        naming the layer; the plug-in raises `ntps_nb.core.score.BeyondRankError`.
    progress : bool
        Two bars, each shown once its part has run `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds: the
        probes' fits (`ntps_nb.core.probes.probe_layers`), then NTPS layer by layer (with ``intervals`` a
        layer with shards takes as long as its interval). False: none.
    device : None (default): the probes and NTPS on the host (scikit-learn, numpy); a torch device ("cuda",
        "cpu", ...): the probes fitted there (`ntps_nb.core.probes.probe_layers`, batched over layers) and NTPS,
        its intervals and estimates solved there (`ntps`, `ntps_interval`, `ntps_estimate` with ``device``), for
        the plug-in and "richardson" (another estimator raises a ValueError before anything is fitted).

    Returns
    -------
    DataFrame
        One row per layer: ``layer``, ``k``, ``variant``, ``estimator``, ``ntps``, (with
        ``intervals``: ``ntps_lower``, ``ntps_upper``, ``ntps_se``, ``n_shards``, ``level``,
        ``interval`` (how it was made), and ``n_boot`` for the plug-in's bootstrap or ``reliable``
        for another estimator's jackknife), ``accuracy``, ``kappa``, ``mse`` and the provenance columns.

    Raises
    ------
    ValueError
        When ``intervals`` is asked of an extraction without shard moments, ``estimator``
        of a layer without the shards or halves it needs, or on a device that does not solve it.
    """
    from ntps_nb.core.backends import estimator_backend
    from ntps_nb.core.estimators import DEVICE_ESTIMATORS
    from ntps_nb.core.intervals import layer_shards, ntps_interval
    from ntps_nb.core.probes import probe_layers
    from ntps_nb.core.progress import progress_bar
    from ntps_nb.core.score import ntps

    provenance = {"model": run.model, "dataset": run.dataset, "n_train": run.settings["max_train"],
                  "n_test": run.settings["max_test"], "max_length": run.settings["max_length"],
                  "drop_bos": run.settings["drop_bos"]}
    features = {layer: (run.train.pooled[layer], run.test.pooled[layer]) for layer in run.layers}
    if intervals and not run.train.shards:
        raise ValueError("intervals need shard moments: extract with extract_model_on_dataset(..., shards=10)")
    estimator_backend(device, estimator, DEVICE_ESTIMATORS, "the plug-in's and richardson's layer profiles")
    probes = probe_layers(features, run.train.labels, run.test.labels, n_classes=run.n_classes, progress=progress,
                          device=device, **provenance)
    keep = ["layer", "accuracy", "kappa", "mse", *provenance]
    gathered = _GatheredInterpolation()
    with progress_bar(len(run.layers), "layer_profile", progress, unit="layer") as bar:
        if estimator != "plugin":
            scores = _estimator_profile(run, k=k, variant=variant, intervals=intervals, level=level, seed=seed,
                                        estimator=estimator, gathered=gathered, step=bar.update, device=device)
            gathered.warn(len(run.layers))
            return scores.merge(probes[keep], on="layer")
        shards = layer_shards(run.train.shards) if intervals else {}
        values, rows = [], []
        for layer in run.layers:
            with gathered.at(layer), warnings_named(f"layer {layer}"):
                values.append(ntps(run.train.moments[layer], k=k, variant=variant, device=device))
            if layer in shards:
                with gathered.at(layer):
                    iv = ntps_interval(shards[layer], k=k, variant=variant, n_boot=n_boot, level=level, seed=seed,
                                       progress=False, device=device)
                rows.append({"layer": layer, "ntps_lower": iv.lower, "ntps_upper": iv.upper,
                             "ntps_se": iv.se_jackknife})
            bar.update(1)
    scores = pd.DataFrame({"layer": run.layers, "k": k, "variant": variant, "estimator": "plugin", "ntps": values})
    if intervals:
        scores = scores.merge(pd.DataFrame(rows), on="layer", how="left").assign(
            n_shards=len(run.train.shards), n_boot=n_boot, level=level, interval="basic shard bootstrap")
    gathered.warn(len(run.layers))
    return scores.merge(probes[keep], on="layer")


def profile_headline(profile: pd.DataFrame) -> str:
    """What a layer profile says in two lines: the layer of highest NTPS, the layer of the best held-out probe,
    and Spearman's rho over layers between the two (notebooks 00 and 06 print it).

    Layers whose NTPS is NaN (an estimator undefined there: "crossfit" below the rank of Sxx, say) are left out
    of both and counted; with fewer than `ntps_nb.core.stats.MIN_DATASETS` layers left there is no ranking.

    Parameters
    ----------
    profile : DataFrame
        From `layer_profile` (columns layer, ntps, accuracy).

    Returns
    -------
    str
        The lines to print.
    """
    from ntps_nb.core.stats import MIN_DATASETS, correlate

    defined = profile.dropna(subset=["ntps"])
    best_probe = profile.loc[profile["accuracy"].idxmax()]
    probe = f"best held-out probe: layer {best_probe['layer']:.0f} (accuracy {best_probe['accuracy']:.2f})"
    if len(defined) < MIN_DATASETS:
        return (f"NTPS is defined at {len(defined)} of {len(profile)} layers (NaN where the estimator is undefined): "
                f"too few to rank them; {probe}")
    best = defined.loc[defined["ntps"].idxmax()]
    rho = correlate(defined["ntps"], defined["accuracy"], "spearman")
    lines = [f"highest NTPS: layer {best['layer']:.0f} ({best['ntps']:.2f}); {probe}",
             f"Spearman rho over layers, NTPS vs held-out accuracy: {rho:+.2f}"]
    if len(defined) < len(profile):
        lines.append(f"({len(profile) - len(defined)} of {len(profile)} layers left out: NTPS undefined there)")
    return "\n".join(lines)


class _GatheredInterpolation(GatheredInterpolationWarnings):
    """The `ntps_nb.core.score.InterpolationWarning`s of a loop over layers (``at(layer)``), said once when it
    ends: at how many layers, which, and the first one's message."""

    def warn(self, n_layers: int) -> None:
        """One `InterpolationWarning` for the layers recorded (none when there are none), at the caller's
        caller (the notebook cell that called `layer_profile`)."""
        from ntps_nb.core.score import InterpolationWarning

        if not self.messages:
            return
        layers = sorted(self.messages)
        warnings.warn(f"NTPS at {len(layers)} of {n_layers} layers ({integer_ranges(layers)}) comes from no more texts "
                      f"than the rank of Sxx. Layer {layers[0]}: {self.messages[layers[0]][0]}", InterpolationWarning,
                      stacklevel=3)


def _estimator_profile(run: ModelOnDataset, *, k: int, variant: str, intervals: bool, level: float, seed: int,
                       estimator: str, gathered: _GatheredInterpolation, step: Callable[[], Any],
                       device: Any = None) -> pd.DataFrame:
    """`layer_profile`'s NTPS columns for an estimator other than the plug-in: the estimate on every
    layer (shards where kept, else the two halves, or the pooled moments for an estimator of those
    alone), with ``intervals`` `ntps_estimate`'s default interval and reliability flag on the shard layers;
    interpolation warnings go to ``gathered`` from every layer, the tie and rounding warnings name their layer.
    ``step()`` is called once each layer is done; ``device`` solves each layer's NTPS, as `layer_profile`'s."""
    from ntps_nb.core.estimators import ESTIMATORS, HALF_ESTIMATORS, SHARD_ESTIMATORS, ntps_estimate
    from ntps_nb.core.intervals import layer_shards
    from ntps_nb.core.rotation import interval_description, widened_rows
    from ntps_nb.core.score import BeyondRankError, BeyondRankWarning, ntps

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if variant != "theory":
        raise ValueError(f"an estimator other than the plug-in estimates the theory NTPS, got variant={variant!r}")
    shards = layer_shards(run.train.shards) if run.train.shards else {}
    halves = layer_shards(run.train.halves) if estimator in HALF_ESTIMATORS and run.train.halves else {}
    split_seed = run.settings.get("half_seed", run.settings.get("seed", seed))  # the halves' split, on every layer
    rows = []
    for layer in run.layers:
        if layer in shards and intervals:
            with gathered.at(layer), warnings_named(f"layer {layer}"):
                table = ntps_estimate(shards[layer], [k], estimator=estimator, level=level, seed=split_seed,
                                      progress=False, device=device)
            frame = table.iloc[0]
            kind = interval_description(frame.get("interval", "jackknife"), bool(widened_rows(table).iloc[0]),
                                        frame.get("widening_level"), frame.get("stationary_widened", False))
            rows.append({"layer": layer, "ntps": frame["estimate"], "ntps_lower": frame["lower"],
                         "ntps_upper": frame["upper"], "ntps_se": frame["se"], "reliable": bool(frame["reliable"]),
                         "interval": f"{kind}, around the estimate"})
        else:  # the halves as two shards give the shards' value (split_halves(2) keeps them apart)
            parts = shards.get(layer) or halves.get(layer)
            if parts is None and estimator not in SHARD_ESTIMATORS:
                parts = run.train.moments[layer]  # an estimator of the pooled moments alone
            if parts is None:
                raise ValueError(_missing_parts_message(estimator, layer))
            with gathered.at(layer), warnings_named(f"layer {layer}"):  # `ntps` warns as the shard rows do
                try:
                    value = ntps(parts, k, estimator=estimator, seed=split_seed, device=device)
                except BeyondRankError as error:  # undefined at this layer: NaN, said as `ntps_estimate` says it
                    warnings.warn(f"{error}: NTPS is undefined there, NaN", BeyondRankWarning, stacklevel=2)
                    value = np.nan
            rows.append({"layer": layer, "ntps": value})
        step()
    scores = pd.DataFrame(rows).assign(k=k, variant=variant, estimator=estimator)
    if intervals:
        scores = scores.assign(n_shards=len(run.train.shards), level=level)
    first = ["layer", "k", "variant", "estimator", "ntps"]
    return scores[first + [c for c in scores.columns if c not in first]]


def _missing_parts_message(estimator: str, layer: int) -> str:
    """Why ``estimator`` cannot be computed at ``layer`` of an extraction, and which extraction it needs."""
    from ntps_nb.core.estimators import HALF_ESTIMATORS

    if estimator in HALF_ESTIMATORS:
        return (f"estimator {estimator!r} needs the shards or the two halves of every layer; layer {layer} has "
                "neither: extract with extract_model_on_dataset(..., shards=20, halves=True)")
    return (f"estimator {estimator!r} needs the shard moments of every layer and layer {layer} has none: extract "
            "with extract_model_on_dataset(..., shards=10, interval_layers=\"all\") (intervals=True then gives every "
            "layer an interval: for \"jackknife\" about (shards + 1)^2 plug-ins a layer), or use \"richardson\", the "
            "default, which reads the two halves (halves=True) where there are no shards")


def identity_vs_fitted(run: ModelOnDataset, *, layer: int, ks: Sequence[int]) -> pd.DataFrame:
    """The excess-loss identity (moments only) against the in-sample excess MSE of fitted
    least-squares probes on the same train features, with the bounds, at each k; plus the
    held-out excess loss of the same two probes on the test split, for contrast.

    Parameters
    ----------
    run : ModelOnDataset
        From `extract_model_on_dataset`.
    layer : int
        Hidden-state index.
    ks : sequence of int
        Numbers of next-token directions k.

    Returns
    -------
    DataFrame
        One row per k: ``layer``, ``k``, ``ntps``, ``identity`` (excess loss from the moments),
        ``fitted_in_sample``, ``lower_bound``, ``upper_bound``, ``heldout_excess``, ``model``,
        ``dataset`` and ``abs_diff`` = |identity - fitted_in_sample|.
    """
    from ntps_nb.core.score import theory_geometry
    from ntps_nb.core.theory import fitted_excess_loss

    moments = run.train.moments[layer]
    geometry = theory_geometry(moments)
    rows = []
    for k in ks:
        fitted = fitted_excess_loss(run.train.pooled[layer], run.train.labels, moments, k,
                                    test_features=run.test.pooled[layer], test_labels=run.test.labels)
        lower, upper = geometry.bounds(k)
        rows.append({"layer": layer, "k": k, "ntps": geometry.ntps(k), "identity": geometry.excess_loss(k),
                     "fitted_in_sample": fitted["excess_loss"], "lower_bound": lower, "upper_bound": upper,
                     "heldout_excess": fitted["heldout_excess_loss"],
                     "model": run.model, "dataset": run.dataset})
    frame = pd.DataFrame(rows)
    frame["abs_diff"] = (frame["identity"] - frame["fitted_in_sample"]).abs()
    return frame


def word_projections(model: str, groups: Mapping[str, Sequence[str]], moments: Any, *, layer: int,
                     loaded: tuple | None = None, max_length: int = 8, device: str = "cpu") -> pd.DataFrame:
    """Mean-pooled hidden states of single words, projected on the top-2 perception (U) and
    next-token (V) directions of one layer's ``moments``, as in the paper's Figure 1.

    Returns one row per (space, group, word): ``axis1``, ``axis2`` (coordinates x^T u_1, x^T u_2
    with the B-normalised generalized eigenvectors, descending order), plus ``word`` and ``layer``.

    Parameters
    ----------
    model : str
        Model name (loaded unless ``loaded`` is given).
    groups : mapping of str to sequence of str
        Group name to its words; at least two groups (each word is labelled by its group).
    moments : Moments
        The moments of ``layer`` whose U and V directions are used.
    layer : int
        Hidden-state index.
    loaded : tuple, optional
        ``(model, tokenizer, info)`` already loaded.
    max_length : int
        Truncation length of each word in tokens.
    device : str
        Where the model is loaded and runs when it is loaded here ("cuda" on a GPU); ``loaded`` stays where it is.

    Returns
    -------
    DataFrame
        Columns ``space`` ("U" or "V"), ``group``, ``word``, ``axis1``, ``axis2``, ``layer``;
        2 x (number of words) rows.

    Raises
    ------
    ValueError
        With fewer than two groups, or when a problem has rank < 2.
    """
    from ntps_nb.core.subspaces import next_token_subspace, perception_subspace
    from ntps_nb.extract import extract
    from ntps_nb.models import load_model

    words = [w for ws in groups.values() for w in ws]
    group_of = [g for g, ws in groups.items() for _ in ws]
    if len(set(group_of)) < 2:
        raise ValueError(f"need words of at least two groups, got {list(groups)}")
    net, tokenizer, _ = loaded if loaded is not None else load_model(model, device=device)
    labels = np.asarray([list(groups).index(g) for g in group_of])
    pooled = extract(net, tokenizer, (words, labels), layers=[layer], pooled_layers=[layer], token_moments=False,
                     max_length=max_length, progress=False, n_classes=len(groups)).pooled[layer]
    rows = []
    for space, sub in (("U", perception_subspace(moments, order="descending")),
                       ("V", next_token_subspace(moments, order="descending"))):
        if sub.rank_A < 2:  # past rank(A) the eigenvectors are arbitrary (zero eigenvalue)
            raise ValueError(f"the {space} problem has rank {sub.rank_A} < 2: its second direction would be arbitrary; "
                             "use a dataset with at least 3 classes")
        coords = np.asarray(pooled, dtype=np.float64) @ sub.top(2)
        rows += [{"space": space, "group": g, "word": w, "axis1": c[0], "axis2": c[1], "layer": layer}
                 for g, w, c in zip(group_of, words, coords)]
    return pd.DataFrame(rows)


def loo_gain_prediction(frame: pd.DataFrame, *, score: str = "ntps", gain: str = "lora_gain",
                        group: str = "model", dataset: str = "dataset") -> pd.DataFrame:
    """Leave-one-dataset-out prediction of the (absolute) gain from a score, per ``group``.

    For each held-out dataset, a least-squares line gain ~ a + b * score is fitted on the group's
    other datasets and evaluated on the held-out one; the baseline predicts the mean gain of the
    other datasets. Returns one row per group: ``n_datasets``, ``mae`` (line), ``mae_mean``
    (baseline), ``skill`` = 1 - mae / mae_mean (> 0: the score helps), ``rho_heldout`` (Spearman
    of held-out predictions with gains: rank prediction) and ``slope`` of the fit on all datasets.

    Parameters
    ----------
    frame : DataFrame
        One row per (group, dataset), with the columns named below.
    score, gain, group, dataset : str
        Column names of the score, the gain, the grouping (e.g. model) and the dataset.

    Returns
    -------
    DataFrame
        One row per group (sorted): the group column, ``n_datasets``, ``mae``, ``mae_mean``,
        ``skill``, ``rho_heldout``, ``slope``.

    Raises
    ------
    ValueError
        When a column is missing or a group has fewer than 4 datasets.
    """
    from ntps_nb.core.gain import gain_prediction
    from ntps_nb.core.stats import correlate

    missing = [c for c in (score, gain, group, dataset) if c not in frame.columns]
    if missing:
        raise ValueError(f"loo_gain_prediction needs column(s) {missing}; the frame has {list(frame.columns)}")
    rows = []
    for name, part in frame.groupby(group, sort=True):
        if len(part) < 4:
            raise ValueError(f"{group} {name!r} has {len(part)} datasets; need at least 4 for leave-one-out")
        # the folds and the fit are core.gain's; this only summarises them per group
        result = gain_prediction(part, score=score, gain=gain, dataset=dataset)
        folds, linear = result["folds"], result["summary"].iloc[0]
        y, pred, base = (folds[c].to_numpy(float) for c in ("gain", "predicted", "trivial"))
        mae, mae_mean = float(np.mean(np.abs(pred - y))), float(np.mean(np.abs(base - y)))
        rows.append({group: name, "n_datasets": len(y), "mae": mae, "mae_mean": mae_mean,
                     "skill": 1.0 - mae / mae_mean if mae_mean > 0 else np.nan,
                     "rho_heldout": correlate(pred, y, "spearman"), "slope": float(linear["b"])})
    return pd.DataFrame(rows)


#: |z| above which a diagnosed NTPS counts as off its label-permutation null (notebook 03).
NULL_Z = 2.0


def diagnostics_digest(diag: pd.DataFrame, *, z: float = NULL_Z) -> pd.DataFrame:
    """The label-null and perturbation diagnostics of a study, one row per (model, variant): what
    notebook 03 reads, computed rather than quoted.

    Parameters
    ----------
    diag : DataFrame
        `ntps_nb.study.diagnostics_summary` rows: model, dataset, variant, config ("k=8",
        "f=0.5"), perturb_max_dev, perm_z, n_permutations.
    z : float
        Threshold on the label-null z-score.

    Returns
    -------
    DataFrame
        One row per (model, variant): ``n_pairs`` (dataset, configuration) pairs diagnosed,
        ``above_null`` (z > ``z``: real labels give a higher NTPS than shuffled ones),
        ``share_above``, ``below_null`` (z < -``z``: lower than shuffled), ``z_min``, ``z_max``,
        ``above_null_k2`` and ``n_pairs_k2`` (the same over k >= 2, theory rows; NaN for the
        reference variant), ``max_perturbation`` (largest change of NTPS under the relative
        perturbations of the moments) and ``max_perturbation_at`` ("dataset, config"),
        ``n_permutations`` and ``smallest_p`` = 1 / (n_permutations + 1), the smallest p-value
        that many shuffles can give.

    Raises
    ------
    ValueError
        When a column is missing or the frame is empty.
    """
    needed = ["model", "dataset", "variant", "config", "perturb_max_dev", "perm_z", "n_permutations"]
    missing = [c for c in needed if c not in diag.columns]
    if missing or diag.empty:
        raise ValueError(f"diagnostics_digest needs rows with columns {needed}; missing {missing}" if missing
                         else "diagnostics_digest: no diagnostics rows")
    rows = []
    for (model, variant), group in diag.groupby(["model", "variant"], sort=True):
        zs = group["perm_z"].to_numpy(float)
        k = pd.to_numeric(group["config"].str.extract(r"^k=(\d+)$")[0], errors="coerce")
        k2 = group[k >= 2]
        worst = group.loc[group["perturb_max_dev"].idxmax()]
        n_perm = int(group["n_permutations"].max())
        rows.append({"model": model, "variant": variant, "n_pairs": len(group), "above_null": int(np.sum(zs > z)),
                     "share_above": float(np.mean(zs > z)), "below_null": int(np.sum(zs < -z)),
                     "z_min": float(np.nanmin(zs)), "z_max": float(np.nanmax(zs)),
                     "above_null_k2": int(np.sum(k2["perm_z"] > z)) if len(k2) else np.nan,
                     "n_pairs_k2": len(k2) if len(k2) else np.nan,
                     "max_perturbation": float(worst["perturb_max_dev"]),
                     "max_perturbation_at": f"{worst['dataset']}, {worst['config']}",
                     "n_permutations": n_perm, "smallest_p": 1.0 / (n_perm + 1)})
    return pd.DataFrame(rows)


def dataset_name(ds: Any) -> str:
    """A DatasetDict's name from its provenance: the file it was read from (its stem), else the
    provenance's name.

    Parameters
    ----------
    ds : DatasetDict
        With a ``train`` split whose ``info.description`` holds the provenance JSON.

    Returns
    -------
    str
        The file's stem, else the provenance's ``name``, else "data".
    """
    provenance = json.loads(ds["train"].info.description or "{}")
    file = (provenance.get("source") or {}).get("file")
    return Path(file).stem if file else str(provenance.get("name", "data"))


def estimate_cost(loaded: tuple, ds: Any, *, max_train: int | None, max_test: int | None, max_length: int,
                  batch_size: int = 16, n_timed: int = 8, seed: int = 0) -> pd.Series:
    """What extracting ``ds`` will cost, before it runs: texts, tokens after truncation, forward
    passes (batches), a rough time from one timed extraction of ``n_timed`` train texts, and the
    memory the extraction holds (every hidden state's moments and pooled features).

    The sizes are those `extract_model_on_dataset` uses (``max_train`` / ``max_test`` texts,
    stratified). The time scales the timed texts' seconds per token to all tokens: rough (the
    first batch pays warm-up, longer texts cost more than linearly), but the right order. Floats
    are rounded to three significant digits (an estimate, not a measurement to quote).

    Parameters
    ----------
    loaded : tuple
        ``(model, tokenizer, info)``.
    ds : DatasetDict
        Train/test splits.
    max_train, max_test : int or None
        Most texts of each split (None: all).
    max_length : int
        Truncation length in tokens.
    batch_size : int
        Texts per forward pass.
    n_timed : int
        Train texts of the timed extraction.
    seed : int
        Seed of the subsample.

    Returns
    -------
    Series
        Indexed by "train texts", "test texts", "tokens", "truncated texts", "forward passes
        (batches)", "timed texts", "seconds per 1000 tokens", "estimated seconds" and "memory
        of the moments and features (MB)".
    """
    from ntps_nb.datasets import subsample
    from ntps_nb.extract import extract

    model, tokenizer, info = loaded
    ds = subsample(ds, max_train=max_train, max_test=max_test, seed=seed)
    texts = {split: list(ds[split]["text"]) for split in ("train", "test")}
    full = {split: [len(ids) for ids in tokenizer(part)["input_ids"]] for split, part in texts.items()}
    tokens = {split: [min(n, max_length) for n in lengths] for split, lengths in full.items()}
    timed = ds["train"].select(range(min(n_timed, len(ds["train"]))))
    start = time.perf_counter()
    extract(model, tokenizer, timed, max_length=max_length, batch_size=batch_size, progress=False,
            n_classes=ds["train"].features["label"].num_classes)
    seconds = time.perf_counter() - start
    per_token = seconds / max(sum(tokens["train"][:len(timed)]), 1)
    n_tokens = sum(map(sum, tokens.values()))
    # per hidden state: up to four float64 d x d moments (Sxx, C0, C1, Shh) and the float32 pooled features
    d, n_texts = info.hidden_size, sum(map(len, texts.values()))
    megabytes = info.n_hidden_states * d * (4 * 8 * d + 4 * n_texts) / 2**20
    return pd.Series(dtype=object, data={
        "train texts": len(texts["train"]), "test texts": len(texts["test"]), "tokens": n_tokens,
        "truncated texts": sum(n > max_length for part in full.values() for n in part),
        "forward passes (batches)": sum(-(-len(part) // batch_size) for part in texts.values()),
        "timed texts": len(timed), "seconds per 1000 tokens": float(f"{1000 * per_token:.3g}"),
        "estimated seconds": float(f"{per_token * n_tokens:.3g}"),
        "memory of the moments and features (MB)": float(f"{megabytes:.3g}")})
