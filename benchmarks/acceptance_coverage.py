"""How a reliable row's coverage depends on how often the flag accepts its population's draws (issue 21, item 4;
docs/estimator.md, "Rare acceptance: where the flag seldom accepts, its rows under-cover", session 62).

Item 4 is checked per grid cell (a population, N/d and k) on the cells where the flag accepts at least 10 rows. A
population whose draws the flag accepts once in a thousand never has such a cell at a few thousand draws, so its
reliable rows are never tested, yet a reader of one reliable row cannot tell it came from such a population. This
report pools the interior cells (not at a stationary point: `stationary_condition_check.at_stationary_point`) of any
number of frames by their acceptance rate (the share of the cell's draws the flag accepts, estimated from the same
draws) and gives, per bin, the reliable rows' coverage with the default interval and with the interval widened over
the rotation sets (``ntps_estimate(rotation_widening=True)``), each with exact one-sided binomial p-values against
0.85 (below) and 0.95 (above), pooled over the bin's cells.

It reads the frames of `rotation_union_check.py` and of `unseen_family_check.py --rotation-widening` (both carry the
interval before and after the widening, from `ntps_estimate`'s defaults with the whole flag). A cell needs at least
``--min-draws`` draws (default 200) to be binned, so that its rate is resolved.

    python benchmarks/acceptance_coverage.py FRAME.csv.gz ... [--bins 0 0.003 0.01 0.03 0.1 0.3 1] [--rare 0.01]
        [--by-frame]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import NOMINAL, band  # noqa: E402
from rotation_union_check import from_unseen  # noqa: E402
from stationary_condition_check import at_stationary_point  # noqa: E402

#: The cell key of both frame kinds (after `from_unseen`).
CELL = ["family", "settings", "n_over_d", "k"]


def cell_table(paths: list[str], min_draws: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`cell_table_of` the frames in the files ``paths``, each named by its file name."""
    return cell_table_of([(Path(path).name, pd.read_csv(path, low_memory=False)) for path in paths], min_draws)


def cell_table_of(frames: list[tuple[str, pd.DataFrame]], min_draws: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per interior cell of the (name, frame) pairs ``frames`` with at least ``min_draws`` draws: draws,
    accepted (reliable) rows, the acceptance rate, and the accepted rows covered by the default and the widened
    interval; the accepted rows of those cells with their ``gap_ratio`` and their cell's ``rate``). A cell's draws are
    pooled over the frames (more draws of one population, run apart), a draw met twice (the same script's seeding,
    draw seed and index) counted once; ``frame`` names the frames a cell's draws came from."""
    rows = []
    for name, frame in frames:
        # the two scripts seed their draws differently: a draw is the same only within one scheme
        scheme = "estimator_map" if "task_family" in frame else "union"
        frame = from_unseen(frame) if scheme == "estimator_map" else frame
        if "lower_union" not in frame:
            raise SystemExit(f"{name}: not a frame of rotation_union_check.py or unseen_family_check.py "
                             "--rotation-widening (no widened interval)")
        truth = frame["truth"]
        gap_ratio = (np.fmin(frame["gap_ratio_U"], frame["gap_ratio_V"]) if "gap_ratio_U" in frame
                     else frame["gap_ratio"])
        rows.append(frame[CELL + ["seed", "draw", "truth"]].assign(scheme=scheme, gap_ratio=gap_ratio,
            accepted=frame["reliable"].astype(bool),
            covered=(frame["lower"] <= truth) & (truth <= frame["upper"]),
            covered_union=(frame["lower_union"] <= truth) & (truth <= frame["upper_union"]), frame=name))
    frame = pd.concat(rows, ignore_index=True).drop_duplicates(CELL + ["scheme", "seed", "draw"])
    accepted = frame[frame["accepted"]]
    table = frame.groupby(CELL).agg(truth=("truth", "first"), draws=("accepted", "size"), accepted=("accepted", "sum"),
                                    frame=("frame", lambda names: " ".join(dict.fromkeys(names))))
    table = table.join(accepted.groupby(CELL).agg(covered=("covered", "sum"), covered_union=("covered_union", "sum")))
    table = table.fillna({"covered": 0, "covered_union": 0}).reset_index()
    interior = ~at_stationary_point(table["truth"], table["settings"].map(json.loads))
    table = table[interior & (table["draws"] >= min_draws)].assign(rate=lambda t: t["accepted"] / t["draws"])
    return table, accepted.merge(table[CELL + ["rate"]], on=CELL)


def pooled(table: pd.DataFrame, by, nominal: float = NOMINAL) -> pd.DataFrame:
    """The cells of ``table`` grouped by ``by``: cells, draws, reliable rows, the rows the default and the widened
    interval cover, and their pooled coverage with exact one-sided p-values against the `band` of intervals at level
    ``nominal`` (below 0.85, and above 0.95 for the widened, at 0.90)."""
    low, high = band(nominal)
    out = table.groupby(by, observed=True).agg(cells=("accepted", "size"), draws=("draws", "sum"),
                                               rows=("accepted", "sum"),
                                               covered=("covered", "sum"), covered_union=("covered_union", "sum"))
    n, x, y = out["rows"].astype(int), out["covered"].astype(int), out["covered_union"].astype(int)
    some = n > 0  # a bin without rows has no coverage and no test

    def where_rows(values):
        return np.where(some, values, np.nan)

    out["default"] = where_rows(x / n.clip(lower=1))
    out[f"p below {low:g}"] = where_rows(st.binom.cdf(x, n, low))
    out["widened"] = where_rows(y / n.clip(lower=1))
    out[f"p below {low:g} (widened)"] = where_rows(st.binom.cdf(y, n, low))
    out[f"p above {high:g} (widened)"] = where_rows(st.binom.sf(y - 1, n, high))
    return out.rename(columns={"covered_union": "covered widened"}).astype(
        {"covered": int, "covered widened": int}).round(4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("frames", nargs="+")
    parser.add_argument("--bins", type=float, nargs="+", default=[0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                        help="edges of the acceptance-rate bins (left-open, right-closed)")
    parser.add_argument("--min-draws", type=int, default=200)
    parser.add_argument("--rare", type=float, default=0.01, help="pool every cell at or below this rate as well")
    parser.add_argument("--by-frame", action="store_true", help="also pool each frame's cells at or below --rare")
    args = parser.parse_args()
    table, accepted = cell_table(args.frames, args.min_draws)
    pd.set_option("display.width", 250)
    print(f"{len(table)} interior cells with >= {args.min_draws} draws in {len(args.frames)} frame(s); "
          f"{int((table['accepted'] == 0).sum())} with no reliable row (rate 0, left out of the bins)")
    print("\nThe reliable rows pooled by their cell's acceptance rate (the share of its draws the flag accepts); "
          "default: ntps_estimate's interval, widened: rotation_widening=True; p: exact one-sided binomial")
    bins = pd.cut(table["rate"], args.bins)
    print(pooled(table[table["accepted"] > 0], bins[table["accepted"] > 0]).to_string())
    print("\nThe reliable rows' gap ratio (the smaller of U's and V's eigengap at k in jackknife SEs; the flag's "
          "eigengap condition asks >= 5) by the same bins:")
    quantiles = accepted.groupby(pd.cut(accepted["rate"], args.bins), observed=True)["gap_ratio"]
    print(quantiles.describe(percentiles=[0.1, 0.5, 0.9])[["count", "10%", "50%", "90%"]].round(2).to_string())
    rare = table[(table["accepted"] > 0) & (table["rate"] <= args.rare)]
    print(f"\nevery cell with a rate at or below {args.rare}, pooled:")
    print(pooled(rare.assign(all="all"), "all").to_string())
    if args.by_frame:
        print(f"\ncells with a rate at or below {args.rare}, by frame:")
        print(pooled(rare, "frame").to_string())


if __name__ == "__main__":
    main()
