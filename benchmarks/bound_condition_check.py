"""The flag's bound condition (`flag_at_bound`, `BOUND_SE`) measured on estimator-map draws.

A row of `ntps_estimate` is reliable when its subspace noise and eigengaps pass, its interval is finite
and meets [0, 1], and (since estimates stage version 3) its estimate lies more than `BOUND_SE` jackknife
standard errors inside [0, 1]. Where the population NTPS is 0 or 1 the jackknife interval over-covers
(docs/estimator.md); this script shows what the last condition changes. For each per-draw frame of
`benchmarks/estimator_map.py` (richardson rows), with the flag's other conditions recomputed from the
frame's columns (so frames written before the condition are read the same way):

- per file and bound ``c`` (0: no bound condition; --bounds), the rows accepted, their pooled coverage
  and the cells with at least `MIN_ACCEPTED` accepted draws outside [0.85, 0.95] by the exact
  one-sided binomial tests of `estimator_flag_report` (each such cell listed);
- pooled over the files, per ``c``: the accepted rows whose population NTPS lies within `NEAR` of 0 or
  1 and the others, with their coverage; and the per-file counts summed.

``--gap-min`` / ``--noise-max`` ask a stricter eigengap / noise condition than the flag's (what-if).
``--cells`` lists every cell with at least `MIN_ACCEPTED` accepted rows at each bound, with the exact
one-sided p-values of its coverage against 0.85 (below) and 0.95 (above), and the SD of its accepted
estimates beside their median jackknife SE. ``--save-candidates DIR`` writes, per file, the rows meeting the other conditions with the columns
this report reads (small enough to commit; the report reads them back like full frames). Example:

    python benchmarks/bound_condition_check.py benchmarks/results/estimator_map/bound/candidates_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED, accepted, exact_band_tests  # noqa: E402

from ntps_nb.core.estimators import BOUND_SE, GAP_MIN, NOISE_MAX, flag_at_bound  # noqa: E402

#: A population NTPS within this of 0 or 1 counts as at the bound in the pooled table.
NEAR = 0.005
#: The columns a candidates frame keeps.
KEEP = CELL + ["draw", "estimate", "se", "lower", "upper", "truth", "covered", "subspace_noise", "gap_ratio",
               "n_shards", "n_texts", "task_seed"]


def candidates(frame: pd.DataFrame) -> pd.DataFrame:
    """The richardson rows meeting the flag's conditions other than the bound: finite interval meeting
    [0, 1], subspace noise at most `NOISE_MAX`, eigengap ratio at least `GAP_MIN`."""
    f = frame[frame["estimator"] == "richardson"]
    ok = accepted(f, NOISE_MAX, GAP_MIN) & (f["lower"] <= 1) & (f["upper"] >= 0)
    return f.loc[ok, [c for c in KEEP if c in f.columns]].reset_index(drop=True)


def kept(frame: pd.DataFrame, bound: float) -> pd.Series:
    """The candidate rows the bound condition keeps at ``bound`` standard errors, as `flag_at_bound`
    decides (0: every row, no bound condition)."""
    if bound == 0:
        return pd.Series(True, index=frame.index)
    return ~flag_at_bound(frame.assign(reliable=True), bound)["at_bound"]


def cell_tests(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per cell with at least `MIN_ACCEPTED` rows: rows, covered, truth; and the exact band tests."""
    g = frame.groupby(CELL).agg(n=("covered", "size"), covered=("covered", "sum"), truth=("truth", "first"),
                                sd=("estimate", "std"), median_se=("se", "median"))
    g = g[g["n"] >= MIN_ACCEPTED]
    below, above = exact_band_tests(g["covered"], g["n"])
    return g, below, above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draws", nargs="+", help="per-draw frames of benchmarks/estimator_map.py (or candidates)")
    parser.add_argument("--bounds", type=float, nargs="+", default=[0.0, 0.5, BOUND_SE, 2.0])
    parser.add_argument("--save-candidates", metavar="DIR", help="write each file's candidate rows there")
    parser.add_argument("--cells", action="store_true", help="list every cell with enough accepted rows")
    parser.add_argument("--gap-min", type=float, default=GAP_MIN,
                        help=f"a stricter eigengap condition than the flag's (at least GAP_MIN = {GAP_MIN:g})")
    parser.add_argument("--noise-max", type=float, default=NOISE_MAX,
                        help=f"a stricter noise condition than the flag's (at most NOISE_MAX = {NOISE_MAX:g})")
    args = parser.parse_args()
    if args.gap_min < GAP_MIN or args.noise_max > NOISE_MAX:
        parser.error("--gap-min and --noise-max can only be stricter than the flag's (the candidates are its rows)")
    pd.set_option("display.width", 200)
    pooled = []
    for path in args.draws:
        frame = candidates(pd.read_csv(path))
        frame = frame[(frame["gap_ratio"] >= args.gap_min) & (frame["subspace_noise"] <= args.noise_max)]
        frame["covered"] = frame["covered"].astype(bool)
        name = Path(path).name
        if args.save_candidates:
            out = Path(args.save_candidates)
            out.mkdir(parents=True, exist_ok=True)
            frame.to_csv(out / f"candidates_{name.removeprefix('candidates_')}", index=False)
        print(f"\n{name}: {len(frame)} rows meet the noise, eigengap and [0, 1] conditions")
        for bound in args.bounds:
            rows = frame[kept(frame, bound)]
            g, below, above = cell_tests(rows)
            print(f"  bound {bound:g} se: accepted {len(rows)}, pooled coverage {rows['covered'].mean():.3f}, "
                  f"cells with >= {MIN_ACCEPTED}: {len(g)}, below 0.85: {int(below.sum())}, "
                  f"above 0.95: {int(above.sum())}")
            for (cell, row), lo in zip(g[below | above].iterrows(), below[below | above]):
                where = ", ".join(f"{c.removeprefix('task_')}={v}" for c, v in zip(CELL, cell) if c != "estimator")
                print(f"    {'below' if lo else 'above'}: {where}: {int(row['covered'])} of {int(row['n'])} "
                      f"covered ({row['covered'] / row['n']:.3f}), truth {row['truth']:.4f}")
            if args.cells:
                for cell, row in g.iterrows():
                    where = ", ".join(f"{c.removeprefix('task_')}={v}" for c, v in zip(CELL, cell) if c != "estimator")
                    p_below = scipy.stats.binom.cdf(row["covered"], row["n"], 0.85)
                    p_above = scipy.stats.binom.sf(row["covered"] - 1, row["n"], 0.95)
                    print(f"    cell {where}: {int(row['covered'])} of {int(row['n'])} ({row['covered'] / row['n']:.3f}), "
                          f"p below 0.85 {p_below:.3g}, p above 0.95 {p_above:.3g}; SD of the estimates "
                          f"{row['sd']:.3f}, median SE {row['median_se']:.3f}")
            near = np.minimum(rows["truth"], 1 - rows["truth"]) < NEAR
            pooled.append({"bound": bound, "accepted": len(rows), "cells": len(g), "cells_below": int(below.sum()),
                           "cells_above": int(above.sum()), "near_rows": int(near.sum()), "near_covered": int(rows["covered"][near].sum()),
                           "other_rows": int((~near).sum()), "other_covered": int(rows["covered"][~near].sum())})
    table = pd.DataFrame(pooled).groupby("bound").sum()
    table["near_coverage"] = (table["near_covered"] / table["near_rows"]).round(3)
    table["other_coverage"] = (table["other_covered"] / table["other_rows"]).round(3)
    print(f"\nPooled over the files: accepted rows whose population NTPS lies within {NEAR:g} of 0 or 1 (near) "
          f"and the others, by bound (standard errors; 0: no bound condition)\n")
    print(table[["near_rows", "near_coverage", "other_rows", "other_coverage"]].to_string())
    print(f"\nSummed over the files, by bound: accepted rows, cells with >= {MIN_ACCEPTED} of them, and those "
          f"below 0.85 / above 0.95 by the exact tests\n")
    print(table[["accepted", "cells", "cells_below", "cells_above"]].to_string())


if __name__ == "__main__":
    main()
