"""How the reliability flag of `ntps_estimate` performs on estimator-map draws (per-draw frames).

For each estimator and threshold on the subspace noise per direction (`NOISE_MAX` is the default),
with the eigengap condition (``gap_ratio >= --gap-min``, default `GAP_MIN`; 0: the noise rule alone,
as the flag was before the condition, for draws without the gap columns), per hidden size d: the share of rows the flag accepts, the pooled coverage of the accepted rows'
nominal 90% intervals (with its binomial SE), and over the cells with at least 10 accepted draws
the number whose coverage is below 0.85 by more than 2 binomial SEs, the number above 0.95 as
observed and the numbers outside [0.85, 0.95] by an exact one-sided binomial test at 2.5% per side
(`BINOMIAL_ALPHA`; with n accepted draws a cell covering every time is told apart from 0.95 only
from n = 72 on), the number whose mean error exceeds a quarter of the mean interval width, and the
worst RMSE, and the accepted rows off by more than `BAD_ERROR`; with ``--cells``, each such cell's numbers and its accepted rows off by more than
`BAD_ERROR`. Example (docs/estimator.md):

    python benchmarks/estimator_flag_report.py benchmarks/results/estimator_map/richardson/draws_d*.csv.gz
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import scipy.stats

from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX

CELL = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k", "estimator"]
MIN_ACCEPTED = 10
#: |estimate - truth| above which an accepted row counts as badly wrong (the cell table's last column).
BAD_ERROR = 0.2
#: One-sided level of the exact binomial tests of a cell's coverage against 0.85 (below) and 0.95 (above).
BINOMIAL_ALPHA = 0.025


#: The interval level item 4's band [0.85, 0.95] is stated for.
NOMINAL = 0.90


def band(nominal: float = NOMINAL) -> tuple[float, float]:
    """Item 4's coverage band for intervals at level ``nominal``: a miss rate within half of the nominal one either
    way, (nominal - (1 - nominal) / 2, nominal + (1 - nominal) / 2); [0.85, 0.95] at 0.90, [0.925, 0.975] at 0.95."""
    if not 0.0 < nominal < 1.0:
        raise ValueError(f"nominal must be in (0, 1), got {nominal}")
    half = (1.0 - nominal) / 2
    return round(nominal - half, 12), round(nominal + half, 12)


def exact_band_tests(covered, accepted, nominal: float = NOMINAL) -> tuple[np.ndarray, np.ndarray]:
    """Whether each cell covers below / above the `band` of ``nominal`` (0.85 / 0.95 at 0.90) by an exact one-sided
    binomial test at `BINOMIAL_ALPHA`, from its covered and accepted draw counts (arrays of the same length)."""
    covered, accepted = np.asarray(covered), np.asarray(accepted)
    low, high = band(nominal)
    below = scipy.stats.binom.cdf(covered, accepted, low) < BINOMIAL_ALPHA
    above = scipy.stats.binom.sf(covered - 1, accepted, high) < BINOMIAL_ALPHA
    return below, above


def accepted(frame: pd.DataFrame, threshold: float, gap_min: float) -> pd.Series:
    """The rows the flag accepts at noise threshold ``threshold`` and eigengap ratio ``gap_min``."""
    out = (frame["subspace_noise"] <= threshold) & np.isfinite(frame["lower"]) & np.isfinite(frame["upper"])
    if gap_min > 0:
        if "gap_ratio" not in frame.columns:
            raise SystemExit("these draws have no gap_ratio column (written before the eigengap condition): "
                             "report them with --gap-min 0 (the noise rule alone) or regenerate them")
        out &= frame["gap_ratio"] >= gap_min
    return out


def cells(frame: pd.DataFrame, threshold: float, gap_min: float) -> pd.DataFrame:
    """Per cell: draws, accepted draws, and the accepted draws' coverage, bias, width, RMSE."""
    f = frame.assign(accepted=accepted(frame, threshold, gap_min), width=frame["upper"] - frame["lower"])

    def one(c: pd.DataFrame) -> pd.Series:
        a = c[c["accepted"]]
        return pd.Series({"draws": len(c), "accepted": len(a), "truth": c["truth"].iloc[0],
                          "coverage": a["covered"].mean() if len(a) else np.nan,
                          "bias": a["error"].mean() if len(a) else np.nan,
                          "width": a["width"].mean() if len(a) else np.nan,
                          "rmse": np.sqrt(np.mean(a["error"] ** 2)) if len(a) else np.nan})

    return f.groupby(CELL).apply(one, include_groups=False).reset_index()


def report(frame: pd.DataFrame, thresholds, gap_min: float) -> pd.DataFrame:
    rows = []
    frame = frame[np.isfinite(frame["truth"])]
    for estimator in sorted(frame["estimator"].unique()):
        for threshold in thresholds:
            mine = frame[frame["estimator"] == estimator]
            c = cells(mine, threshold, gap_min)
            bad = mine[accepted(mine, threshold, gap_min) & (mine["error"].abs() > BAD_ERROR)]
            for d, g in c.groupby("task_d"):
                n = g["accepted"].sum()
                cov = np.average(g["coverage"].fillna(0), weights=g["accepted"]) if n else np.nan
                big = g[g["accepted"] >= MIN_ACCEPTED]
                se = np.sqrt(0.85 * 0.15 / big["accepted"])
                covered = np.rint(big["coverage"] * big["accepted"])
                below, above = exact_band_tests(covered, big["accepted"])
                rows.append({
                    "estimator": estimator, "noise_max": threshold, "gap_min": gap_min, "d": int(d),
                    "share_accepted": n / g["draws"].sum(), "accepted_rows": int(n),
                    "coverage_accepted": cov, "coverage_mcse": np.sqrt(cov * (1 - cov) / n) if n else np.nan,
                    f"cells_with_{MIN_ACCEPTED}+": len(big),
                    "undercover_2se": int((big["coverage"] < 0.85 - 2 * se).sum()),
                    "overcover": int((big["coverage"] > 0.95).sum()),
                    "below_0.85_exact": int(below.sum()), "above_0.95_exact": int(above.sum()),
                    "bias_over_quarter_width": int((big["bias"].abs() > big["width"] / 4).sum()),
                    "worst_rmse": big["rmse"].max() if len(big) else np.nan,
                    f"off_by_{BAD_ERROR:g}": int((bad["task_d"] == d).sum()),
                    "N/d accepted": ",".join(f"{r:g}" for r in sorted(g.loc[g["accepted"] > 0, "n_over_d"].unique())),
                })
    return pd.DataFrame(rows)


def cell_table(frame: pd.DataFrame, threshold: float, gap_min: float) -> pd.DataFrame:
    """Per estimator, the cells with at least `MIN_ACCEPTED` accepted draws at ``threshold`` or an
    accepted row off by more than `BAD_ERROR`: accepted draws, coverage, bias, width, RMSE, and
    those badly wrong rows."""
    frame = frame[np.isfinite(frame["truth"])]
    ok = accepted(frame, threshold, gap_min)
    off = (frame[ok & (frame["error"].abs() > BAD_ERROR)].groupby(CELL).size().rename(f"off_by_{BAD_ERROR:g}"))
    c = cells(frame, threshold, gap_min)
    c = c.merge(off, left_on=CELL, right_index=True, how="left").fillna({f"off_by_{BAD_ERROR:g}": 0})
    return c[(c["accepted"] >= MIN_ACCEPTED) | (c[f"off_by_{BAD_ERROR:g}"] > 0)].reset_index(drop=True)


def _markdown(table: pd.DataFrame) -> None:
    print("| " + " | ".join(table.columns) + " |\n|" + "---|" * table.shape[1])
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draws", nargs="+", help="per-draw frames written by benchmarks/estimator_map.py")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, NOISE_MAX, 0.1, 0.2])
    parser.add_argument("--cells", action="store_true",
                        help=f"also print the cells with >= {MIN_ACCEPTED} accepted draws at NOISE_MAX, or a "
                             f"badly wrong accepted row")
    parser.add_argument("--gap-min", type=float, default=GAP_MIN,
                        help=f"smallest eigengap ratio of an accepted row (default GAP_MIN = {GAP_MIN:g}; 0: the "
                             f"noise rule alone)")
    args = parser.parse_args()
    frame = pd.concat([pd.read_csv(p) for p in args.draws], ignore_index=True)
    _markdown(report(frame, args.thresholds, args.gap_min))
    finite = frame[np.isfinite(frame["truth"])]
    ok = accepted(finite, NOISE_MAX, args.gap_min)
    outside = ok & ((finite["lower"] > 1) | (finite["upper"] < 0))
    print(f"\nAccepted at noise_max = {NOISE_MAX:g}, gap_min = {args.gap_min:g}: {int(ok.sum())} rows, of which "
          f"{int(outside.sum())} have an interval wholly outside [0, 1] (the flag's third condition refuses those)")
    if args.cells:
        print(f"\nCells with >= {MIN_ACCEPTED} accepted draws at noise_max = {NOISE_MAX:g}, gap_min = "
              f"{args.gap_min:g}, or an accepted row off by more than {BAD_ERROR:g}:\n")
        _markdown(cell_table(frame, NOISE_MAX, args.gap_min))


if __name__ == "__main__":
    main()
