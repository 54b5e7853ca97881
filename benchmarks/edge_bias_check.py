"""Where item 4's bias part fails, at the edges of [0, 1]: the estimator's bias, or the flag's selection?

In the cells whose population NTPS lies within `EDGE` of 0 or 1, the rows the flag accepts are biased
by a quarter of their interval's width or more (`rotation_flag_report.py`'s bias columns). This script
compares, cell by cell, those rows with every row that meets the flag's other conditions (subspace
noise, eigengaps, [0, 1], the rotation condition where the frame has it) but not necessarily the bound
condition (`flag_at_bound`: the estimate at least `BOUND_SE` standard errors inside [0, 1]). If the
second set is unbiased, the bias is made by the bound condition choosing which draws count, not by
the estimator.

It then reports, over every cell of the frames, the band and bias counts of three ways to treat the
rows at the bound:

- ``flag``: the package's (they are not reliable);
- ``keep``: they count, with the jackknife-t interval as it is (conservative at an extremum: the
  delete-one jackknife's variance is R(S) = 2 (S - 1) / (S - 2) times the variance of a statistic
  whose error is quadratic in the noise, S shards);
- ``shrink``: they count, with the interval's half-width divided by sqrt(R(S)), the correction that
  would be exact for a row whose truth sits at the extremum.

    python benchmarks/edge_bias_check.py benchmarks/results/estimator_map/bound/candidates_draws_d*_seed??.csv.gz \\
        benchmarks/results/estimator_map/rotation_flag/fresh_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED, accepted  # noqa: E402
from gap_selection_check import GAP_MIN, NOISE_MAX, _meets_unit_interval  # noqa: E402
from rotation_flag_report import cell_table, summary  # noqa: E402

from ntps_nb.core.estimators import flag_at_bound  # noqa: E402

#: A cell is at an edge of [0, 1] when its population NTPS lies within this of 0 or 1.
EDGE = 0.005


def other_conditions(frame: pd.DataFrame) -> pd.Series:
    """The flag's conditions but the bound one, recomputed from the frame's columns. The rotation
    condition counts where the frame computed it: frames written since `ntps_estimate` computes the
    ranges only on the rows the other conditions accept (the bound one included) leave it NaN on the
    rows at the bound, which are then kept on the other conditions alone."""
    kept = accepted(frame, NOISE_MAX, GAP_MIN) & _meets_unit_interval(frame)
    if "rotation_stable" in frame:
        kept &= frame["rotation_stable"].astype(bool) | frame["rotation_lower"].isna()
    return kept


def at_bound(frame: pd.DataFrame) -> pd.Series:
    return flag_at_bound(frame[["estimate", "se"]].assign(reliable=True))["at_bound"].astype(bool)


def shrunk(frame: pd.DataFrame, rows: pd.Series) -> pd.DataFrame:
    """The frame with the intervals of ``rows`` narrowed by sqrt(R(S)) about their estimates."""
    s = frame["n_shards"].astype(float)
    factor = np.where(rows, 1 / np.sqrt(2 * (s - 1) / (s - 2)), 1.0)
    half = (frame["upper"] - frame["lower"]) / 2 * factor
    out = frame.assign(lower=frame["estimate"] - half, upper=frame["estimate"] + half)
    return out.assign(covered=(out["lower"] <= out["truth"]) & (out["truth"] <= out["upper"]))


def edge_cells(frame: pd.DataFrame, name: str) -> list[dict]:
    """Per edge cell: the rows meeting the other conditions against the flag's (both bounds' effect)."""
    edge = (frame["truth"] < EDGE) | (frame["truth"] > 1 - EDGE)
    others = other_conditions(frame)
    flagged = others & ~at_bound(frame)
    key = CELL + (["task_seed"] if "task_seed" in frame else [])
    rows = []
    for cell, g in frame[edge & others].groupby(key):
        if len(g) < MIN_ACCEPTED:
            continue
        out = {"frame": name, **dict(zip(key, cell)), "truth": g["truth"].iloc[0]}
        for label, h in (("others", g), ("flag", g[flagged[g.index]])):
            err, width = h["estimate"] - h["truth"], (h["upper"] - h["lower"]).mean()
            out |= {f"{label}_rows": len(h), f"{label}_coverage": h["covered"].mean() if len(h) else np.nan,
                    f"{label}_bias_over_width": err.mean() / width if len(h) else np.nan}
        rows.append(out)
    return rows


def outside(frame: pd.DataFrame, kept: pd.Series, name: str, label: str) -> list[dict]:
    """The cells of the kept rows significantly outside [0.85, 0.95], with their truths."""
    cells = cell_table(frame, kept)
    cells = cells[cells["below"] | cells["above"]]
    return [{"treatment": label, "frame": name, "side": "below" if row.pop("below") else "above",
             **{k: v for k, v in row.items() if k not in ("above", "bias", "sd", "width")}}
            for row in cells.drop(columns=["estimator"]).rename(columns={"sum": "covered", "size": "rows"})
            .to_dict("records")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", help="estimator_map per-draw frames (richardson rows are read)")
    args = parser.parse_args()
    edges, variants, outsiders = [], [], []
    for path in args.frames:
        f = pd.read_csv(path)
        f = f[f["estimator"] == "richardson"].reset_index(drop=True)
        name = Path(path).name
        edges += edge_cells(f, name)
        others, bound = other_conditions(f), at_bound(f)
        variants += [summary(name, f, others & ~bound, "flag"), summary(name, f, others, "keep"),
                     summary(name, shrunk(f, bound), others, "shrink")]
        outsiders += (outside(f, others & ~bound, name, "flag") + outside(f, others, name, "keep")
                      + outside(shrunk(f, bound), others, name, "shrink"))
    edges = pd.DataFrame(edges)
    print(f"## cells with truth within {EDGE} of 0 or 1 and >= {MIN_ACCEPTED} rows meeting the flag's other "
          f"conditions: those rows against the flag's (bias as a share of the mean interval width)")
    print(edges.drop(columns=["estimator"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\n## every cell, the three treatments of the rows at the bound, summed over the frames "
          "(below / above: exact one-sided binomial tests at 0.025; biased: |bias| above a quarter of the "
          "width by more than BIAS_Z Monte Carlo SEs)")
    v = pd.DataFrame(variants)
    totals = v.groupby("flag", sort=False).agg(rows=("rows", "sum"), cells=("cells", "sum"), below=("below", "sum"),
                                               above=("above", "sum"), biased=("bias_quarter_significant", "sum"))
    totals["coverage"] = (v["coverage"] * v["rows"]).groupby(v["flag"], sort=False).sum() / totals["rows"]
    print(totals.to_string(float_format=lambda x: f"{x:.3f}"))
    print("\nper frame:")
    print(v[["frame", "flag", "rows", "coverage", "cells", "below", "above", "bias_quarter_significant",
             "their_truths"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nthe cells significantly outside the band, by treatment:")
    print(pd.DataFrame(outsiders).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
