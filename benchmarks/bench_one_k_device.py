"""The one-k functions with ``device=`` against the numpy core, side by side in one run.

Times `ntps` (one value), `ntps_interval` (one k, ``--n-boot`` bootstrap replicates plus the S
leave-one-shard-out ones) and `ntps_difference` (two layers' worth of shards, paired) on the numpy
core and on a torch device, on the same shard moments (an LDS generator, d hidden dimensions, N
texts in S shards), interleaved over ``--repeats`` rounds; prints the median seconds, the ratio of
the numpy core's time to the device's, and the largest difference between the two results (the
value, the interval's bounds, the jackknife standard error).

    python benchmarks/bench_one_k_device.py --d 2048 --texts 8000 --shards 20 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import ntps_nb
from ntps_nb.core.intervals import ntps_difference, ntps_interval
from ntps_nb.core.score import ntps
from ntps_nb.core.simulate import lds_model, sample_shards


def largest_difference(a, b) -> float:
    """The largest absolute difference between two results of the same call (a float or an interval)."""
    if isinstance(a, float):
        return abs(a - b)
    return max(abs(getattr(a, name) - getattr(b, name)) for name in ("estimate", "lower", "upper", "se_jackknife"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help='the torch device ("cuda"; default "cpu", torch on the CPU)')
    args = parser.parse_args()
    model = lds_model(d=args.d, n_classes=6, n_tokens=8, gap="moderate")
    rng = np.random.default_rng(0)
    shards, other = (sample_shards(model, args.texts, args.shards, rng) for _ in range(2))
    one = dict(k=args.k, n_boot=args.n_boot, progress=False)
    calls = {
        "ntps": lambda **device: ntps(shards, k=args.k, **device),
        "ntps_interval": lambda **device: ntps_interval(shards, **one, **device),
        "ntps_difference": lambda **device: ntps_difference(shards, other, paired=True, **one, **device),
    }
    for call in calls.values():  # once each, untimed: the device's first calls, the libraries' imports
        call(device=args.device)
    times = {(name, where): [] for name in calls for where in ("numpy", "device")}
    results = {}
    for _ in range(args.repeats):
        for name, call in calls.items():
            for where, options in (("numpy", {}), ("device", {"device": args.device})):
                start = time.perf_counter()
                results[(name, where)] = call(**options)
                times[(name, where)].append(time.perf_counter() - start)
    print(f"d = {args.d}, N = {args.texts}, {args.shards} shards, k = {args.k}, n_boot = {args.n_boot}, median of "
          f"{args.repeats} interleaved rounds, numpy core against device {args.device!r}, the package at "
          f"{os.path.relpath(os.path.dirname(ntps_nb.__file__))}")
    for name in calls:
        host, device = (float(np.median(times[(name, where)])) for where in ("numpy", "device"))
        print(f"  {name:16s} numpy {host:8.3f} s   device {device:8.3f} s   numpy / device {host / device:6.2f}   "
              f"largest difference {largest_difference(results[(name, 'numpy')], results[(name, 'device')]):.2e}")


if __name__ == "__main__":
    main()
