"""Browser check of the explorer notebook: JupyterLab on localhost, headless Chromium, a widget change.

    .venv/bin/python scripts/browser_check.py [--results DIR] [--out out/browser] [--smoke]

Steps: write a parameterised copy of notebooks/05_explorer.ipynb into the output folder (results
folder and, with --smoke, tiny-model parameters), start JupyterLab on a free localhost port
with a random token, open the copy in Debian's Chromium (driven by Playwright, no browser
download), run all cells, screenshot, move the explorer's layer slider with the keyboard, wait for
the figure to be redrawn, screenshot again, and compare the figure images. Exit 0 when the figure
changed. Needs ``apt-get install chromium`` and ``pip install playwright``; CI may skip it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_notebook(out: Path, results: Path, smoke: bool) -> Path:
    import nbformat

    sys.path.insert(0, str(REPO))
    from ntps_nb.notebooks import SMOKE_PARAMETERS, clean_notebook, notebook_path

    params = {**(SMOKE_PARAMETERS["05_explorer"] if smoke else {}), "results_dir": str(results.resolve())}
    nb = nbformat.read(notebook_path("05_explorer"), as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in params.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, injected)
    nb = clean_notebook(nb, keep_injected=True)
    for cell in nb.cells:  # start from a blank page: what the browser shows, the kernel made
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    path = out / "05_explorer_browser.ipynb"
    nbformat.write(nb, path)
    return path


def start_lab(root: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--allow-root", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=root,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited; see {log}")
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"JupyterLab did not answer within 120 s; see {log}")


def figure_digest(page) -> str:
    """sha256 of the explorer's figure image (the first PNG inside a widget output area)."""
    src = page.locator(".widget-output img, .jupyter-widgets-output-area img").first.get_attribute("src")
    return hashlib.sha256((src or "").encode()).hexdigest()[:16]


def run_check(url: str, out: Path, timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, timeout=timeout_s * 1000)
        page.wait_for_selector(".jp-Notebook", timeout=timeout_s * 1000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus, .jp-KernelStatus",
                               timeout=timeout_s * 1000)
        time.sleep(3)  # let the kernel connect
        page.locator(".jp-Notebook").click()
        page.keyboard.press("Escape")
        # Run > Run All Cells through the command palette shortcut-free route: the menu
        page.get_by_role("menuitem", name="Run").first.click()
        page.get_by_text("Run All Cells", exact=True).first.click()
        page.wait_for_selector(".widget-output img, .jupyter-widgets-output-area img", timeout=timeout_s * 1000)
        # wait until every cell ran (the kernel is idle again), then show the explorer
        page.wait_for_function("() => !document.querySelector('.jp-InputArea-prompt') || "
                               "![...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))",
                               timeout=timeout_s * 1000)
        for close in page.locator(".jp-Notification-Toast-Close, .jp-toast-button:has-text('No')").all():
            try:
                close.click(timeout=2000)
            except Exception:
                pass
        slider = page.locator(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle").first
        page.locator(".widget-dropdown").first.scroll_into_view_if_needed()
        page.mouse.wheel(0, -150)
        time.sleep(2)
        page.screenshot(path=str(out / "explorer_before.png"), full_page=False)
        before = figure_digest(page)
        slider.focus()
        for _ in range(6):
            page.keyboard.press("ArrowLeft")
        deadline = time.time() + timeout_s
        after = before
        while time.time() < deadline and after == before:
            time.sleep(1)
            try:
                after = figure_digest(page)
            except Exception:  # the output is being cleared and redrawn
                continue
        time.sleep(2)
        page.screenshot(path=str(out / "explorer_after.png"), full_page=False)
        page.screenshot(path=str(out / "explorer_full_page.png"), full_page=True)
        browser.close()
    return {"before": before, "after": after, "changed": before != after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "data" / "results" / "fast"),
                        help="combined study folder the explorer reads")
    parser.add_argument("--out", default=str(REPO / "out" / "browser"))
    parser.add_argument("--smoke", action="store_true", help="tiny model for the Figure-1 cell")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not Path(CHROMIUM).is_file():
        print(f"skipped: {CHROMIUM} not found (apt-get install -y chromium)")
        return 77
    notebook = prepare_notebook(out, Path(args.results), args.smoke)
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(REPO, port, token, out / "jupyterlab.log")
    try:
        rel = notebook.relative_to(REPO).as_posix()
        result = run_check(f"http://127.0.0.1:{port}/lab/tree/{rel}?token={token}", out, args.timeout)
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
    print(f"figure before {result['before']}, after {result['after']}: "
          + ("changed" if result["changed"] else "DID NOT change") + f"; screenshots in {out}")
    return 0 if result["changed"] else 1


if __name__ == "__main__":
    sys.exit(main())
