"""Would widening the estimator's interval by its bias bound make unreliable rows cover?

For every richardson row of the committed map draws (`benchmarks/estimator_map.py` outputs), the
jackknife interval widened by ``bias_bound`` on each side (the subspace noise's order-of-magnitude
bound on the plug-in's bias, `ntps_nb.core.estimators.subspace_noise`) and clipped to [0, 1], against
the population NTPS: its coverage and median width by N/d, beside the unwidened interval's coverage.
A bias-aware interval is only worth adding if it covers *and* is narrower than [0, 1]. Example:

    python benchmarks/bias_bound_interval_check.py benchmarks/results/estimator_map/richardson/draws_d*.csv.gz \
        benchmarks/results/estimator_map/richardson/heldout_draws_*.csv.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def widened(draws: pd.DataFrame) -> pd.DataFrame:
    """Coverage and width by N/d of the interval and of the interval widened by the bias bound."""
    rows = draws[draws["estimator"] == "richardson"].copy()
    lower = np.clip(rows["lower"] - rows["bias_bound"], 0.0, 1.0)
    upper = np.clip(rows["upper"] + rows["bias_bound"], 0.0, 1.0)
    rows["covered"] = (rows["truth"] >= rows["lower"]) & (rows["truth"] <= rows["upper"])
    rows["covered_widened"] = (rows["truth"] >= lower) & (rows["truth"] <= upper)
    rows["width_widened"] = upper - lower
    rows["no_bound"] = rows["bias_bound"].isna()  # k beyond a replicate's rank: no widened interval (not covered)
    return rows.groupby("n_over_d").agg(rows=("covered", "size"), coverage=("covered", "mean"),
                                        coverage_widened=("covered_widened", "mean"),
                                        median_width_widened=("width_widened", "median"),
                                        share_reliable=("reliable", "mean"),
                                        share_no_bound=("no_bound", "mean"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draws", nargs="+", help="per-draw CSVs of benchmarks/estimator_map.py")
    args = parser.parse_args()
    for path in args.draws:
        table = widened(pd.read_csv(path))
        if table.empty:
            continue
        print(f"\n{Path(path).name}")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
