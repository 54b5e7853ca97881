"""Bias, spread and interval coverage of the NTPS estimators on generators with known truth.

Runs `ntps_nb.core.simulate.estimator_map` over a grid of (family, d, C, eigengap regime) x N/d x k,
one task per grid cell (or per range of its draws, ``--chunks``) on ``--processes`` processes, and writes the per-draw frame (csv.gz) and the
per-cell summary (CSV) under ``--out``. Example (the run behind docs/estimator.md):

    python benchmarks/estimator_map.py --d 16 64 --draws 60 --processes 16 --out benchmarks/results/estimator_map
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402

from ntps_nb.core.estimators import ESTIMATORS  # noqa: E402
from ntps_nb.core.simulate import FAMILIES, estimator_map, summarise_map  # noqa: E402


def one_cell(args) -> pd.DataFrame:
    family, d, C, gap, ratios, ks, estimators, (first, draws), shards, seed, angle, interval = args
    model = FAMILIES[family](d=d, n_classes=C, n_tokens=8, gap=gap, seed=seed,
                             **({} if angle is None else {"angle": angle}))
    ks = [k for k in ks if k <= d // 2]
    return estimator_map([model], ratios, ks, estimators=estimators, n_draws=draws, n_shards=shards, level=0.90,
                         seed=seed, first_draw=first, interval=interval)


def draw_ranges(draws: int, chunks: int) -> list[tuple[int, int]]:
    """(first draw, number of draws) of ``chunks`` near-equal ranges covering 0 .. draws - 1."""
    edges = [round(i * draws / chunks) for i in range(chunks + 1)]
    return [(a, b - a) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[16])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6, 20])
    parser.add_argument("--gaps", nargs="+", default=["separated", "moderate", "tied"])
    parser.add_argument("--families", nargs="+", default=["factor", "lds"], choices=list(FAMILIES),
                        help="generator families (reflection: the stationary case, C >= 3 only)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--chunks", type=int, default=1,
                        help="split each cell's draws into this many ranges, one task each (the same draws)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--angle", type=float, default=None,
                        help="the families' angle between label and predictable directions (default: each family's)")
    parser.add_argument("--interval", default="jackknife", choices=["jackknife", "rotation", "quadratic"],
                        help="ntps_estimate's interval (quadratic: --estimators richardson)")
    parser.add_argument("--out", default="benchmarks/results/estimator_map")
    args = parser.parse_args()
    cells = [(f, d, C, g, args.ratios, args.ks, args.estimators, span, args.shards, args.seed, args.angle,
              args.interval)
             for f, d, C, g in itertools.product(args.families, args.d, args.classes, args.gaps)
             if C <= d // 2 and not (f == "reflection" and C < 3)
             for span in draw_ranges(args.draws, max(1, args.chunks))]
    start = time.time()
    out = Path(args.out)
    tag = "d" + "-".join(map(str, args.d))
    parts = out / f"parts_{tag}"  # each finished task at once: a run cut short keeps what it did
    parts.mkdir(parents=True, exist_ok=True)
    frames = {}
    with ProcessPoolExecutor(args.processes) as pool:
        futures = {pool.submit(one_cell, cell): i for i, cell in enumerate(cells)}
        for future in as_completed(futures):
            i = futures[future]
            frames[i] = future.result()
            frames[i].to_csv(parts / f"task{i:04d}.csv.gz", index=False)
    frame = pd.concat([frames[i] for i in range(len(cells))], ignore_index=True)
    frame.to_csv(out / f"draws_{tag}.csv.gz", index=False)
    summary = summarise_map(frame)
    summary.to_csv(out / f"summary_{tag}.csv", index=False)
    print(f"{len(cells)} tasks, {len(frame)} rows, {time.time() - start:.0f} s on {args.processes} processes")


if __name__ == "__main__":
    main()
