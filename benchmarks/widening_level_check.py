"""The widening's rotation sets at levels below the interval's: does one level keep item 4's band on both sides?

Since session 63 `ntps_estimate` widens each reliable row's interval over NTPS's range on the rotations of the pairs
at k that a test conditioned on the eigengap condition cannot reject; in session 63 at the interval's own level
(0.90). Where the flag seldom accepts a population's draws that mends an interval that covers 0.76 (to 0.95); where
it accepts 1-30% of them the widened interval covered 0.97-0.98, above item 4's band (docs/estimator.md, "The
widening as the default"). The widening is a union of two sets, each at level 0.90, so it is conservative by
construction wherever the interval alone already covers; a set at a lower level ``L`` widens less. This script draws
exactly the draws of `unseen_family_check.py` (the same seeding, so its frames' rows are these rows) and, on each
row the package widened, recomputes the widening with the rotation sets at each of ``--levels`` (the interval itself
stays at ``--interval-level``, 0.90 by default; recorded per row as ``interval_level``). The row at the package's
own level (`WIDENING_LEVEL`, recorded per row as ``widening_level``; 0.90 for frames written before the column,
session 64's) must equal the package's widened interval: the report counts the rows where it does not. Session 64
chose `WIDENING_LEVEL` = 0.6 with it (docs/estimator.md, "The widening's level"). Session 65 ran it at interval
levels 0.80 and 0.95, where ``--levels matched`` names the sets' level whose two-sided normal quantile is the same
fraction of the interval's as 0.6's is of 0.90's (`matched_level`).

    python benchmarks/widening_level_check.py --family lds --gaps moderate --seeds 470 474 --d 16 --classes 2 \
        --ratios 32 --ks 1 --draws 400 --processes 2 --out D/levels.csv.gz
    python benchmarks/widening_level_check.py --report D/levels.csv.gz [D/more.csv.gz ...]

The report gives, per level, the reliable rows pooled by their cell's acceptance rate (as `acceptance_coverage.py`)
and the cells of at least `MIN_ACCEPTED` reliable rows outside the band (`unseen_family_check.cells`); the band is
item 4's for the frames' interval level (`estimator_flag_report.band`: [0.85, 0.95] at 0.90, [0.70, 0.90] at 0.80,
[0.925, 0.975] at 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from acceptance_coverage import cell_table_of, pooled  # noqa: E402
from estimator_flag_report import band  # noqa: E402
from unseen_family_check import (CHECKED, KEPT, band_tally, cells, population, population_tasks,  # noqa: E402
                                 run_tasks)

from ntps_nb.core.estimators import GAP_MIN, ntps_estimate  # noqa: E402
from ntps_nb.core.rotation import WIDENING_LEVEL, _rotation_ranges, _widened, widened_rows  # noqa: E402
from ntps_nb.core.score import InterpolationWarning  # noqa: E402
from ntps_nb.core.simulate import sample_shards  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402

#: The levels of the rotation sets tried by default (0.90: the package's, the check of the recomputation).
LEVELS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
#: The interval's level (`ntps_estimate`'s default), which the rotation sets had until session 64.
INTERVAL_LEVEL = 0.90
#: The acceptance rate at or below which a cell's rows are the rarely accepted ones (`acceptance_coverage.py --rare`).
RARE = 0.01
#: How far the recomputed interval at L = 0.90 may lie from the package's (the same arithmetic: rounding only).
SAME_ATOL = 1e-12


#: Decimals a set level keeps in a frame's column names (levels not on the percent grid: `matched_level`'s).
LEVEL_DECIMALS = 6


def matched_level(interval_level: float, base_interval: float = INTERVAL_LEVEL,
                  base_sets: float = WIDENING_LEVEL) -> float:
    """The sets' level whose two-sided normal quantile is the fraction of ``interval_level``'s that ``base_sets``'
    is of ``base_interval``'s (0.6 at 0.90: 0.5117), rounded to `LEVEL_DECIMALS`: 0.488 at 0.80, 0.684 at 0.95. A
    candidate rule for the widening's level at other interval levels (session 65), not the package's."""
    z = scipy.stats.norm.ppf
    fraction = z((1 + base_sets) / 2) / z((1 + base_interval) / 2)
    return round(float(2 * scipy.stats.norm.cdf(fraction * z((1 + interval_level) / 2)) - 1), LEVEL_DECIMALS)


def column(level: float, side: str) -> str:
    """The frame's column of the interval widened with rotation sets at ``level`` (``side``: lower or upper): the
    percent for a level on the percent grid (``lower_at_60``), else the level (``lower_at_0.684068``)."""
    percent = level * 100
    if abs(percent - round(percent)) < 1e-9:
        return f"{side}_at_{round(percent):02d}"
    return f"{side}_at_{level:.{LEVEL_DECIMALS}f}"


def one_task(args) -> pd.DataFrame:
    family, tails, offset, d, C, gap, memory, seed, ratios, ks, (first, draws), shards, levels, interval_level = args
    model = population(family, d, C, gap, memory, seed, tails, offset)
    ks = np.asarray([k for k in ks if k <= d // 2], dtype=np.int64)
    truth = model.population_ntps(ks)
    tables = []
    for ratio in ratios:
        n_texts = max(int(round(ratio * model.d)), shards)
        for draw in range(first, first + draws):
            # `estimator_map`'s seeding of one model's draws (unseen_family_check.py maps one model at a time)
            rng = np.random.default_rng([int(seed), 0, int(round(ratio * 1000)), draw])
            sample = sample_shards(model, n_texts, shards, rng)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InterpolationWarning)
                    table = ntps_estimate(sample, ks, estimator="richardson", level=interval_level, seed=draw,
                                          interval="quadratic", rotation_widening=True, progress=False)
                failure = ""
            except (ValueError, np.linalg.LinAlgError) as error:
                failure = f"{type(error).__name__}: {error}"
                table = pd.DataFrame({"k": ks, "estimator": "richardson", "estimate": np.nan, "se": np.nan,
                                      "lower": np.nan, "upper": np.nan, "reliable": False})
            rows = widened_rows(table)
            if rows.any():
                base = table.assign(lower=table["lower_unwidened"], upper=table["upper_unwidened"])
            for level in levels:
                if rows.any():
                    ranges = _rotation_ranges(sample, base, level=level, gap_min=GAP_MIN, rtol=RANGE_RTOL,
                                              solved=None, kinds=("chosen",), rows=rows)
                    widened = _widened(base, ranges, kept="unwidened", rows=rows)
                    lower, upper = widened["lower"], widened["upper"]
                else:
                    lower, upper = table["lower"], table["upper"]
                table[column(level, "lower")], table[column(level, "upper")] = lower, upper
            table = table.assign(failure=failure, truth=truth, n_over_d=float(ratio), n_texts=n_texts, draw=draw,
                                 widened=rows, widening_level=WIDENING_LEVEL, interval_level=interval_level,
                                 **{f"task_{k}": v for k, v in model.settings.items()})
            tables.append(table)
    frame = pd.concat(tables, ignore_index=True)
    frame["covered"] = (frame["lower"] <= frame["truth"]) & (frame["truth"] <= frame["upper"])
    extra = (["widened", "widening_level", "interval_level"]
             + [column(level, side) for level in levels for side in ("lower", "upper")])
    return frame.reindex(columns=KEPT + extra)


def levels_asked(levels: list[str], interval_level: float) -> list[float]:
    """``--levels`` as numbers, ``matched`` read as `matched_level` at ``interval_level``, in (0, 1), once each."""
    out = [matched_level(interval_level) if level == "matched" else float(level) for level in levels]
    if not all(0.0 < level < 1.0 for level in out):
        raise SystemExit(f"--levels must lie in (0, 1) (or be 'matched'), got {levels}")
    return sorted(set(out))


def run(args) -> None:
    if not 0.0 < args.interval_level < 1.0:
        raise SystemExit(f"--interval-level must lie in (0, 1), got {args.interval_level}")
    tasks = population_tasks(args, levels_asked(args.levels, args.interval_level), args.interval_level)
    frame, seconds = run_tasks(one_task, tasks, args.processes, args.out)
    print(f"{len(tasks)} tasks, {len(frame)} rows, {int(frame['widened'].sum())} widened, {seconds:.0f} s on "
          f"{args.processes} processes")


def levels_of(frame: pd.DataFrame) -> list[float]:
    """The levels a frame of this script holds, from its column names."""
    suffixes = [c.rsplit("_", 1)[1] for c in frame.columns if c.startswith("lower_at_")]
    return sorted(float(s) if "." in s else int(s) / 100 for s in suffixes)


def at_level(frame: pd.DataFrame, level: float) -> pd.DataFrame:
    """``frame`` in `unseen_family_check.py --rotation-widening`'s columns, its widened interval the one at ``level``."""
    out = frame.assign(lower=frame[column(level, "lower")], upper=frame[column(level, "upper")])
    return out.assign(covered=(out["lower"] <= out["truth"]) & (out["truth"] <= out["upper"]))


def report(paths: list[str], bins: list[float], min_draws: int) -> None:
    frame = pd.concat([pd.read_csv(p, low_memory=False).assign(source=Path(p).name) for p in paths],
                      ignore_index=True)
    frame = frame[np.isfinite(frame["truth"])]
    levels = levels_of(frame)
    # frames written before the column (session 64's) had their interval at 0.90
    nominals = set(frame["interval_level"].fillna(INTERVAL_LEVEL)) if "interval_level" in frame else {INTERVAL_LEVEL}
    if len(nominals) != 1:
        raise SystemExit(f"these frames' intervals are at several levels, {sorted(nominals)}: report them apart")
    nominal = nominals.pop()
    low, high = band(nominal)
    pd.set_option("display.width", 250)
    print(f"{len(frame)} rows from {len(paths)} frame(s); reliable {int(frame['reliable'].sum())}, widened "
          f"{int(frame['widened'].sum())}; levels {levels}; the interval at {nominal:g}, item 4's band there "
          f"[{low:g}, {high:g}]")
    # the package's own level per row (frames written before the column: its sets were at the interval's level)
    package = (frame["widening_level"].fillna(INTERVAL_LEVEL) if "widening_level" in frame
               else pd.Series(INTERVAL_LEVEL, index=frame.index))
    for level in sorted(set(package) & set(levels)):
        rows = package == level
        apart = np.fmax(np.abs(frame.loc[rows, column(level, "lower")] - frame.loc[rows, "lower"]),
                        np.abs(frame.loc[rows, column(level, "upper")] - frame.loc[rows, "upper"]))
        print(f"rows of the package's widening_level {level} whose interval recomputed at it lies more than "
              f"{SAME_ATOL} from the package's: {int((apart > SAME_ATOL).sum())} of {int(rows.sum())} (NaN on both "
              f"sides: {int(apart.isna().sum())})")
    for level in sorted(set(package) - set(levels)):
        print(f"{int((package == level).sum())} rows of the package's widening_level {level}, not among the levels: "
              "not compared")
    for level in levels:
        framed = at_level(frame, level)
        table, _ = cell_table_of([(name, part) for name, part in framed.groupby("source")], min_draws)
        some = table[table["accepted"] > 0]
        width = (framed["upper"] - framed["lower"]) / (framed["upper_unwidened"] - framed["lower_unwidened"])
        moved = framed["widened"].astype(bool)
        print(f"\n=== rotation sets at L = {level}: the widened rows' width over the unwidened one, median "
              f"{width[moved].median():.3f}, more than twice {float((width[moved] > 2).mean()):.3f}")
        print(f"  by acceptance rate (default: the interval before the widening), and every cell above {RARE:.0%}:")
        above = some[some["rate"] > RARE].assign(all=f"above {RARE:.0%}")
        print(pd.concat([pooled(some, pd.cut(some["rate"], bins), nominal), pooled(above, "all", nominal)])
              .to_string())
        rare = some[some["rate"] <= RARE].assign(d=some["settings"].map(lambda text: json.loads(text)["d"]))
        if len(rare):
            print(f"  cells accepted at most {RARE:.0%} of the time, by d and pooled (default: the interval before the "
                  "widening):")
            print(pd.concat([pooled(rare, "d", nominal), pooled(rare.assign(d="all"), "d", nominal)]).to_string())
        counted = cells(framed.reindex(columns=KEPT), nominal).query("counted")
        print(f"  cells of at least 10 reliable rows (unseen_family_check.cells): {len(counted)}")
        band_tally(counted, nominal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="*", default=None, help="report these frames instead of running")
    parser.add_argument("--bins", type=float, nargs="+", default=[0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--min-draws", type=int, default=200, help="a cell's draws for its rate to be binned")
    parser.add_argument("--family", default="lds", choices=CHECKED)
    parser.add_argument("--tails", type=float, default=None, help="heavy_tailed's degrees of freedom (> 2)")
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--d", type=int, nargs="+", default=[16])
    parser.add_argument("--classes", type=int, nargs="+", default=[2])
    parser.add_argument("--gaps", nargs="+", default=["moderate"])
    parser.add_argument("--memory", type=float, nargs="+", default=[0.7], help="the Markov family's memory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[470])
    parser.add_argument("--ratios", type=float, nargs="+", default=[32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=4, help="tasks per population (ranges of its draws)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--levels", nargs="+", default=[str(level) for level in LEVELS],
                        help="the rotation sets' levels; 'matched': matched_level at --interval-level")
    parser.add_argument("--interval-level", type=float, default=INTERVAL_LEVEL,
                        help="ntps_estimate's level, of the interval and the flag's rotation condition")
    parser.add_argument("--out", default="widening_levels.csv.gz")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report, args.bins, args.min_draws)
    else:
        run(args)


if __name__ == "__main__":
    main()
