"""Markdown tables of an estimator map summary (benchmarks/estimator_map.py's summary_*.csv).

    python benchmarks/estimator_map_report.py benchmarks/results/estimator_map/summary_d16.csv
prints the tables quoted in docs/estimator.md.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def table(frame: pd.DataFrame) -> str:
    frame = frame.reset_index()
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    s = pd.read_csv(path)
    s = s[np.isfinite(s["truth"])]
    print(f"{len(s)} (cell, estimator) rows; draws per cell {int(s['draws'].min())}-{int(s['draws'].max())}; "
          f"median Monte Carlo SE of a cell's bias {s['bias_mcse'].median():.3g}\n")
    print("Mean |bias| over cells, by N/d (rows) and estimator (columns):\n")
    print(table(s.pivot_table(index="n_over_d", columns="estimator", values="bias",
                              aggfunc=lambda b: float(np.mean(np.abs(b)))).round(3)))
    print("\nMedian RMSE over cells:\n")
    print(table(s.pivot_table(index="n_over_d", columns="estimator", values="rmse", aggfunc="median").round(3)))
    print("\nMedian coverage of the nominal 90% jackknife-t interval over cells:\n")
    print(table(s.pivot_table(index="n_over_d", columns="estimator", values="coverage", aggfunc="median").round(3)))
    print("\nShare of cells with coverage in [0.85, 0.95]:\n")
    print(table(s.assign(ok=(s.coverage >= 0.85) & (s.coverage <= 0.95)).pivot_table(
        index="n_over_d", columns="estimator", values="ok", aggfunc="mean").round(2)))
    cf = s[s.estimator == "crossfit"]
    print("\ncrossfit: share of draws flagged reliable, and among cells with >= 20 reliable draws, the coverage "
          "and |bias| of those draws:\n")
    r = cf[cf.n_reliable >= 20]
    out = cf.groupby("n_over_d").agg(share_reliable=("share_reliable", "mean")).join(
        r.groupby("n_over_d").agg(cells=("k", "size"), median_coverage=("coverage_reliable", "median"),
                                  min_coverage=("coverage_reliable", "min"),
                                  median_abs_bias=("bias_reliable", lambda b: float(np.median(np.abs(b)))),
                                  cells_bias_below_quarter_width=(
                                      "bias_reliable", lambda b: int(0)))).round(3)
    ok = r.assign(small=r.bias_reliable.abs() < r.width_reliable / 4,
                  covers=(r.coverage_reliable >= 0.85) & (r.coverage_reliable <= 0.95))
    out["cells_bias_below_quarter_width"] = ok.groupby("n_over_d")["small"].sum()
    out["cells_covering"] = ok.groupby("n_over_d")["covers"].sum()
    print(table(out))


if __name__ == "__main__":
    main(sys.argv[1])
