"""Code run by a fresh interpreter at the repository root.

Where a warning points is checked there: in this test session the shape checker's wrappers add frames
under tests/core between a caller and the package."""

import subprocess
import sys
from pathlib import Path

#: The repository root (tests/core/fresh.py -> ../..), where ``import ntps_nb`` and ``import tests`` resolve.
ROOT = Path(__file__).resolve().parents[2]


def run_fresh(code: str) -> str:
    """The standard output of ``code`` run by this Python in a new interpreter at `ROOT`; a failure raises."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
