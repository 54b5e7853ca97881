r"""The quadratic interval with and without its Satterthwaite degrees of freedom (issue 21, item 4;
docs/estimator.md, session 31).

The quadratic interval's variance J - (jackknife - variance) T-hat is a difference of two noisy
estimates (`ntps_nb.core.quadratic`); where the excess is a large share of J, the difference is
noisier than a Student t on S - 1 degrees of freedom allows for. Since session 31 the interval has
the Satterthwaite degrees of freedom of the difference (`satterthwaite_df`, T-hat's variance from a
delete-one-shard jackknife over the same interactions). This check draws from the package's
generators at d = 16, N/d = 32 and compares, per cell (design x k):
  - "default": the interval and flag `ntps_estimate` computes now;
  - "before": session 30's, the Student t on S - 1 degrees of freedom on the same SE, its flag
    recomputed from the same columns (noise, eigengaps, [0, 1], and the rotation condition's Fieller
    range inside that interval);
  - "jackknife-t on before's rows": the plain jackknife-t interval on the rows "before" keeps;
and over the rows each flag keeps, coverage by the row's estimated quadratic share. Cells with >= 10
rows are tested against [0.85, 0.95] (exact one-sided binomial tests at 2.5%).

Without --grid: five d = 16 cells (interior LDS and reflection cells, an edge cell, a stationary cell
inside (0, 1)); with --grid the d = 16 map's designs (factor and LDS, C = 2 / 6 / 20, three eigengap
regimes, k = 1, 2, 4, 8; the reflection family at its default angle and at 0).

    python benchmarks/quadratic_df_check.py --draws 400 --seed 201 --processes 2 \
        --out benchmarks/results/estimator_map/quadratic_map/df_check
    python benchmarks/quadratic_df_check.py --grid --draws 200 --seed 202 --processes 2 \
        --out benchmarks/results/estimator_map/quadratic_map/df_check
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimator_flag_report import MIN_ACCEPTED, exact_band_tests  # noqa: E402
from quadratic_map_report import EDGE, SHARE_BINS, quadratic_share, session30_view  # noqa: E402

from ntps_nb.core.estimators import ntps_estimate  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, reflection_model, sample_shards  # noqa: E402

SHARDS = 10
RATIO = 32
LEVEL = 0.90
#: The columns of `ntps_estimate` each draw keeps.
COLUMNS = ["k", "estimate", "se", "lower", "upper", "df", "reliable", "se_jackknife", "quadratic_excess",
           "subspace_noise", "gap_ratio", "rotation_lower", "rotation_upper"]


def cells(seed: int) -> dict:
    """d = 16 designs at N/d = 32: interior cells (LDS, reflection at its default angle), an edge cell
    (LDS C = 2 tied, truth near 1 at k = 2) and a stationary cell inside (0, 1) (reflection at angle 0)."""
    return {"lds C=2 separated": (partial(lds_model, d=16, n_classes=2, gap="separated", seed=seed), [1, 2]),
            "lds C=2 moderate": (partial(lds_model, d=16, n_classes=2, gap="moderate", seed=seed), [1, 2]),
            "lds C=2 tied": (partial(lds_model, d=16, n_classes=2, gap="tied", seed=seed), [1, 2]),
            "reflection C=3": (partial(reflection_model, d=16, n_classes=3, gap="separated", seed=seed), [1]),
            "reflection C=3 angle 0": (partial(reflection_model, d=16, n_classes=3, gap="separated", angle=0.0,
                                               seed=seed), [1, 2])}


def grid(seed: int) -> dict:
    """The d = 16 map's designs at N/d = 32 (k = 1, 2, 4, 8) and the reflection family's (model factories)."""
    out = {}
    for family, make in (("factor", factor_model), ("lds", lds_model)):
        for C in (2, 6, 20):
            for gap in ("separated", "moderate", "tied"):
                out[f"{family} C={C} {gap}"] = (partial(make, d=16, n_classes=C, gap=gap, seed=seed), [1, 2, 4, 8])
    for C in (3, 6):
        out[f"reflection C={C}"] = (partial(reflection_model, d=16, n_classes=C, gap="separated", seed=seed), [1, 2])
        out[f"reflection C={C} angle 0"] = (partial(reflection_model, d=16, n_classes=C, gap="separated", angle=0.0,
                                                    seed=seed), [1, 2])
    return out


def draws(name: str, model, ks: list[int], n_draws: int, seed: int) -> pd.DataFrame:
    ks = np.asarray(ks)
    truth = model.population_ntps(ks)
    rows = []
    for draw in range(n_draws):
        rng = np.random.default_rng([seed, RATIO, draw])
        shards = sample_shards(model, RATIO * model.d, SHARDS, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = ntps_estimate(shards, ks, seed=draw)  # the default: richardson, quadratic interval
        rows.append(frame[COLUMNS].assign(truth=truth, draw=draw, cell=name))
    return pd.concat(rows, ignore_index=True)


def intervals(f: pd.DataFrame) -> pd.DataFrame:
    """The default (Satterthwaite) interval and flag as computed; session 30's (Student t on S - 1) and
    its flag recomputed from the same columns (`quadratic_map_report.session30_view`); the jackknife-t
    interval; the estimated quadratic share (`quadratic_map_report.quadratic_share`)."""
    before, before_flag = session30_view(f, SHARDS, LEVEL)
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, SHARDS - 1)
    return f.assign(share=quadratic_share(f, SHARDS), before_flag=before_flag,
                    default_flag=f["reliable"].astype(bool), before=before["covered"],
                    default=(f["lower"] <= f["truth"]) & (f["truth"] <= f["upper"]),
                    jackknife_t=(f["estimate"] - f["truth"]).abs() <= t * f["se_jackknife"])


def _run(task: tuple) -> str:
    name, make, ks, n_draws, seed, path = task
    if not path.exists():  # one file per cell: a run cut short keeps its finished cells
        frame = draws(name, make(), ks, n_draws, seed)
        unfinished = path.with_name(path.name + ".partial")
        frame.to_csv(unfinished, index=False, compression="gzip")
        unfinished.replace(path)
    return name


#: (name, flag column, coverage column) of the intervals compared.
INTERVALS = [("default", "default_flag", "default"), ("before", "before_flag", "before"),
             ("jackknife-t on before's rows", "before_flag", "jackknife_t")]


def with_part(f: pd.DataFrame) -> pd.DataFrame:
    stationary = (np.minimum(f["truth"], 1 - f["truth"]) <= EDGE) | f["cell"].str.endswith("angle 0")
    return f.assign(part=np.where(stationary, "stationary", "interior"))


def band_table(f: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per interval and part: cells of >= MIN_ACCEPTED kept rows, significantly below 0.85 / above
    0.95, pooled coverage; and the cells outside the band."""
    rows, outside = [], []
    for name, flag, covered in INTERVALS:
        cells = f[f[flag]].groupby(["cell", "k", "part"])[covered].agg(["sum", "size"]).reset_index()
        cells = cells[cells["size"] >= MIN_ACCEPTED]
        below, above = exact_band_tests(cells["sum"], cells["size"])
        cells = cells.assign(below=below, above=above)
        for part, sub in [("all", cells)] + list(cells.groupby("part")):
            rows.append({"interval": name, "part": part, "cells": len(sub), "below 0.85": int(sub["below"].sum()),
                         "above 0.95": int(sub["above"].sum()), "rows": int(sub["size"].sum()),
                         "coverage (pooled)": round(sub["sum"].sum() / sub["size"].sum(), 3)})
        bad = cells[cells["below"] | cells["above"]]
        outside += [{"interval": name, "cell": c["cell"], "k": c["k"], "covered": f"{c['sum']}/{c['size']}",
                     "band": "below" if c["below"] else "above"} for _, c in bad.iterrows()]
    return pd.DataFrame(rows), pd.DataFrame(outside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--seed", type=int, default=201)
    parser.add_argument("--grid", action="store_true", help="the d = 16 map's designs instead of five cells")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    designs = grid(args.seed) if args.grid else cells(args.seed)
    prefix = "grid_" if args.grid else ""
    tasks = [(name, make, ks, args.draws, args.seed,
              args.out / f"{prefix}{name.replace(' ', '_').replace('=', '')}_seed{args.seed}.csv.gz")
             for name, (make, ks) in designs.items()]
    with Pool(args.processes) as pool:
        for done in pool.imap_unordered(_run, tasks):
            print(f"  {done}", file=sys.stderr)
    f = with_part(intervals(pd.concat([pd.read_csv(task[-1]) for task in tasks], ignore_index=True)))
    pd.set_option("display.width", 200)
    print(f"{args.draws} draws a cell, d = 16, N/d = {RATIO}, {SHARDS} shards, seed {args.seed}; coverage at nominal "
          f"{LEVEL}; each interval on the rows its flag keeps\n")
    per_cell = []
    for name, flag, covered in INTERVALS:
        kept = f[f[flag]]
        per_cell.append(kept.groupby(["cell", "k"]).agg(**{
            f"rows ({name})": (covered, "size"), name: (covered, "mean")}))
    table = pd.concat(per_cell, axis=1).join(f.groupby(["cell", "k"]).agg(
        truth=("truth", "first"), median_df=("df", "median")))
    print(table.round(3).to_string())
    print("\nby the row's estimated quadratic share (the part of the interval's variance it gives the error's "
          "quadratic part; 1 at the floor):")
    shares = []
    for name, flag, covered in INTERVALS[:2]:
        kept = f[f[flag]].assign(**{"estimated share": lambda x: pd.cut(x["share"], SHARE_BINS, include_lowest=True)})
        shares.append(kept.groupby(["part", "estimated share"], observed=True).agg(
            **{f"rows ({name})": (covered, "size"), name: (covered, "mean")}))
    print(pd.concat(shares, axis=1).round(3).to_string())
    bands, outside = band_table(f)
    print(f"\ncells (cell x k) with >= {MIN_ACCEPTED} rows, exact one-sided binomial tests at 2.5%; stationary: "
          f"truth within {EDGE} of 0 or 1, or the reflection family at angle 0:")
    print(bands.to_string(index=False))
    print("\ncells outside the band:")
    print(outside.to_string(index=False) if len(outside) else "none")


if __name__ == "__main__":
    main()
