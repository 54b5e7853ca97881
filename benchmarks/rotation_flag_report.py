"""The flag's rotation condition on the estimator map: per-cell coverage of the reliable rows with and
without it, with the exact binomial tests of `estimator_flag_report.py`.

The condition (`ntps_nb.core.rotation.rotation_stability`, on by default in `ntps_estimate`): a row is
reliable only where NTPS's range over the Fieller sets of the rotation of the eigenvector pairs at k
lies inside its jackknife-t interval. Two kinds of input:

- per-draw frames of `benchmarks/estimator_map.py` run with the condition (columns ``reliable`` and
  ``rotation_stable``): the flag without it is recomputed from the frame's columns (noise, eigengaps,
  [0, 1], the bound condition: `gap_selection_check._flag_accepted`), and must hold every row the flag
  with it holds;
- ``--hull`` frames of `benchmarks/rotation_hull_check.py` (rows the flag accepted before the
  condition, with ``fieller_lower`` / ``fieller_upper``: the jackknife-t interval joined with the
  Fieller range): the condition is that union being the interval itself (up to `STABLE_ATOL`).

    python benchmarks/rotation_flag_report.py benchmarks/results/estimator_map/rotation_flag/fresh_*.csv.gz \\
        --hull benchmarks/results/estimator_map/rotation_sets/hull_maps.csv.gz \\
        benchmarks/results/estimator_map/rotation_sets/hull_failing_design_k1.csv.gz \\
        benchmarks/results/estimator_map/rotation_sets/hull_fresh.csv.gz --bound-se 1.5 2 3

Besides coverage, item 4's bias part: the cells whose |bias| reaches a quarter of their mean interval
width, and those where it does so by more than `BIAS_Z` Monte Carlo SEs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED, exact_band_tests  # noqa: E402
from gap_selection_check import _flag_accepted, _in_failing  # noqa: E402

from ntps_nb.core.rotation import STABLE_ATOL  # noqa: E402


#: z of a cell's |bias| above a quarter of its mean width (its bias's Monte Carlo SE as the unit)
#: from which the bias part of item 4 counts as failed.
BIAS_Z = 1.96


def cell_table(frame: pd.DataFrame, kept: pd.Series) -> pd.DataFrame:
    """The kept rows' cells (design x population) with >= `MIN_ACCEPTED` rows: covered rows (sum), rows
    (size), bias, SD of the error, mean width, truth, and the exact band tests (below, above)."""
    g = frame[kept].assign(width=lambda x: x["upper"] - x["lower"], err=lambda x: x["estimate"] - x["truth"])
    key = CELL + (["task_seed"] if "task_seed" in frame else [])
    cells = g.groupby(key).agg(sum=("covered", "sum"), size=("covered", "size"), bias=("err", "mean"),
                               sd=("err", "std"), width=("width", "mean"), truth=("truth", "first")).reset_index()
    cells = cells[cells["size"] >= MIN_ACCEPTED]
    below, above = exact_band_tests(cells["sum"], cells["size"])
    return cells.assign(below=np.asarray(below, dtype=bool), above=np.asarray(above, dtype=bool))


def summary(name: str, frame: pd.DataFrame, kept: pd.Series, flag: str) -> dict:
    """The kept rows' coverage, their cells (`cell_table`), the band tests, and the cells whose |bias|
    reaches a quarter of their mean width (as a point value, and by more than `BIAS_Z` Monte Carlo
    SEs), with the truths of the latter."""
    g = frame[kept]
    cells = cell_table(frame, kept)
    below, above = cells["below"], cells["above"]
    failing = g[_in_failing(g)]
    share = cells["sum"] / cells["size"]
    biased = cells["bias"].abs() >= cells["width"] / 4
    z = (cells["bias"].abs() - cells["width"] / 4) / (cells["sd"] / np.sqrt(cells["size"]))
    return {"frame": name, "flag": flag, "rows": int(kept.sum()), "coverage": g["covered"].mean(),
            "cells": len(cells), "below": int(below.sum()), "above": int(above.sum()),
            "point_below": int((share < 0.85).sum()), "point_above": int((share > 0.95).sum()),
            "failing_design_rows": len(failing),
            "failing_design_coverage": failing["covered"].mean() if len(failing) else np.nan,
            "bias_quarter": int(biased.sum()), "bias_quarter_significant": int((z > BIAS_Z).sum()),
            "their_truths": " ".join(f"{t:.3f}" for t in sorted(cells.loc[z > BIAS_Z, "truth"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="*", help="estimator_map per-draw frames run with the condition")
    parser.add_argument("--hull", nargs="*", default=[], help="rotation_hull_check.py frames (--out)")
    parser.add_argument("--bound-se", type=float, nargs="*", default=[],
                        help="also the flag with the rotation condition and the bound condition at these "
                             "numbers of SEs (BOUND_SE is 1): the rows kept, the band and bias counts")
    args = parser.parse_args()
    rows, removed, bounds = [], [], []
    failing = {"without": [0, 0], "with": [0, 0]}       # the failing design's rows and covered rows, pooled
    by_d: dict[int, list[int]] = {}                      # reliable rows and covered rows at each d, pooled
    for path in args.frames:
        f = pd.read_csv(path)
        f = f[f["estimator"] == "richardson"]
        before, after = _flag_accepted(f), f["reliable"].astype(bool)
        if (after & ~before).any():
            raise SystemExit(f"{path}: the flag with the condition holds rows the flag without it does not")
        name = Path(path).name
        rows += [summary(name, f, before, "without"), summary(name, f, after, "with")]
        for flag, kept in (("without", before), ("with", after)):
            design = f[kept & _in_failing(f)]
            failing[flag][0] += len(design)
            failing[flag][1] += int(design["covered"].sum())
        bounds += [summary(name, f, after & inside_by(f, b), f"with, bound {b:g} SE") for b in args.bound_se]
        for d, g in f[after].groupby("task_d"):
            by_d.setdefault(int(d), [0, 0])
            by_d[int(d)][0] += len(g)
            by_d[int(d)][1] += int(g["covered"].sum())
        gone = f[before & ~after]
        removed.append({"frame": name, "removed": len(gone), "removed_share": len(gone) / max(int(before.sum()), 1),
                        "removed_coverage": gone["covered"].mean() if len(gone) else np.nan})
    for path in args.hull:
        f = pd.read_csv(path)
        if "task_seed" in f:        # a rerun with more draws repeats the first draws of its population
            f = f.drop_duplicates(subset=CELL + ["task_seed", "draw", "k"], keep="last")
        stable = (f["fieller_lower"] >= f["lower"] - STABLE_ATOL) & (f["fieller_upper"] <= f["upper"] + STABLE_ATOL)
        name = Path(path).name + " (hull)"
        everything = pd.Series(True, index=f.index)
        rows += [summary(name, f, everything, "without"), summary(name, f, stable, "with")]
        bounds += [summary(name, f, stable & inside_by(f, b), f"with, bound {b:g} SE") for b in args.bound_se]
        gone = f[~stable]
        removed.append({"frame": name, "removed": len(gone), "removed_share": len(gone) / len(f),
                        "removed_coverage": gone["covered"].mean() if len(gone) else np.nan})
    print(f"cells: design x population with >= {MIN_ACCEPTED} reliable rows; below / above: significantly below 0.85 "
          "/ above 0.95 (exact one-sided binomial tests at 0.025); point_*: outside as a point value")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.frames:
        print("the failing design's rows pooled over the estimator_map frames: " + "; ".join(
            f"{flag} the condition {n} rows covering {covered / n:.3f}" if n else f"{flag} the condition none"
            for flag, (n, covered) in failing.items()))
    if by_d:
        print("the reliable rows pooled over the estimator_map frames at each d: " + "; ".join(
            f"d = {d}: {covered} of {n} covered ({covered / n:.3f})" for d, (n, covered) in sorted(by_d.items())))
    print("\nrows the condition takes out of the flag, and their coverage:")
    print(pd.DataFrame(removed).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if bounds:
        print("\nthe bound condition at other numbers of SEs (an estimate that many SEs inside [0, 1]; "
              "not the package's):")
        print(pd.DataFrame(bounds).drop(columns=["failing_design_rows", "failing_design_coverage"])
              .to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def inside_by(frame: pd.DataFrame, n_se: float) -> pd.Series:
    """Rows whose estimate lies more than ``n_se`` standard errors inside [0, 1] (the bound condition
    of `ntps_nb.core.estimators.flag_at_bound` at ``n_se`` instead of `BOUND_SE`)."""
    return (frame["estimate"] - n_se * frame["se"] > 0) & (frame["estimate"] + n_se * frame["se"] < 1)


if __name__ == "__main__":
    main()
