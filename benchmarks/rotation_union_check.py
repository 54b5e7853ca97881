"""Does widening the default interval over the selective rotation sets lift the nearly tied rows the flag accepts
into the band, and what does it cost elsewhere? (issue 21, item 4's lower side; docs/estimator.md, "The default
interval widened over the rotation sets", session 60.)

Each draw of a spec's populations is estimated with `ntps_estimate`'s defaults (richardson, the quadratic interval,
the whole flag, its stationary condition included). On the rows the flag accepts, the interval is widened over
NTPS's range on the selective rotation sets of the pairs at k (session 25's construction, which
``interval="rotation"`` joins with the jackknife-t interval on every row): since session 60 the package's option
``ntps_estimate(rotation_widening=True)`` (`ntps_nb.core.rotation.rotation_widening`, its default since session 63,
after session 62's report by acceptance rate, `acceptance_coverage.py`), which keeps the interval before it; with
``--join-here`` this script joins `rotation_interval`'s sets with the interval of
``ntps_estimate(rotation_widening=False)`` itself, as session 60's first runs did before the package had the
widening (the same numbers: `tests/core/test_rotation.py`). The frame keeps both intervals (lower / upper before,
lower_union / upper_union after); the report gives, per cell of accepted rows, the coverage of each with the exact
band tests (cells of >= 10 rows), and the widened interval's median width over the default's. With
``--refuse-above`` it also tallies an alternative to the widening (session 61): refusing the rows the widening would
widen more than a ceiling, and keeping the default interval on the rest.

    python benchmarks/rotation_union_check.py --cells SPEC.json --out CSV [--processes 2]
    python benchmarks/rotation_union_check.py --report CSV... [--refuse-above 3 2]

The report also reads the frames of ``unseen_family_check.py --rotation-widening`` (session 62: the nearly tied rule's
populations with heavy tails and other gap designs), whose populations that script draws.

SPEC.json as in `quadratic_variance_check.py` (a list of {"family", "settings", "ratio", "ks", "draws", "seed"});
the draws are those of `stationary_condition_check.py` for the same spec.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.estimators import GAP_MIN, ntps_estimate  # noqa: E402
from ntps_nb.core.rotation import rotation_interval  # noqa: E402
from ntps_nb.core.score import InterpolationWarning  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quadratic_variance_check import band, cells, draw_shards  # noqa: E402
from stationary_condition_check import with_cells  # noqa: E402
from stationary_flag_check import band as cell_bands  # noqa: E402

LEVEL = 0.90


def one_draw(args) -> pd.DataFrame:
    family, settings, ratio, ks, draw, seed, widening, widening_level = args
    ks = np.asarray(ks)
    with analysis_threads(1):
        truth, shards = draw_shards(family, settings, ratio, ks, draw, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            levels = {} if widening_level is None else {"widening_level": widening_level}
            frame = ntps_estimate(shards, ks, seed=draw, level=LEVEL, rotation_widening=widening, progress=False,
                                  **levels)
            reliable = frame["reliable"].astype(bool)
            if widening:        # the package's widening (since session 60): the interval before it is kept
                lower, upper = frame["lower"], frame["upper"]
                frame = frame.assign(lower=frame["lower_unwidened"], upper=frame["upper_unwidened"])
            else:               # session 60's first runs: rotation_interval's sets joined with the interval here
                lower, upper = frame["lower"].to_numpy(copy=True), frame["upper"].to_numpy(copy=True)
                if reliable.any():
                    joined = rotation_interval(shards, frame[reliable], level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
                    lower[reliable.to_numpy()] = joined["lower"].to_numpy()
                    upper[reliable.to_numpy()] = joined["upper"].to_numpy()
    return pd.DataFrame({
        "family": family, "settings": json.dumps(settings, sort_keys=True), "n_over_d": ratio, "seed": seed,
        "draw": draw, "k": ks, "truth": truth, "estimate": frame["estimate"], "lower": frame["lower"],
        "upper": frame["upper"], "lower_union": lower, "upper_union": upper, "reliable": reliable,
        "gap_ratio_U": frame["gap_ratio_U"], "gap_ratio_V": frame["gap_ratio_V"],
        "stationary_distance": frame["stationary_distance"]})


def refusal_tally(frame: pd.DataFrame, accepted: pd.Series, ceilings: list[float]) -> None:
    """Instead of widening, refuse: at each of ``ceilings``, the rows the flag accepts whose widened interval would be
    more than that many times as wide as the default's are read as not reliable, and the rest keep the default
    interval. Per ceiling: the share of the flag's rows refused and, over the cells of >= 10 kept rows, how many
    are significantly outside [0.85, 0.95], the pooled coverage and the extreme cells."""
    rows = []
    for ceiling in ceilings:
        kept = accepted & ~(frame["widening"] > ceiling)
        cells = cell_bands(frame, kept)
        share = cells["covered"] / cells["rows"]
        rows.append({"ceiling": ceiling, "flag's rows": int(accepted.sum()),
                     "refused": round(1 - int(kept.sum()) / int(accepted.sum()), 3), "cells": len(cells),
                     "below": int(cells["below"].sum()), "above": int(cells["above"].sum()),
                     "coverage": round(cells["covered"].sum() / cells["rows"].sum(), 3) if len(cells) else np.nan,
                     "min cell": round(share.min(), 3) if len(cells) else np.nan,
                     "max cell": round(share.max(), 3) if len(cells) else np.nan})
    print("\nrefusing instead of widening: the flag's rows whose widened interval would be more than 'ceiling' times "
          "the default's width are\nrefused, the rest keep the default interval (cells with >= 10 kept rows; "
          "'refused': share of the flag's rows)")
    print(pd.DataFrame(rows).to_string(index=False))


def from_unseen(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame of `unseen_family_check.py --rotation-widening` (heavy tails, offsets, other gap designs) in this
    script's columns: its population settings as ``settings`` (with ``tails`` / ``offset`` / the Markov family's
    ``memory`` where set), its interval (the package's widening) as ``lower_union`` / ``upper_union`` and the interval
    before it as ``lower`` / ``upper``."""
    if "lower_unwidened" not in frame or frame["lower_unwidened"].isna().all():
        raise SystemExit("an unseen_family_check.py frame needs its run's --rotation-widening (lower_unwidened)")

    def settings(row) -> str:
        out = {"d": int(row.task_d), "n_classes": int(row.task_n_classes), "gap": row.task_gap,
               "seed": int(row.task_seed)}
        out |= {} if pd.isna(row.task_tails) else {"tails": float(row.task_tails)}
        out |= {} if pd.isna(row.task_memory) else {"memory": float(row.task_memory)}
        return json.dumps(out | ({"offset": float(row.task_offset)} if row.task_offset else {}), sort_keys=True)

    return frame.assign(family=frame["task_family"], settings=[settings(r) for r in frame.itertuples()],
                        seed=frame["task_seed"], lower_union=frame["lower"], upper_union=frame["upper"],
                        lower=frame["lower_unwidened"], upper=frame["upper_unwidened"])


def report(paths: list[str], ceilings: list[float] | None = None) -> None:
    frames = [pd.read_csv(p, low_memory=False) for p in paths]
    frame = pd.concat([from_unseen(f) if "task_family" in f else f for f in frames], ignore_index=True)
    truth = frame["truth"]
    frame = with_cells(frame.assign(covered=(frame["lower"] <= truth) & (truth <= frame["upper"]))).assign(
        covered_union=(frame["lower_union"] <= truth) & (truth <= frame["upper_union"]),
        width=frame["upper"] - frame["lower"])
    frame["widening"] = (frame["upper_union"] - frame["lower_union"]) / frame["width"]
    by_cell = frame.groupby(["cell", "k"], sort=False)
    draws, any_accepted = by_cell.size(), by_cell["reliable"].any()
    accepted = frame[frame["reliable"].astype(bool)]
    rows = []
    for (cell, k), g in accepted.groupby(["cell", "k"], sort=False):
        n, x, y = len(g), int(g["covered"].sum()), int(g["covered_union"].sum())
        rows.append({"cell": cell, "k": k, "truth": round(g["truth"].iloc[0], 4),
                     "draws": int(draws[cell, k]), "accepted": n,
                     "default": f"{x}/{n} {x / n:.3f}{band(x, n)}", "p below": round(st.binom.cdf(x, n, 0.85), 4),
                     "|bias|/width": round(abs((g["estimate"] - g["truth"]).mean()) / g["width"].mean(), 3),
                     "joined": f"{y}/{n} {y / n:.3f}{band(y, n)}", "p above": round(st.binom.sf(y - 1, n, 0.95), 4),
                     "median widening": round(float(g["widening"].median()), 2),
                     "90% widening": round(float(g["widening"].quantile(0.9)), 2),
                     "widened rows": int((g["widening"] > 1 + 1e-9).sum())})
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 300)
    pd.set_option("display.max_colwidth", 80)
    print("the flag's rows (ntps_estimate's defaults); default: its interval; joined: widened over the selective "
          "rotation sets;\n'below' / 'above': exact one-sided binomial test against 0.85 / 0.95 at 2.5% (cells with "
          ">= 10 rows); p below: the default's p-value against 0.85, p above: the widened one's against 0.95;\n"
          "|bias|/width: the accepted rows' mean error over the default interval's mean width")
    if len(table):
        print(table.to_string(index=False))
    none = any_accepted.index[~any_accepted.astype(bool)]
    if len(none):
        print(f"\nno accepted row in {len(none)} cell(s): "
              + "; ".join(f"{cell} k={k} ({int(draws[cell, k])} draws)" for cell, k in none))
    print()
    if table.empty:
        print("the flag accepts no row of these frames")
        return
    big = table[table["accepted"] >= 10]
    populations = big["cell"].str.replace(r" N/d=\S+$", "", regex=True).nunique()
    for name in ("default", "joined"):
        print(f"{name}: {len(big)} cells of >= 10 rows ({populations} populations), "
              f"{int(big[name].str.endswith('below').sum())} significantly "
              f"below 0.85, {int(big[name].str.endswith('above').sum())} above 0.95"
              + (f"; largest |bias|/width {big['|bias|/width'].max():.3f}" if name == "default" and len(big) else ""))
    for part, mine in (("stationary", accepted[accepted["stationary"]]), ("interior", accepted[~accepted["stationary"]])):
        if len(mine):
            print(f"\n{part}: {len(mine)} rows, default covers {mine['covered'].mean():.3f}, joined "
                  f"{mine['covered_union'].mean():.3f}; widened rows {(mine['widening'] > 1 + 1e-9).mean():.3f}, "
                  f"more than twice as wide {(mine['widening'] > 2).mean():.3f}, widening median "
                  f"{mine['widening'].median():.2f}, 90% {mine['widening'].quantile(0.9):.2f}")
    if ceilings:
        refusal_tally(frame, frame["reliable"].astype(bool), ceilings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells")
    parser.add_argument("--out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--join-here", action="store_true",
                        help="join rotation_interval's sets with the interval of ntps_estimate(rotation_widening="
                             "False) in this script, as session 60's first runs did, instead of the package's widening")
    parser.add_argument("--widening-level", type=float, default=None,
                        help="the package's widening at this widening_level (default: ntps_estimate's, "
                             "WIDENING_LEVEL, 0.6 since session 64; the frames of sessions 60-62 were computed at "
                             "0.9)")
    parser.add_argument("--report", nargs="+")
    parser.add_argument("--refuse-above", nargs="+", type=float, metavar="CEILING",
                        help="with --report: also tally refusing, instead of widening, the flag's rows the widening "
                             "would make more than CEILING times as wide (session 61)")
    args = parser.parse_args()
    if args.cells:
        cells(args.cells, args.out, args.processes, worker=one_draw, extra=(not args.join_here, args.widening_level))
    if args.report:
        report(args.report, args.refuse_above)


if __name__ == "__main__":
    main()
