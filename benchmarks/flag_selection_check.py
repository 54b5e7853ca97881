"""Does the reliability flag pick draws whose jackknife SE is too small? Per cell, all draws against
the draws the flag accepts.

The flag's noise and eigengap conditions are read off the same delete-one-shard jackknife as the
interval's standard error. Where a cell's draws sit near the thresholds, the flag can accept the draws
whose replicates happen to agree, whose SE is then small while their estimates spread as widely as
all draws': the accepted rows under-cover though every draw's interval is honest on average. For each
cell (estimator, k) of per-draw frames of `benchmarks/estimator_map.py`: the draws' coverage, the SD of
their estimates and their median SE, for all draws and for the accepted ones (the frame's
``reliable``). Example (docs/estimator.md, "A design where the flag fails"):

    python benchmarks/flag_selection_check.py benchmarks/results/estimator_map/bound/plugin_richardson_draws_d64_seed2[36]_lds_c2_moderate.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL  # noqa: E402

#: The columns the check reads (kept by ``--save``).
KEEP = CELL + ["draw", "estimate", "se", "lower", "upper", "truth", "covered", "reliable", "subspace_noise",
               "gap_ratio"]


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per cell: draws, coverage, SD of the estimates and median SE, for all draws and the accepted ones."""
    frame = frame.assign(covered=frame["covered"].astype(bool), reliable=frame["reliable"].astype(bool))

    def one(c: pd.DataFrame) -> pd.Series:
        a = c[c["reliable"]]
        return pd.Series({"truth": c["truth"].iloc[0], "draws": len(c), "coverage": c["covered"].mean(),
                          "sd": c["estimate"].std(), "median_se": c["se"].median(), "accepted": len(a),
                          "accepted_coverage": a["covered"].mean(), "accepted_sd": a["estimate"].std(),
                          "accepted_median_se": a["se"].median()})

    return frame.groupby(CELL).apply(one, include_groups=False).round(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draws", nargs="+", help="per-draw frames of benchmarks/estimator_map.py")
    parser.add_argument("--save", metavar="DIR", help="write each frame's columns this check reads there")
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    for path in args.draws:
        frame = pd.read_csv(path)
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            frame[[c for c in KEEP if c in frame.columns]].to_csv(out / Path(path).name, index=False)
        print(f"\n{Path(path).name}\n")
        print(summary(frame).reset_index().drop(columns=["task_d", "n_over_d"]).to_string(index=False))


if __name__ == "__main__":
    main()
