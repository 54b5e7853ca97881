"""Browser check of the explorer notebook: JupyterLab on localhost, headless Chromium, a slider moved.

    .venv/bin/python scripts/browser_check.py [--results DIR] [--out out/browser] [--smoke]
    make browser-check        # what CI runs (.ci/run): committed default results, --smoke

What a reader would do, done by a program:

1. write a copy of notebooks/05_explorer.ipynb into the output folder with its parameters set
   (the results folder, ``interactive = True`` so the live explorer is built, and with --smoke the
   tiny-model parameters of ``SMOKE_PARAMETERS`` for the Figure-1 cell), outputs cleared;
2. start JupyterLab on a free localhost port with a random token and fresh settings (no restored
   workspace, no news, every cell kept in the page);
3. open the copy in Debian's Chromium, driven by Playwright (``executable_path``: no browser
   download), wait for the kernel to be idle (the server's kernel state, no fixed sleeps), run all
   cells from the Run menu, wait until no cell is queued ("[*]") and the kernel is idle again
   (JupyterLab stops a Run All at the first error; the cells after it stay unrun);
4. save the notebook from the browser and read what the kernel produced: a cell with an error
   output, or one that never ran, fails the check; so does an error shown anywhere in the page
   (a traceback inside the explorer's own output area included) or "Error displaying widget";
5. find the explorer (the cell whose widgets have a slider labelled "layer"), screenshot, move
   the layer slider with the keyboard, wait for a new figure and an idle kernel, screenshot again;
6. compare the figure images the kernel sent before and after (decoded PNGs, pixel by pixel).

Exit status: 0 when every cell ran without error, the slider moved and the figure changed; 1 when
any of that fails (the reason is printed and written to result.json); 2 when Chromium or Playwright
is missing (``apt-get install -y --no-install-recommends chromium``; ``make browser-setup``).
Artefacts in the output folder: explorer_before.png, explorer_after.png (the explorer as a reader
sees it), figure_before.png, figure_after.png (the kernel's figure images), failure.png (the
page when a step fails), the executed notebook as saved from the browser, jupyterlab.log and
result.json (timings, slider values, figure hashes, the share of pixels that changed).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Debian's chromium package puts its launcher here; BROWSER_CHECK_CHROMIUM or --chromium overrides.
CHROMIUM = os.environ.get("BROWSER_CHECK_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = "05_explorer"
#: Label of the explorer's slider that the check moves.
SLIDER_LABEL = "layer"
#: How far (in slider steps) the check moves it.
SLIDER_STEPS = 6
#: Seconds the kernel must stay idle before the check takes it as finished.
IDLE_SETTLE_S = 1.5
#: Outputs that mean a cell or a widget callback failed. JupyterLab renders an error output with
#: the stderr renderer (the same MIME type as a warning), so the page is searched for a traceback
#: in stderr-rendered outputs; the saved notebook, read as JSON, has the errors of every cell.
STDERR_SELECTOR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
TRACEBACK_TEXT = "Traceback (most recent call last)"
#: Text ipywidgets shows where a widget view could not be built.
WIDGET_ERROR_TEXT = "Error displaying widget"
#: Text the explorer prints when the tables do not cover the selection (ntps_nb.widgets).
EMPTY_SELECTION_TEXT = "nothing to show for this selection"
#: JupyterLab settings for the run: every cell attached to the page (so a check of the page sees
#: all outputs), no news or update checks (no network, no toast over the notebook).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


class CheckFailed(RuntimeError):
    """The explorer did not do what a reader expects (the message says what)."""


# -- the notebook --------------------------------------------------------------------------------


def prepare_notebook(source: Path, out: Path, results: Path, smoke: bool) -> Path:
    """Write the explorer notebook with its parameters set and its outputs cleared.

    Parameters
    ----------
    source : Path
        The notebook to check (notebooks/05_explorer.ipynb).
    out : Path
        Folder the copy is written to (JupyterLab's root).
    results : Path
        Combined study folder the explorer reads (``results_dir``).
    smoke : bool
        Also set the tiny-model parameters of ``SMOKE_PARAMETERS["05_explorer"]``.

    Returns
    -------
    Path
        The written copy, ``<out>/05_explorer_browser.ipynb``.
    """
    import nbformat

    sys.path.insert(0, str(REPO))
    from ntps_nb.notebooks import SMOKE_PARAMETERS, clean_notebook

    nb = nbformat.read(source, as_version=4)
    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if at is None:
        raise CheckFailed(f"{source} has no cell tagged 'parameters'")
    params = {**(SMOKE_PARAMETERS.get(NOTEBOOK, {}) if smoke else {}), "results_dir": str(results.resolve())}
    if "interactive" in nb.cells[at].source:  # the smoke parameters turn the live widgets off
        params["interactive"] = True
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in params.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, injected)
    nb = clean_notebook(nb, keep_injected=True)
    for cell in nb.cells:  # start from a blank page: what the browser shows, the kernel made
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    path = out / f"{NOTEBOOK}_browser.ipynb"
    nbformat.write(nb, path)
    return path


def notebook_problems(path: Path) -> list[str]:
    """What the saved notebook says went wrong: error outputs and code cells that never ran.

    Parameters
    ----------
    path : Path
        The notebook as JupyterLab saved it after running all cells.

    Returns
    -------
    list of str
        One line per problem, naming the cell by its index and first line (empty when every
        non-empty code cell ran without an error output).
    """
    nb = json.loads(path.read_text())
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        source = "".join(cell.get("source", "")).strip()
        if cell.get("cell_type") != "code" or not source:
            continue
        name = f"cell {i} ({source.splitlines()[0][:50]!r})"
        if cell.get("execution_count") is None:
            problems.append(f"{name} did not run")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{name} raised {output.get('ename')}: {output.get('evalue')}")
    return problems


# -- figures -------------------------------------------------------------------------------------


def decode_png(src: str) -> bytes:
    """The PNG bytes of an ``<img>`` data URI (empty when it is not one)."""
    prefix = "data:image/png;base64,"
    return base64.b64decode(src[len(prefix):]) if src and src.startswith(prefix) else b""


def image_difference(before: bytes, after: bytes) -> float:
    """Fraction of pixels that differ between two PNG images, over the area they share.

    Parameters
    ----------
    before, after : bytes
        PNG files (of the same size or not: a redrawn figure can be a few pixels wider).

    Returns
    -------
    float
        In [0, 1]; 0 when the top-left area common to both has identical pixels.
    """
    from PIL import Image, ImageChops

    a = Image.open(io.BytesIO(before)).convert("RGB")
    b = Image.open(io.BytesIO(after)).convert("RGB")
    box = (0, 0, min(a.size[0], b.size[0]), min(a.size[1], b.size[1]))
    diff = ImageChops.difference(a.crop(box), b.crop(box)).convert("L").point(lambda v: 255 if v else 0)
    return diff.histogram()[255] / (box[2] * box[3])


def image_size(png: bytes) -> tuple[int, int]:
    """Width and height of a PNG."""
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


def image_colours(png: bytes) -> int:
    """Number of distinct colours of a PNG (1 for a blank image), capped at 256."""
    from PIL import Image

    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=256)
    return 256 if colours is None else len(colours)


# -- JupyterLab ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lab_settings(folder: Path) -> None:
    """Fresh user settings and workspaces for this run (nothing restored from earlier sessions)."""
    shutil.rmtree(folder, ignore_errors=True)
    for name, values in LAB_SETTINGS.items():
        path = folder / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    (folder / "workspaces").mkdir(parents=True, exist_ok=True)


def start_lab(root: Path, port: int, token: str, log: Path, settings: Path) -> subprocess.Popen:
    write_lab_settings(settings)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}", "--allow-root",
           f"--LabApp.user_settings_dir={settings / 'settings'}",
           f"--LabApp.workspaces_dir={settings / 'workspaces'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    # the user's Jupyter config and data folders left out: no kernelspec or server setting of an
    # earlier session changes the run (the kernel is this environment's python3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JUPYTER_CONFIG_DIR": str(settings / "config"), "JUPYTER_DATA_DIR": str(settings / "data")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=root, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise CheckFailed(f"JupyterLab exited with {proc.returncode}; see {log}")
            time.sleep(0.5)
    stop_lab(proc)
    raise CheckFailed(f"JupyterLab did not answer within 120 s; see {log}")


def stop_lab(proc: subprocess.Popen) -> None:
    proc.terminate()  # the server shuts its kernels down on SIGTERM
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Lab:
    """The running server's REST API: the notebook's kernel state."""

    def __init__(self, port: int, token: str, notebook: str):
        self.base, self.token, self.notebook = f"http://127.0.0.1:{port}", token, notebook

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base}{path}?token={self.token}", timeout=10) as r:
            return json.load(r)

    def kernel_state(self) -> str | None:
        """``idle``, ``busy``, ``starting``, ... of the notebook's kernel (None before it has one)."""
        for session in self.get("/api/sessions"):
            if session.get("path", "").endswith(self.notebook) and session.get("kernel"):
                return session["kernel"].get("execution_state")
        return None

    def wait_idle(self, timeout_s: float, what: str) -> None:
        """Return once the kernel has been idle for ``IDLE_SETTLE_S`` (CheckFailed after ``timeout_s``)."""
        deadline, idle_since = time.time() + timeout_s, None
        while time.time() < deadline:
            if self.kernel_state() == "idle":
                idle_since = idle_since or time.time()
                if time.time() - idle_since >= IDLE_SETTLE_S:
                    return
            else:
                idle_since = None
            time.sleep(0.25)
        raise CheckFailed(f"the kernel was not idle within {timeout_s:.0f} s {what} (state {self.kernel_state()})")


# -- the page ------------------------------------------------------------------------------------


def page_problems(page) -> list[str]:
    """Errors the page shows: tracebacks in outputs (cells or widget output areas), broken widgets."""
    problems = []
    for text in page.locator(STDERR_SELECTOR).filter(has_text=TRACEBACK_TEXT).all_inner_texts():
        lines = [line for line in text.strip().splitlines() if line.strip()]
        problems.append(f"a traceback in the page: {lines[-1] if lines else '(empty)'}")
    if page.get_by_text(WIDGET_ERROR_TEXT).count():
        problems.append(f"the page shows {WIDGET_ERROR_TEXT!r}")
    return problems


def code_prompts(page) -> list[str]:
    """The execution prompts of all code cells, in order ("[3]:", "[*]:", "[ ]:")."""
    return page.evaluate("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
                         ".map(p => p.textContent.trim())")


def menu(page, name: str, item: str) -> None:
    """Choose ``item`` from JupyterLab's main menu ``name`` (acts on the open notebook)."""
    page.get_by_role("menuitem", name=name, exact=True).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
    page.locator(".lm-Menu-item").filter(has=label).first.click()  # its name may carry the shortcut


def explorer_parts(page):
    """The explorer's cell, its layer slider and its figure output area."""
    slider = page.locator(".widget-slider").filter(
        has=page.locator(".widget-label", has_text=SLIDER_LABEL)).first
    if not slider.count():
        raise CheckFailed(f"no explorer widget: no slider labelled {SLIDER_LABEL!r} in the page")
    cell = page.locator(".jp-CodeCell").filter(has=slider).first
    return cell, slider, cell.locator(".widget-output").first


def figure_src(output) -> str:
    """The data URI of the figure in the explorer's output area ("" while it has none)."""
    img = output.locator("img")
    return (img.first.get_attribute("src") or "") if img.count() else ""


def run_check(lab: Lab, url: str, out: Path, notebook: Path, timeout_s: float, change_timeout_s: float,
              steps: int) -> dict:
    """Drive the page through steps 3-6 of the module docstring; CheckFailed says what went wrong."""
    from playwright.sync_api import sync_playwright

    result: dict[str, Any] = {"page_errors": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda error: result["page_errors"].append(str(error)))
        try:
            _drive(page, lab, url, out, notebook, timeout_s, change_timeout_s, steps, result)
        except Exception:
            page.screenshot(path=str(out / "failure.png"))  # JupyterLab scrolls inside the viewport
            raise
        finally:
            browser.close()
    return result


def _drive(page, lab, url, out, notebook, timeout_s, change_timeout_s, steps, result) -> None:
    t0 = time.time()
    page.goto(url, timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=timeout_s * 1000)
    lab.wait_idle(timeout_s, "after the notebook opened")
    menu(page, "Run", "Run All Cells")  # menus, not clicks into the page, which could hit a widget

    # Run All has started (a prompt left "[ ]"), then nothing is queued ("[*]") and the kernel is
    # idle: every cell ran, or JupyterLab stopped at an error (the cells after it stay "[ ]")
    deadline = time.time() + timeout_s
    while not any(p != "[ ]:" for p in code_prompts(page)):
        if time.time() > deadline:
            raise CheckFailed(f"Run All Cells started no cell within {timeout_s:.0f} s")
        time.sleep(0.25)
    while True:
        if not any("*" in p for p in code_prompts(page)):
            lab.wait_idle(timeout_s, "after running all cells")
            if not any("*" in p for p in code_prompts(page)):
                break
        if time.time() > deadline:
            raise CheckFailed(f"cells still running after {timeout_s:.0f} s: prompts {code_prompts(page)}")
        time.sleep(0.5)
    result["run_all_s"] = round(time.time() - t0, 1)

    # save from the browser; the saved file is what the kernel produced, cell by cell
    mtime = notebook.stat().st_mtime_ns
    menu(page, "File", "Save Notebook")
    deadline = time.time() + 60
    while notebook.stat().st_mtime_ns == mtime or page.locator(".lm-TabBar-tab.jp-mod-dirty").count():
        if time.time() > deadline:
            raise CheckFailed("the notebook was not saved within 60 s of Ctrl+S")
        time.sleep(0.25)
    problems = notebook_problems(notebook) + page_problems(page)
    if problems:
        raise CheckFailed("; ".join(problems))

    cell, slider, output = explorer_parts(page)
    page.wait_for_function("el => !!el.querySelector('img')", arg=output.element_handle(), timeout=timeout_s * 1000)
    if EMPTY_SELECTION_TEXT in output.inner_text():
        raise CheckFailed(f"the explorer opens on an empty selection: {output.inner_text().strip()}")
    before_src = figure_src(output)
    before = decode_png(before_src)
    if not before or image_colours(before) < 2:
        raise CheckFailed("the explorer's first figure is not a PNG with content")
    (out / "figure_before.png").write_bytes(before)
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "explorer_before.png"))

    # move the layer slider with the keyboard, away from the nearer end
    handle = slider.locator("[role=slider], .noUi-handle").first
    readout = slider.locator(".widget-readout").first
    value_before = readout.inner_text().strip()
    low, now, high = (float(handle.get_attribute(a) or 0) for a in ("aria-valuemin", "aria-valuenow", "aria-valuemax"))
    key, n = ("ArrowLeft", min(steps, int(now - low))) if now - low >= high - now else ("ArrowRight", min(steps, int(high - now)))
    if n < 1:
        raise CheckFailed(f"the {SLIDER_LABEL} slider has a single position ({value_before})")
    handle.focus()
    t1 = time.time()
    for _ in range(n):
        page.keyboard.press(key)
    value_after = readout.inner_text().strip()
    result.update(slider=SLIDER_LABEL, value_before=value_before, value_after=value_after, keys=f"{key} x {n}")
    if value_after == value_before:
        raise CheckFailed(f"the {SLIDER_LABEL} slider did not move with {key} x {n} (readout {value_before})")

    # the new figure: wait for a different image (or an error), then for the kernel to finish
    deadline = time.time() + change_timeout_s
    while figure_src(output) in (before_src, "") and not page_problems(page) and time.time() < deadline:
        time.sleep(0.25)
    lab.wait_idle(timeout_s, "after the slider moved")
    result["redraw_s"] = round(time.time() - t1, 1)
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "explorer_after.png"))
    problems = page_problems(page)
    if EMPTY_SELECTION_TEXT in output.inner_text():
        problems.append(f"the explorer shows an empty selection at {SLIDER_LABEL} {value_after}")
    if problems:
        raise CheckFailed("; ".join(problems))
    after = decode_png(figure_src(output))
    if not after or image_colours(after) < 2:
        raise CheckFailed(f"no figure with content after moving the {SLIDER_LABEL} slider to {value_after}")
    (out / "figure_after.png").write_bytes(after)
    result["figure_before"] = hashlib.sha256(before).hexdigest()[:16]
    result["figure_after"] = hashlib.sha256(after).hexdigest()[:16]
    result["figure_size_before"], result["figure_size_after"] = image_size(before), image_size(after)
    result["pixels_changed"] = round(image_difference(before, after), 4)
    if result["pixels_changed"] == 0 and result["figure_size_before"] == result["figure_size_after"]:
        raise CheckFailed(f"the figure did not change when the {SLIDER_LABEL} slider moved "
                          f"{value_before} -> {value_after} (waited {change_timeout_s:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    global CHROMIUM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "data" / "results" / "default-richardson"),
                        help="combined study folder the explorer reads (default: the committed default study)")
    parser.add_argument("--out", default=str(REPO / "out" / "browser"), help="screenshots, logs, result.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model for the Figure-1 cell")
    parser.add_argument("--notebook", default=str(REPO / "notebooks" / f"{NOTEBOOK}.ipynb"),
                        help="the explorer notebook to check")
    parser.add_argument("--chromium", default=CHROMIUM, help="Chromium executable (Debian's package)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for opening and running all cells")
    parser.add_argument("--change-timeout", type=float, default=60.0,
                        help="seconds to wait for the figure to change after the slider moved")
    parser.add_argument("--steps", type=int, default=SLIDER_STEPS, help="slider steps to move")
    args = parser.parse_args(argv)
    CHROMIUM = args.chromium
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.png"), out / "result.json"]:  # nothing left from an earlier run
        stale.unlink(missing_ok=True)
    if not Path(CHROMIUM).is_file():
        print(f"browser check: {CHROMIUM} not found (apt-get install -y --no-install-recommends chromium)")
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("browser check: playwright is not installed in this environment (make browser-setup)")
        return 2
    results = Path(args.results)
    if not (results / "ntps.csv").is_file():
        print(f"browser check: no study results in {results} (ntps.csv missing)")
        return 1
    t0 = time.time()
    result: dict[str, Any] = {"notebook": args.notebook, "results": str(results.resolve()), "smoke": args.smoke}
    lab = None
    try:
        notebook = prepare_notebook(Path(args.notebook), out, results, args.smoke)
        port, token = free_port(), secrets.token_hex(16)
        lab = start_lab(out, port, token, out / "jupyterlab.log", out / ".lab")
        result.update(run_check(Lab(port, token, notebook.name), f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}",
                                out, notebook, args.timeout, args.change_timeout, args.steps))
        result["passed"] = True
    except Exception as error:  # CheckFailed, or a page step that timed out: the check failed
        result.update(passed=False, reason=f"{type(error).__name__}: {error}".splitlines()[0] if not isinstance(error, CheckFailed)
                      else str(error))
    finally:
        if lab is not None:
            stop_lab(lab)
    result["total_s"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["passed"]:
        print(f"browser check passed: all cells ran without error; {SLIDER_LABEL} {result['value_before']} -> "
              f"{result['value_after']} redrew the figure ({result['pixels_changed']:.0%} of its pixels changed) "
              f"({result['total_s']:.0f} s); screenshots in {out}")
        return 0
    print(f"browser check FAILED: {result['reason']}; screenshots and log in {out}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
