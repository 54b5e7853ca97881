"""Whose flag is it? How the rows that meet the reliability flag's conditions cover, for the plug-in and the default.

`ntps_estimate`'s flag (subspace noise, eigengaps, [0, 1], rotation; and the bound condition with the jackknife
interval) was calibrated for the default estimator, "richardson". This runs `ntps_nb.core.simulate.estimator_map`
with ``flag_any_estimator=True`` (every estimator's rows marked by the conditions) on the estimator map's
populations (LDS and factor families, C = 2, 6, 20, separated / moderate / tied gaps, k up to d / 2, N/d 8 and 32,
where the flag accepts rows; 10 shards) for the plug-in with its jackknife interval and for the default with its
own, and prints, per estimator, the rows that meet the conditions, how often their 90% interval covers the
population NTPS (pooled, with its binomial SE), and the cells with at least ``--min-rows`` such rows. The numbers
behind `ntps_nb.core.estimators.PLUGIN_FLAGGED_COVERAGE` and the estimates stage's version 4.

    python benchmarks/plugin_flag_check.py --d 16 --draws 100
    python benchmarks/plugin_flag_check.py --d 64 --draws 60
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_map import one_cell  # noqa: E402  (the map's own task: estimator_map marks every estimator's rows)

#: (estimator, interval) pairs compared: each estimator with the interval `ntps_estimate` gives it by default.
RUNS = (("plugin", "jackknife"), ("richardson", "quadratic"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 32])
    parser.add_argument("--seed", type=int, default=60)
    parser.add_argument("--min-rows", type=int, default=10)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    cells = [(family, args.d, C, gap) for family, C, gap in itertools.product(
        ("factor", "lds"), (2, 6, 20), ("separated", "moderate", "tied")) if C <= args.d // 2]
    tasks = [(*cell, args.ratios, (1, 2, 4, 8, 32), [estimator], (0, args.draws), 10, args.seed, None, interval)
             for estimator, interval in RUNS for cell in cells]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.processes) as pool:
        table = pd.concat(pool.map(one_cell, tasks), ignore_index=True)
    print(f"d = {args.d}, {len(cells)} populations (seed {args.seed}), N/d {args.ratios}, {args.draws} draws, "
          f"10 shards, 90% intervals; {time.perf_counter() - start:.0f} s on {args.processes} processes")
    for estimator, rows in table.groupby("estimator", sort=False):
        flagged = rows[rows["reliable"].astype(bool)]
        cover = flagged["covered"].mean()
        se = np.sqrt(cover * (1 - cover) / max(len(flagged), 1))
        interval = dict(RUNS)[estimator]
        print(f"\n{estimator} ({interval} interval): "
              f"{len(flagged)} of {len(rows)} rows meet the flag's conditions; they cover {cover:.3f} (SE {se:.3f})")
        cellwise = flagged.groupby(["task_family", "task_n_classes", "task_gap", "n_over_d", "k"]).agg(
            rows=("covered", "size"), cover=("covered", "mean"), bias=("error", "mean"), truth=("truth", "first"))
        print(cellwise[cellwise["rows"] >= args.min_rows].round(3).to_string())


if __name__ == "__main__":
    main()
