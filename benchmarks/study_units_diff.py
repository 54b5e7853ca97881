"""How far a study's recomputed units moved: each unit's tables against those of an earlier git revision.

For every unit folder of the study, reads ``ntps.csv`` and ``intervals.csv`` as committed at ``--against``
(`git show REV:path`) and as they are in the working tree, merges them on (variant, layer, k, fraction) and
prints the largest |difference| of the theory NTPS, of the reference NTPS and of the theory interval ends,
with the k at which the theory values moved by more than ``--tol``, beside the unit's extraction version and
token precision (``unit.json``; "-" for a unit written before units recorded them).

    python benchmarks/study_units_diff.py data/results/fast --against afedf13
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

KEYS = ["variant", "layer", "k", "fraction"]


def committed(path: Path, revision: str) -> pd.DataFrame | None:
    """The table at ``path`` as committed at ``revision``, or None where it was not committed then."""
    shown = subprocess.run(["git", "show", f"{revision}:{path.as_posix()}"], capture_output=True, text=True)
    return pd.read_csv(io.StringIO(shown.stdout)) if shown.returncode == 0 else None


def moved(before: pd.DataFrame, after: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows of both tables merged on `KEYS`, with ``d`` = the largest |difference| over ``columns``."""
    keys = [key for key in KEYS if key in before.columns and key in after.columns]
    both = before.merge(after, on=keys, suffixes=("_before", "_after"))
    both["d"] = np.nanmax(np.column_stack([(both[f"{c}_before"] - both[f"{c}_after"]).abs() for c in columns]),
                          axis=1)
    return both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a combined study folder (with units/), relative to the repo")
    parser.add_argument("--against", required=True, help="the git revision whose units to compare with")
    parser.add_argument("--tol", type=float, default=1e-3, help="theory values moved by more than this are listed")
    args = parser.parse_args()

    print(f"$ python benchmarks/study_units_diff.py {args.folder} --against {args.against} --tol {args.tol:g}")
    print("unit | extract_version / token products | theory NTPS: max |d| (k moved > tol) | reference NTPS max |d| "
          "| theory interval ends: max |d| (k moved > tol)")
    for unit in sorted(p for p in (args.folder / "units").iterdir() if p.is_dir()):
        meta = json.loads((unit / "unit.json").read_text())
        version = f"{meta.get('extract_version') or '-'} / {meta.get('token_precision_train') or '-'}"
        cells = []
        for name, variant, columns in (("ntps", "theory", ["ntps"]), ("ntps", "reference", ["ntps"]),
                                       ("intervals", "theory", ["lower", "upper"])):
            before = committed(unit / f"{name}.csv", args.against)
            if before is None:
                cells.append("not committed then")
                continue
            after = pd.read_csv(unit / f"{name}.csv")
            both = moved(before[before["variant"] == variant], after[after["variant"] == variant], columns)
            text = f"{both['d'].max():.1e}"
            if variant == "theory":
                ks = sorted({int(k) for k in both.loc[both["d"] > args.tol, "k"]})
                text += f" ({', '.join(map(str, ks)) or 'none'})"
            cells.append(text)
        print(f"{unit.name} | {version} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
