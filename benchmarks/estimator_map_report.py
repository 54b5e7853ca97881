"""Markdown tables of an estimator map summary (benchmarks/estimator_map.py's summary_*.csv).

    python benchmarks/estimator_map_report.py benchmarks/results/estimator_map/summary_d16_seven_estimators.csv
prints the tables quoted in docs/estimator.md;

    python benchmarks/estimator_map_report.py --figure docs/estimator_map.png SUMMARY.csv [SUMMARY.csv ...]
draws mean |bias| and median coverage against N/d, one line per estimator and hidden size;

    python benchmarks/estimator_map_report.py --flag SUMMARY.csv [SUMMARY.csv ...]
tells, per summary and estimator, how the reliability flag recorded in the draws did (`flag_table`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import BINOMIAL_ALPHA, MIN_ACCEPTED, exact_band_tests  # noqa: E402


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
    keys = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k"]
    bias = s.pivot_table(index=keys, columns="estimator", values="bias")
    rmse = s.pivot_table(index=keys, columns="estimator", values="rmse")
    if "plugin" in bias:
        rows = []
        for e in bias.columns.drop("plugin"):
            ok = bias[e].notna() & bias["plugin"].notna()
            rows.append({"estimator": e, "cells": int(ok.sum()),
                         "cells_smaller_abs_bias": int((bias[e].abs() < bias["plugin"].abs())[ok].sum()),
                         "cells_smaller_rmse": int((rmse[e] < rmse["plugin"])[ok].sum()),
                         "median_abs_bias": float(bias[e].abs()[ok].median()),
                         "plugin_median_abs_bias": float(bias["plugin"].abs()[ok].median())})
        print("\nCell by cell against the plug-in (cells where both are defined):\n")
        print(table(pd.DataFrame(rows).set_index("estimator").round(3)))
    cf = s[s.estimator == "crossfit"]
    if cf.empty:
        return
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


def flag_table(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How the reliability flag did in one map summary, per estimator, and the cells outside the band.

    Parameters
    ----------
    summary : `ntps_nb.core.simulate.summarise_map` output (``n_reliable``, ``coverage_reliable``,
        ``bias_reliable``, ``width_reliable`` and ``rmse_reliable`` per cell: the rows whose
        ``reliable`` flag was True when the map ran).

    Returns
    -------
    (per estimator: rows, accepted, share accepted overall and by N/d, pooled coverage of the accepted
    rows, and over the cells with at least `MIN_ACCEPTED` accepted draws how many cover below 0.85 or
    above 0.95 by an exact one-sided binomial test at `BINOMIAL_ALPHA`, how many have a mean error
    above a quarter of the mean interval width, and the worst RMSE;
    the cells outside [0.85, 0.95] by those tests).
    """
    rows, outside = [], []
    for estimator, g in summary[np.isfinite(summary["truth"])].groupby("estimator"):
        accepted = g["n_reliable"].sum()
        covered = (g["coverage_reliable"].fillna(0) * g["n_reliable"]).round()
        cells = g[g["n_reliable"] >= MIN_ACCEPTED]
        below, above = exact_band_tests(covered[cells.index], cells["n_reliable"])
        by_ratio = g.groupby("n_over_d").apply(lambda c: c["n_reliable"].sum() / c["draws"].sum(), include_groups=False)
        rows.append({"estimator": estimator, "d": int(g["task_d"].iloc[0]), "draws_per_cell": int(g["draws"].max()),
                     "rows": int(g["draws"].sum()), "accepted": int(accepted),
                     "share_accepted": accepted / g["draws"].sum(),
                     "share_by_N/d": ", ".join(f"{r:g}: {v:.4f}" for r, v in by_ratio.items()),
                     "coverage_accepted": covered.sum() / accepted if accepted else np.nan,
                     f"cells_{MIN_ACCEPTED}+": len(cells), "below_0.85": int(below.sum()), "above_0.95": int(above.sum()),
                     "bias_over_quarter_width": int((cells["bias_reliable"].abs() > cells["width_reliable"] / 4).sum()),
                     "worst_rmse": cells["rmse_reliable"].max()})
        outside.append(cells[below | above])
    keys = ["estimator", "task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k", "truth",
            "n_reliable", "coverage_reliable", "bias_reliable", "width_reliable"]
    return pd.DataFrame(rows).set_index("estimator"), pd.concat(outside)[keys]


def print_flag(paths: list[str]) -> None:
    for path in paths:
        per_estimator, outside = flag_table(pd.read_csv(path))
        print(f"\n{Path(path).name}\n")
        print(table(per_estimator))
        if len(outside):
            print("\nCells outside [0.85, 0.95] by the exact tests:\n")
            print(table(outside.set_index("estimator")))


def figure(out: str, paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [pd.read_csv(p) for p in paths]
    s = pd.concat(frames, ignore_index=True)
    s = s[np.isfinite(s["truth"]) & ~s["estimator"].isin(["crossfit_inverse"])]
    s = s.drop_duplicates(["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k", "estimator"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (estimator, d), g in s.groupby(["estimator", "task_d"]):
        by = g.groupby("n_over_d")
        style = "-" if d == s["task_d"].min() else "--"
        axes[0].plot(by["bias"].apply(lambda b: np.mean(np.abs(b))).clip(upper=1.0), style, marker="o",
                     label=f"{estimator}, d={d}")
        axes[1].plot(by["coverage"].median(), style, marker="o", label=f"{estimator}, d={d}")
    axes[0].set(xscale="log", xlabel="N / d", ylabel="mean |bias| over cells (clipped at 1)",
                title="Bias against the population NTPS")
    axes[1].axhspan(0.85, 0.95, color="0.9")
    axes[1].set(xscale="log", xlabel="N / d", ylabel="median coverage over cells", ylim=(0, 1.02),
                title="Coverage of nominal 90% jackknife-t intervals")
    axes[1].legend(title="estimator, hidden size", fontsize=7, ncol=2)
    fig.text(0.01, 0.01, "generators: factor and LDS families, C in {2, 6, 20}, three eigengap regimes, k in {1..32}; "
             "sources: " + ", ".join(Path(p).name for p in paths), fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "--figure":
        figure(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "--flag":
        print_flag(sys.argv[2:])
    else:
        main(sys.argv[1])
