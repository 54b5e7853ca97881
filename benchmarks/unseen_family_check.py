"""The default estimator, interval and flag on generator families their calibration never saw.

Every threshold and construction of `ntps_estimate`'s default row (richardson, the quadratic interval, the
reliability flag) was chosen on the Gaussian families of `ntps_nb.core.simulate` (factor, LDS, reflection),
all with equal class priors. Three departures are checked here: `markov_model` (``--family markov``: discrete
tokens from a class-dependent Markov chain read through embeddings, imbalanced classes, eigengaps not planted),
`heavy_tailed` (``--tails DF``: any family with each text scaled by its own random factor, Student t texts,
the way a few texts with outsized activations dominate real hidden states) and the factor and LDS
families' ``offset`` (``--offset``: a constant vector that dominates the uncentred moments, a massive
activation). Nothing in this script chooses anything: it draws samples of fresh populations and reports item 4
of issue 21 for the defaults as they are, in the terms of the rest of docs/estimator.md: per cell (population x
N/d x k) with at least `MIN_ACCEPTED` reliable rows, the reliable rows' coverage with exact one-sided binomial
tests against 0.85 and 0.95 (`exact_band_tests`, 2.5% each), and whether their |bias| reaches a quarter of their
mean width by more than `BIAS_Z` Monte Carlo SEs; beside it every row's coverage, flag ignored, and the share
of rows the flag accepts; the reliable rows of cells too small to test, pooled (`uncounted`), with those that miss
listed; how many rows the widening moved (`widening_moves`); and the same with `ntps_estimate`'s stationary widening,
which the rows are drawn without and the report applies from their columns (`stationary_widened`), so a frame is read
both ways on the same draws.

    python benchmarks/unseen_family_check.py --d 16 --seeds 500 501 --draws 200 --processes 16 --out D/markov_d16.csv.gz
    python benchmarks/unseen_family_check.py --family lds --tails 3 --d 16 --out D/lds_t3_d16.csv.gz
    python benchmarks/unseen_family_check.py --report D/markov_d16.csv.gz
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimator_flag_report import MIN_ACCEPTED, NOMINAL, band, exact_band_tests  # noqa: E402
from estimator_map import draw_ranges  # noqa: E402
from rotation_flag_report import BIAS_Z  # noqa: E402

from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX, stationary_widening  # noqa: E402
from ntps_nb.core.simulate import FAMILIES, estimator_map, heavy_tailed  # noqa: E402

#: The families this script draws from (reflection is the map's own stationary case, not a new kind).
CHECKED = ("markov", "factor", "lds")

#: The columns kept per draw (the frame of `estimator_map` has every column of `ntps_estimate`).
KEPT = ["task_family", "task_tails", "task_offset", "task_d", "task_n_classes", "task_gap", "task_memory",
        "task_seed", "n_over_d", "n_texts", "draw", "k", "truth", "estimate", "se", "lower", "upper", "df",
        "reliable", "covered", "subspace_noise", "gap_ratio", "failure", "lower_unwidened", "upper_unwidened",
        "stationary_distance", "stationary_lower", "stationary_upper"]
#: The design columns of a cell (one population: the seed draws its chains and embeddings).
POPULATION = ["task_family", "task_tails", "task_offset", "task_d", "task_n_classes", "task_gap", "task_memory",
              "task_seed"]
#: The families with a massive activation option (``offset``).
OFFSET = ("factor", "lds")
#: A truth this close to 0 or 1 is at a stationary point of NTPS (docs/estimator.md): reported apart.
EDGE = 0.005
#: How far beyond the interval before it a widened end must lie to count as moved (the frames keep 7 digits).
MOVED_ATOL = 1e-6


def population(family: str, d: int, C: int, gap: str, memory: float, seed: int, tails: float | None,
               offset: float = 0.0):
    """The population of one design: ``memory`` is the Markov family's, ``offset`` the factor and LDS families'
    (the others take neither); ``tails`` the Student t degrees of freedom of `heavy_tailed` (None: the family as
    it is)."""
    settings = {"memory": memory} if family == "markov" else {"offset": offset} if family in OFFSET else {}
    model = FAMILIES[family](d=d, n_classes=C, n_tokens=8, gap=gap, seed=seed, **settings)
    return model if tails is None else heavy_tailed(model, tails)


def one_task(args) -> pd.DataFrame:
    family, tails, offset, d, C, gap, memory, seed, ratios, ks, (first, draws), shards, weights, widening, level = args
    model = population(family, d, C, gap, memory, seed, tails, offset)
    frame = estimator_map([model], ratios, [k for k in ks if k <= d // 2], estimators=["richardson"],
                          n_draws=draws, n_shards=shards, seed=seed, first_draw=first, interval="quadratic",
                          shard_weights=weights, rotation_widening=widening, widening_level=level,
                          stationary_widening=False)  # the report applies it from the rows' columns
    return frame.reindex(columns=KEPT)  # a family without memory, or no tails: those columns empty


def population_tasks(args, *extra) -> list[tuple]:
    """One task per (population design, range of draws) of the command line ``args`` (family, tails, offset, d, C,
    gap, memory, seed, ratios, ks, the range (first draw, draws), shards), with ``extra`` after it."""
    memories = args.memory if args.family == "markov" else [None]
    return [(args.family, args.tails, args.offset, d, C, gap, memory, seed, args.ratios, args.ks, span, args.shards,
             *extra)
            for d, C, gap, memory, seed in itertools.product(args.d, args.classes, args.gaps, memories, args.seeds)
            if C <= d // 2
            for first, n in draw_ranges(args.draws, args.chunks) for span in [(args.first_draw + first, n)]]


def run_tasks(worker, tasks: list[tuple], processes: int, out: str) -> tuple[pd.DataFrame, float]:
    """``worker`` on each task in ``processes`` processes, the frames joined and written to ``out``; (the frame,
    seconds taken)."""
    start = time.time()
    with ProcessPoolExecutor(processes) as pool:
        frame = pd.concat(pool.map(worker, tasks), ignore_index=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame, time.time() - start


def run(args) -> None:
    if args.offset and args.family == "markov":
        raise SystemExit("--offset is the factor and LDS families' (the Markov family has none)")
    if args.shard_weights is not None and len(args.shard_weights) != args.shards:
        raise SystemExit(f"--shard-weights needs {args.shards} weights (--shards), got {len(args.shard_weights)}")
    tasks = population_tasks(args, args.shard_weights, args.rotation_widening, args.widening_level)
    frame, seconds = run_tasks(one_task, tasks, args.processes, args.out)
    print(f"{len(tasks)} tasks, {len(frame)} rows, {seconds:.0f} s on {args.processes} processes")


def cells(frame: pd.DataFrame, nominal: float = NOMINAL) -> pd.DataFrame:
    """Per (population, N/d, k): truth, rows, every row's coverage, the flag's acceptance, and the reliable
    rows' count, coverage, bias, SD, mean width and band / bias tests (the `band` of intervals at level
    ``nominal``)."""
    f = frame.assign(width=frame["upper"] - frame["lower"], err=frame["estimate"] - frame["truth"])
    key = POPULATION + ["n_over_d", "k"]
    every = f.groupby(key, dropna=False).agg(truth=("truth", "first"), rows=("covered", "size"),
                                             covered_all=("covered", "mean"), accepted=("reliable", "mean"))
    kept = f[f["reliable"].astype(bool)].groupby(key, dropna=False).agg(
        sum=("covered", "sum"), size=("covered", "size"), bias=("err", "mean"), sd=("err", "std"),
        width=("width", "mean"))
    table = every.join(kept, how="left").reset_index()
    table["size"] = table["size"].fillna(0).astype(int)
    table["coverage"] = table["sum"] / table["size"].where(table["size"] > 0)
    counted = table["size"] >= MIN_ACCEPTED
    below, above = exact_band_tests(table.loc[counted, "sum"].astype(int), table.loc[counted, "size"], nominal)
    table["below"], table["above"] = False, False
    table.loc[counted, "below"], table.loc[counted, "above"] = below, above
    z = (table["bias"].abs() - table["width"] / 4) / (table["sd"] / np.sqrt(table["size"]))
    table["biased"] = counted & (z > BIAS_Z)
    table["counted"] = counted
    table["edge"] = (table["truth"] < EDGE) | (table["truth"] > 1 - EDGE)
    return table


#: The report's short names of the design columns.
SHORT = {"task_family": "family", "task_tails": "tails", "task_offset": "offset", "task_d": "d",
         "task_n_classes": "C", "task_gap": "gap", "task_memory": "memory", "task_seed": "seed", "size": "reliable"}


def failures(frame: pd.DataFrame) -> pd.Series:
    """The exception each row's draw raised (`ntps_nb.core.simulate.estimator_map`'s ``failure``), "" where it
    raised none: an empty message reads back from a file as NaN, and older frames have no column."""
    if "failure" not in frame:
        return pd.Series("", index=frame.index, dtype=object)
    return frame["failure"].astype(object).where(frame["failure"].notna(), "")


def print_failures(frame: pd.DataFrame, what: str) -> None:
    """How many rows raised, with ``what`` becomes of them, and their count per message."""
    failed = failures(frame)
    print(f"Rows on which ntps_estimate raised ({what}): {int((failed != '').sum())}")
    for message, count in failed[failed != ""].value_counts().items():
        print(f"  {count}: {message}")


def band_tally(counted: pd.DataFrame, nominal: float = NOMINAL) -> None:
    """Interior and edge cells of ``cells``' counted rows: reliable rows, pooled coverage, band and bias tests
    (``nominal``: the intervals' level, whose `band` ``cells`` tested)."""
    low, high = band(nominal)
    for name, part in (("interior", counted[~counted["edge"]]), ("edge", counted[counted["edge"]])):
        if len(part):
            pooled = part["sum"].sum() / part["size"].sum()
            print(f"  {name}: {len(part)} cells, {int(part['size'].sum())} reliable rows covering {pooled:.3f} pooled; "
                  f"significantly below {low:g}: {int(part['below'].sum())}, above {high:g}: "
                  f"{int(part['above'].sum())}; "
                  f"|bias| a quarter of the width (z > {BIAS_Z}): {int(part['biased'].sum())}")


def small_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The cells of ``cells``' table with some reliable rows but fewer than `MIN_ACCEPTED`: no cell test reads them."""
    return table[(table["size"] > 0) & ~table["counted"]]


def uncounted(table: pd.DataFrame, nominal: float = NOMINAL) -> str:
    """The reliable rows of ``cells``' `small_cells`, interior and edge apart (as `band_tally`): rows, cells, rows
    covered, and the exact one-sided p of that count below the `band`'s lower end."""
    few = small_cells(table)
    low = band(nominal)[0]
    parts = []
    for name, part in (("interior", few[~few["edge"]]), ("edge", few[few["edge"]])):
        rows, covered = int(part["size"].sum()), int(part["sum"].sum())
        p = f" (p = {scipy.stats.binom.cdf(covered, rows, low):.3g} below {low:g})" if rows else ""
        parts.append(f"{name} {rows} in {len(part)} cells, {covered} covered{p}")
    return f"reliable rows in cells of fewer than {MIN_ACCEPTED}: " + "; ".join(parts)


def widening_moves(frame: pd.DataFrame) -> str:
    """How many reliable rows `ntps_estimate`'s rotation widening moved (either end beyond the interval before it by
    more than `MOVED_ATOL`), and the median and largest ratio of their width to the width before."""
    kept = frame[frame["reliable"].astype(bool) & frame["lower_unwidened"].notna()]
    moved = ((kept["lower"] < kept["lower_unwidened"] - MOVED_ATOL)
             | (kept["upper"] > kept["upper_unwidened"] + MOVED_ATOL))
    ratio = ((kept["upper"] - kept["lower"]) / (kept["upper_unwidened"] - kept["lower_unwidened"]))[moved]
    out = f"the widening moved {int(moved.sum())} of {len(kept)} reliable rows"
    if len(ratio):
        out += f" (width / width before: median {ratio.median():.3f}, largest {ratio.max():.3f})"
    return out


def stationary_widened(frame: pd.DataFrame) -> pd.DataFrame | None:
    """``frame`` with `ntps_estimate`'s stationary widening applied to its reliable rows from their stationary_lower /
    stationary_upper (`ntps_nb.core.estimators.stationary_widening`, the function ntps_estimate calls; the frames are
    drawn without it), ``covered`` recomputed and ``stationary_moved`` where an end moved by more than `MOVED_ATOL`;
    None for frames written before those columns."""
    if "stationary_lower" not in frame or not frame["stationary_lower"].notna().any():
        return None
    out = stationary_widening(frame)
    out["stationary_moved"] = ((out["lower"] < frame["lower"] - MOVED_ATOL)
                               | (out["upper"] > frame["upper"] + MOVED_ATOL))
    out["covered"] = (out["lower"] <= out["truth"]) & (out["truth"] <= out["upper"])
    return out


def stationary_part(frame: pd.DataFrame, table: pd.DataFrame) -> None:
    """The report's lines on the stationary widening: the counted cells' tally with it, the rows it moves, the small
    cells' rows, and every counted cell whose coverage it changes (the widening moves intervals, not the flag, so a
    cell is counted in both versions or in neither)."""
    widened = stationary_widened(frame)
    if widened is None:
        return
    after = cells(widened)
    print("  the same rows with ntps_estimate's stationary_widening (applied from stationary_lower / "
          "stationary_upper):")
    band_tally(after.query("counted"))
    kept = widened[widened["reliable"].astype(bool)]
    moved = kept["stationary_moved"]
    width, before = kept["upper"] - kept["lower"], frame.loc[kept.index, "upper"] - frame.loc[kept.index, "lower"]
    ratio = width / before
    print(f"  the stationary widening moved {int(moved.sum())} of {len(kept)} reliable rows"
          + (f" (width / width before: median {ratio[moved].median():.3f}, largest {ratio[moved].max():.3f}); "
             f"mean width of the reliable rows {width.mean():.4g} against {before.mean():.4g}" if moved.any() else ""))
    print(f"  with it: {uncounted(after)}")
    key = POPULATION + ["n_over_d", "k"]
    both = table.merge(after, on=key, suffixes=("", "_stationary"))
    changed = both[both["counted"] & (both["sum"] != both["sum_stationary"])]
    if len(changed):
        print("  counted cells whose reliable rows' coverage it changes (coverage, band tests and bias test with it):")
        columns = key + ["truth", "size", "coverage", "coverage_stationary", "width", "width_stationary",
                         "below_stationary", "above_stationary", "biased_stationary"]
        print(changed[columns].rename(columns=SHORT).round(3).to_string(index=False))


def report(paths: list[str]) -> None:
    frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    frame = frame[np.isfinite(frame["truth"])].reindex(columns=KEPT)
    offsettable = frame["task_family"].isin(["factor", "lds"])  # frames written before --offset had none: 0
    frame.loc[offsettable, "task_offset"] = frame.loc[offsettable, "task_offset"].fillna(0.0)
    table = cells(frame)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 500)
    print(f"{len(frame)} rows in {len(table)} cells; reliable rows {int(frame['reliable'].sum())}")
    print_failures(frame, "counted as not covered, never reliable")
    print("\nThe flag's acceptance and every row's coverage (flag ignored), by population kind and N/d; the shares of "
          f"rows meeting the flag's noise (subspace_noise <= {NOISE_MAX}) and eigengap (gap_ratio >= {GAP_MIN}) "
          "conditions, and those statistics' medians:")
    conditions = frame.assign(noise_ok=frame["subspace_noise"] <= NOISE_MAX, gap_ok=frame["gap_ratio"] >= GAP_MIN)
    by_size = conditions.groupby(["task_family", "task_tails", "task_offset", "task_d", "n_over_d"], dropna=False)
    print(by_size.agg(rows=("covered", "size"), accepted=("reliable", "mean"), covered_all=("covered", "mean"),
                      noise_ok=("noise_ok", "mean"), gap_ok=("gap_ok", "mean"), noise=("subspace_noise", "median"),
                      gap_ratio=("gap_ratio", "median"))
          .round(3).rename_axis(index=[SHORT.get(n, n) for n in by_size.keys]).to_string())
    counted = table[table["counted"]]
    print(f"\nCells with at least {MIN_ACCEPTED} reliable rows: {len(counted)} ({int(counted['edge'].sum())} with "
          f"truth within {EDGE} of 0 or 1)")
    band_tally(counted)
    widened = frame["lower_unwidened"].notna()
    if widened.any():   # run with --rotation-widening: the same rows with the interval before the widening
        before = frame.assign(lower=frame["lower_unwidened"].where(widened, frame["lower"]),
                              upper=frame["upper_unwidened"].where(widened, frame["upper"]))
        before["covered"] = (before["lower"] <= before["truth"]) & (before["truth"] <= before["upper"])
        before_table = cells(before)
        print("  the same rows with the interval before ntps_estimate's rotation_widening:")
        band_tally(before_table.query("counted"))
        print(f"  {widening_moves(frame)}")
    print(f"  {uncounted(table)}")
    if widened.any():
        print(f"  before the widening: {uncounted(before_table)}")
    stationary_part(frame, table)
    kinds = counted.assign(point_below=counted["coverage"] < 0.85, point_above=counted["coverage"] > 0.95)
    kinds = kinds.groupby(["task_family", "task_tails", "task_offset", "task_d", "edge"], dropna=False).agg(
        cells=("size", "size"), reliable=("size", "sum"), covered=("sum", "sum"), below=("below", "sum"),
        above=("above", "sum"), point_below=("point_below", "sum"), point_above=("point_above", "sum"),
        biased=("biased", "sum"))
    kinds.insert(2, "coverage", kinds.pop("covered") / kinds["reliable"])
    print(f"\nBy population kind (edge: truth within {EDGE} of 0 or 1), cells with reliable rows:")
    print(kinds.round(3).rename_axis(index=[SHORT.get(n, n) for n in kinds.index.names]).to_string())
    columns = POPULATION + ["n_over_d", "k", "truth", "rows", "covered_all", "accepted", "size", "coverage", "bias",
                            "width", "below", "above", "biased"]
    print("\nEvery cell with reliable rows:")
    print(counted[columns].rename(columns=SHORT).round(3).to_string(index=False))
    few = small_cells(table)
    if len(few):
        key = POPULATION + ["n_over_d", "k"]
        missed = frame[frame["reliable"].astype(bool) & ~frame["covered"].astype(bool)].merge(
            few[key + ["accepted", "edge"]], on=key)
        print(f"\nThe reliable rows of cells of fewer than {MIN_ACCEPTED} that do not cover (accepted: their cell's "
              "share of rows the flag accepts):")
        print(missed[key + ["accepted", "edge", "truth", "estimate", "lower", "upper", "lower_unwidened",
                            "upper_unwidened"]].rename(columns=SHORT).round(3).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="*", default=None, help="report these per-draw frames instead of running")
    parser.add_argument("--family", default="markov", choices=CHECKED)
    parser.add_argument("--tails", type=float, default=None, help="heavy_tailed's degrees of freedom (> 2)")
    parser.add_argument("--offset", type=float, default=0.0,
                        help="factor / LDS: length of a constant vector added to every state (input)")
    parser.add_argument("--d", type=int, nargs="+", default=[16])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6, 20])
    parser.add_argument("--gaps", nargs="+", default=["separated", "moderate", "tied"])
    parser.add_argument("--memory", type=float, nargs="+", default=[0.7], help="the Markov family's memory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[500], help="population seeds (and of their draws)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 32, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--first-draw", type=int, default=0, help="draws first-draw .. first-draw + draws - 1")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--shard-weights", type=float, nargs="+", default=None,
                        help="relative shard sizes, one per shard (default: equal shards)")
    parser.add_argument("--chunks", type=int, default=4, help="tasks per population (ranges of its draws)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="unseen_family.csv.gz")
    parser.add_argument("--rotation-widening", action="store_true",
                        help="ntps_estimate(rotation_widening=True), its default since session 63; the report then "
                             "compares the interval before it. Without it the rows are ntps_estimate(rotation_widening="
                             "False)'s, as the frames of sessions 35-59 were computed")
    parser.add_argument("--widening-level", type=float, default=None,
                        help="ntps_estimate's widening_level (default: its own, WIDENING_LEVEL, 0.6 since session "
                             "64; the frames of sessions 62-63 were computed at 0.9)")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
