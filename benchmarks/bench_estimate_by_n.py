"""`estimate_by_n` on a torch device against the host, side by side: seconds and agreement.

`ntps_nb.core.estimators.estimate_by_n` runs `ntps_estimate` on each nested subsample of one layer's shards
(the first G, 2G, 4G, ... shards as G groups) and passes ``device=`` to it. This times the whole check on the
host (numpy, every BLAS pool at ``--threads``) and on ``--device``, interleaved over ``--repeats`` rounds, on
the shards of one layer from the LDS generator (d hidden dimensions, N texts, S shards, C = 6), and prints the
median seconds of each, their ratio, and how far the device's rows are from the host's: the largest difference
of estimate, lower and upper, and the rows whose ``reliable`` or ``inside_first`` differ.

    python benchmarks/bench_estimate_by_n.py --d 896 --texts 8000 --shards 40 --groups 10 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

import ntps_nb
from ntps_nb.core.estimators import estimate_by_n
from ntps_nb.core.simulate import lds_model, sample_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="host BLAS threads")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ntps_nb.analysis_threads(args.threads)
    start = time.perf_counter()
    shards = sample_shards(lds_model(d=args.d, n_classes=6, gap="moderate", seed=1), args.texts, args.shards,
                           np.random.default_rng(0))
    drawn = time.perf_counter() - start
    runs = {"host": {}, args.device: {"device": args.device}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    frames = {}
    for _ in range(args.repeats):
        for name, options in runs.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the rows carry the flag; the warnings are the host's and the device's
                frames[name] = estimate_by_n(shards, args.ks, n_groups=args.groups, **options)
            times[name].append(time.perf_counter() - start)
    host, device = frames["host"], frames[args.device]
    subsamples = sorted(int(used) for used in host["n_shards_used"].unique())
    print(f"d = {args.d}, N = {args.texts} in {args.shards} shards (drawn in {drawn:.1f} s), {args.groups} groups, "
          f"subsamples of {subsamples} shards, k = {args.ks}, median of {args.repeats} interleaved rounds, host BLAS "
          f"threads {args.threads}, ntps_nb {ntps_nb.__version__}")
    base = np.median(times["host"])
    for name in runs:
        t = np.median(times[name])
        print(f"  {name:8s} {t:8.2f} s   ratio to the host {t / base:5.2f}")
    differences = {column: float(np.nanmax(np.abs(device[column].to_numpy(float) - host[column].to_numpy(float))))
                   for column in ("estimate", "lower", "upper", "drift")}
    print("  largest |device - host|: " + ", ".join(f"{c} {v:.2e}" for c, v in differences.items()))
    for column in ("reliable", "inside_first"):
        differ = (device[column].astype("boolean") != host[column].astype("boolean")).fillna(True)
        differ &= ~(device[column].isna() & host[column].isna())
        print(f"  rows whose {column} differs: {int(differ.sum())} of {len(host)}")


if __name__ == "__main__":
    main()
