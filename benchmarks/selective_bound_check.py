"""Post-selection inference for the bound condition: does conditioning on it remove the edge bias?

The flag's bound condition keeps a row only where its estimate lies at least `BOUND_SE` standard
errors inside [0, 1]. That is a selection on the estimate itself, and at a population NTPS within
0.005 of 0 or 1 it keeps the draws whose error is most negative (or positive): the kept rows are
biased by a quarter to a third of their interval's width (`edge_bias_check.py`). The textbook answer
to inference after a selection on the estimate is to condition on it (the truncated-pivot intervals
of Lee, Sun, Sun and Taylor, Annals of Statistics 2016, here with the jackknife-t pivot): if
(estimate - theta) / se follows Student's t with S - 1 degrees of freedom, then given the selection
BOUND_SE * se <= estimate <= 1 - BOUND_SE * se it follows that t truncated to
[(BOUND_SE * se - theta) / se, (1 - BOUND_SE * se - theta) / se]. Inverting its CDF at the observed t
gives a conditional interval (quantiles (1 +- level) / 2) and a conditionally median-unbiased estimate
(quantile 1 / 2); both are clipped to [0, 1]. The se is treated as fixed.

This script applies it to every row the flag accepts in estimator_map frames and reports, against the
flag's rows as they are, the cells significantly outside [0.85, 0.95] and those whose |bias| is above a
quarter of the mean interval width (the tests of `rotation_flag_report.py`), and the edge cells.

    python benchmarks/selective_bound_check.py \\
        benchmarks/results/estimator_map/bound/candidates_draws_d*_seed??.csv.gz \\
        benchmarks/results/estimator_map/rotation_flag/fresh_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_bias_check import EDGE, at_bound, other_conditions  # noqa: E402
from rotation_flag_report import cell_table, summary  # noqa: E402

from ntps_nb.core.estimators import BOUND_SE  # noqa: E402

#: Nominal level of the map's intervals.
LEVEL = 0.90
#: The truths the conditional pivot is evaluated at (an interval end is found to this spacing).
THETA_GRID = np.linspace(-0.5, 1.5, 4001)


def selective(estimate: np.ndarray, se: np.ndarray, df: np.ndarray, level: float = LEVEL,
              bound_se: float = BOUND_SE) -> dict[str, np.ndarray]:
    """Conditional estimate and interval of rows selected by bound_se * se <= estimate <= 1 - bound_se * se.

    For each candidate theta the pivot is P(T <= t_obs | a <= T <= b), T ~ t(df), t_obs = (estimate -
    theta) / se, a and b the selection's limits in t units; it decreases in theta. The estimate (interval
    end) is the largest theta of `THETA_GRID` where the pivot is at least 1/2 ((1 + level) / 2 for the
    lower end, (1 - level) / 2 for the upper).
    """
    theta = THETA_GRID[:, None]
    t = (estimate[None] - theta) / se[None]
    lo = stats.t.cdf((bound_se * se[None] - theta) / se[None], df[None])
    hi = stats.t.cdf((1 - bound_se * se[None] - theta) / se[None], df[None])
    mass = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        pivot = np.where(mass > 1e-12, (stats.t.cdf(t, df[None]) - lo) / mass, np.nan)
    out = {}
    for name, q in (("estimate", 0.5), ("lower", (1 + level) / 2), ("upper", (1 - level) / 2)):
        at_least = pivot >= q
        last = THETA_GRID.size - 1 - np.argmax(at_least[::-1], axis=0)
        out[name] = np.clip(np.where(at_least.any(axis=0), THETA_GRID[last], THETA_GRID[0]), 0.0, 1.0)
    return out


def conditioned(frame: pd.DataFrame, kept: pd.Series) -> pd.DataFrame:
    """The frame with the kept rows' estimate and interval replaced by the conditional ones."""
    g = frame[kept]
    s = selective(g["estimate"].to_numpy(), g["se"].to_numpy(), g["n_shards"].to_numpy() - 1.0)
    out = frame.copy()
    for name, values in s.items():
        out.loc[kept, name] = values
    return out.assign(covered=(out["lower"] <= out["truth"]) & (out["truth"] <= out["upper"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", help="estimator_map per-draw frames (richardson rows are read)")
    args = parser.parse_args()
    rows, edges = [], []
    for path in args.frames:
        f = pd.read_csv(path)
        f = f[f["estimator"] == "richardson"].reset_index(drop=True)
        name = Path(path).name
        kept = other_conditions(f) & ~at_bound(f)
        c = conditioned(f, kept)
        for label, frame in (("flag", f), ("conditional", c)):
            rows.append(summary(name, frame, kept, label) | {
                "median_width": float((frame.loc[kept, "upper"] - frame.loc[kept, "lower"]).median())})
            cells = cell_table(frame, kept)
            cells = cells[(cells["truth"] < EDGE) | (cells["truth"] > 1 - EDGE)]
            edges += [{"treatment": label, "frame": name, **r} for r in cells.to_dict("records")]
    v = pd.DataFrame(rows)
    totals = v.groupby("flag", sort=False).agg(rows=("rows", "sum"), cells=("cells", "sum"), below=("below", "sum"),
                                               above=("above", "sum"), biased=("bias_quarter_significant", "sum"))
    totals["coverage"] = (v["coverage"] * v["rows"]).groupby(v["flag"], sort=False).sum() / totals["rows"]
    totals["median_width (median over frames)"] = v.groupby("flag", sort=False)["median_width"].median()
    print("## the flag's rows with the jackknife-t interval, and with the interval and estimate conditioned on the "
          "bound condition (below / above: exact one-sided binomial tests at 0.025; biased: |bias| above a quarter "
          "of the width by more than BIAS_Z Monte Carlo SEs)")
    print(totals.to_string(float_format=lambda x: f"{x:.3f}"))
    e = pd.DataFrame(edges)
    e = e.assign(coverage=e["sum"] / e["size"], bias_over_width=e["bias"] / e["width"])
    print(f"\n## edge cells (truth within {EDGE} of 0 or 1, >= 10 kept rows)")
    print(e[["treatment", "frame", "task_family", "task_d", "task_n_classes", "task_gap", "k", "truth", "size",
             "coverage", "bias_over_width", "width", "below", "above"]]
          .sort_values(["frame", "task_family", "task_n_classes", "task_gap", "k", "treatment"])
          .to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nper frame:")
    print(v[["frame", "flag", "rows", "coverage", "cells", "below", "above", "bias_quarter_significant",
             "median_width"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
