"""Does `ntps_estimate` (the default row) run on every kind of population the simulators make?

Session 36 found `ntps_estimate` raising on an ill-conditioned Sxx and on odd shard counts (both since fixed;
docs/estimator.md, "Crashes on an ill-conditioned Sxx and on odd shard counts"), on designs nobody had aimed at it.
This script aims at such designs on purpose: every family of `ntps_nb.core.simulate` (factor, LDS, reflection,
Markov), with and without Student t texts, with massive activations from nothing to 1e4 (condition numbers of Sxx
past `RANGE_RTOL`'s 1e10, so directions are dropped), at N/d from 1 to 32, k up to d / 2, any number of shards
(``--shards``; an odd number raised before session 36), and lists every exception by message. A message that names
a data condition (one class in a part of the sample, no label signal) is the package saying what it cannot do;
anything else is a fault to fix. Also reports rows whose estimate is finite but whose interval
is not, and estimates outside [-0.5, 1.5] (richardson extrapolates, so a little outside [0, 1] is possible).

    python benchmarks/robustness_sweep.py --d 16 64 --draws 10 --processes 16 --out D/sweep.csv.gz
    python benchmarks/robustness_sweep.py --d 16 --draws 4 --shards 3 4 5 7 20 --processes 2 --out D/shards.csv.gz
    python benchmarks/robustness_sweep.py --d 64 --draws 3 --device cuda --processes 1 --out D/sweep_cuda.csv.gz
    python benchmarks/robustness_sweep.py --report D/sweep.csv.gz
    python benchmarks/robustness_sweep.py --compare D/sweep_cuda.csv.gz D/sweep.csv.gz
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unseen_family_check import OFFSET, failures, population  # noqa: E402

from ntps_nb.core.simulate import FAMILIES, estimator_map  # noqa: E402

#: The columns kept per row.
KEPT = ["task_family", "task_tails", "task_offset", "task_d", "task_n_classes", "task_gap", "task_seed", "task_shards",
        "n_over_d", "draw", "k", "estimator", "truth", "estimate", "se", "lower", "upper", "reliable", "covered",
        "failure"]
#: Estimates outside this range are listed (richardson may leave [0, 1] by its extrapolation).
PLAUSIBLE = (-0.5, 1.5)


def designs(args) -> list[tuple]:
    """(family, tails, offset, d, C, gap, seed) of every population swept."""
    out = []
    for family, tails, offset, d, C, gap in itertools.product(args.families, args.tails, args.offsets, args.d,
                                                              args.classes, args.gaps):
        if C > d // 2 or (family == "reflection" and C < 3) or (offset and family not in OFFSET):
            continue
        out.append((family, None if tails == 0 else tails, offset, d, C, gap, args.seed))
    return out


def one_task(args) -> pd.DataFrame:
    (family, tails, offset, d, C, gap, seed), ratios, draws, device, n_shards, estimator = args
    model = population(family, d, C, gap, 0.7, seed, tails, offset)    # the Markov family at its default memory
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= d // 2]
    frame = estimator_map([model], ratios, ks, estimators=[estimator], n_draws=draws, n_shards=n_shards,
                          seed=seed, device=device)
    return frame.assign(task_family=family, task_tails=tails, task_offset=offset,
                        task_shards=n_shards).reindex(columns=KEPT)


def run(args) -> None:
    tasks = [(design, args.ratios, args.draws, args.device, n_shards, args.estimator) for design in designs(args)
             for n_shards in args.shards]
    start = time.time()
    if args.processes == 1:
        frame = pd.concat(map(one_task, tasks), ignore_index=True)
    else:
        with ProcessPoolExecutor(args.processes) as pool:
            frame = pd.concat(pool.map(one_task, tasks), ignore_index=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"{len(tasks)} populations, {len(frame)} rows, {time.time() - start:.0f} s on {args.processes} processes"
          f"{'' if args.device is None else ' (device ' + args.device + ')'}")


def report(paths: list[str]) -> None:
    f = pd.concat([pd.read_csv(p, dtype={"failure": object}) for p in paths], ignore_index=True)
    failure = failures(f)
    f["task_shards"] = f.get("task_shards", pd.Series(np.nan, index=f.index)).fillna(10)  # older frames: 10 shards
    f["estimator"] = f["estimator"].fillna("richardson") if "estimator" in f else "richardson"
    kinds = ["estimator", "task_family", "task_tails", "task_offset", "task_d", "task_shards"]
    print(f"{len(f)} rows ({f.groupby(kinds + ['task_n_classes', 'task_gap'], dropna=False).ngroups} populations, "
          f"{f.groupby(kinds + ['task_n_classes', 'task_gap', 'n_over_d', 'draw'], dropna=False).ngroups} draws)")
    raised = f[failure != ""].assign(message=failure[failure != ""])
    print(f"\nRows on which ntps_estimate raised: {len(raised)}")
    if len(raised):
        print(raised.groupby(["message"] + kinds + ["n_over_d"], dropna=False).size().rename("rows").to_string())
    finite = np.isfinite(f["estimate"])
    no_interval = f[finite & ~(np.isfinite(f["lower"]) & np.isfinite(f["upper"]))]
    print(f"\nRows with a finite estimate and no finite interval: {len(no_interval)}")
    if len(no_interval):
        print(no_interval.groupby(kinds + ["n_over_d", "k"], dropna=False).size().rename("rows").to_string())
    wild = f[finite & ((f["estimate"] < PLAUSIBLE[0]) | (f["estimate"] > PLAUSIBLE[1]))]
    print(f"\nFinite estimates outside {list(PLAUSIBLE)}: {len(wild)}")
    if len(wild):
        print(wild.groupby(kinds + ["n_over_d"], dropna=False).agg(rows=("estimate", "size"),
                                                                   lowest=("estimate", "min"),
                                                                   highest=("estimate", "max"),
                                                                   reliable=("reliable", "sum")).to_string())
    print("\nRows, reliable share and every row's coverage by population kind:")
    print(f.assign(raised=failure != "").groupby(kinds, dropna=False)
          .agg(rows=("k", "size"), raised=("raised", "sum"), reliable=("reliable", "mean"), covered=("covered", "mean"))
          .round(3).to_string())


def compare(first: str, second: str) -> None:
    """The rows two sweeps share (the same populations, N, draws and k: e.g. numpy and a torch device): the largest
    differences of estimate and bounds by N/d, and how many rows the flag decides differently."""
    frames = [pd.read_csv(p, dtype={"failure": object}) for p in (first, second)]
    key = ["task_family", "task_tails", "task_offset", "task_d", "task_n_classes", "task_gap", "task_seed",
           "task_shards", "n_over_d", "draw", "k"]
    key.insert(0, "estimator")
    for f in frames:
        f["estimator"] = f["estimator"].fillna("richardson") if "estimator" in f else "richardson"
        f["task_tails"] = f["task_tails"].fillna(0)
        f["task_shards"] = f.get("task_shards", pd.Series(np.nan, index=f.index)).fillna(10)
    both = frames[0].merge(frames[1], on=key, suffixes=("_1", "_2"))
    print(f"{len(both)} rows in both ({len(frames[0])} and {len(frames[1])} in each)")
    diffs = both.assign(**{f"{c} max |diff|": (both[f"{c}_1"] - both[f"{c}_2"]).abs()
                           for c in ("estimate", "lower", "upper")})
    table = diffs.groupby("n_over_d")[[f"{c} max |diff|" for c in ("estimate", "lower", "upper")]].max()
    table["reliable differs"] = (both["reliable_1"] != both["reliable_2"]).groupby(both["n_over_d"]).sum()
    print(table.to_string(float_format=lambda x: f"{x:.2g}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="*", default=None, help="report these frames instead of running")
    parser.add_argument("--compare", nargs=2, default=None, help="compare the rows two frames share")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--tails", type=float, nargs="+", default=[0, 3], help="Student t df (0: Gaussian texts)")
    parser.add_argument("--offsets", type=float, nargs="+", default=[0, 100, 1e4], help="factor / LDS offsets")
    parser.add_argument("--d", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6, 20])
    parser.add_argument("--gaps", nargs="+", default=["separated", "moderate", "tied"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 4, 32])
    parser.add_argument("--seed", type=int, default=700)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--shards", type=int, nargs="+", default=[10], help="shard counts (each population, each)")
    parser.add_argument("--estimator", default="richardson", help="ntps_estimate's estimator (its default interval)")
    parser.add_argument("--device", default=None, help="ntps_estimate's device (e.g. cuda); default numpy")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="robustness_sweep.csv.gz")
    args = parser.parse_args()
    if args.compare is not None:
        compare(*args.compare)
    elif args.report is not None:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
