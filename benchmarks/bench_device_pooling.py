"""Host work in the torch backend's shard calls at a large d, measured side by side in one run.

Builds S shards of random moments at d hidden dimensions on a CUDA device (each a mean of outer products
of 2 d random vectors; C classes), keeps them resident there as a GPU study's extraction does
(`ntps_nb.core.backends.torch.keep_resident`: `extract(..., keep_on_device=True)`), and times
`Moments.combine` of the shards on the host beside the plug-in's `ntps_sweep(shards, device=...)` and
`ntps(shards, k, device=...)` (and the sweep again on host copies of the shards, which are not resident),
`ntps_sweep_torch(shards, estimator="richardson")` and, unless ``--no-estimate``,
`ntps_estimate(shards, ks, device=...)` (the default row) and, with ``--rotation``,
`ntps_estimate(..., interval="rotation")`. The package measured is the one on PYTHONPATH: run it for two
revisions in one call to compare.

    python benchmarks/bench_device_pooling.py --d 4096 --shards 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings

import numpy as np
import torch

import ntps_nb
from ntps_nb.core.backends.torch import keep_resident, ntps_sweep_torch
from ntps_nb.core.estimators import ntps_estimate
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import ntps, ntps_sweep


def shards_on_device(d: int, n_shards: int, n_classes: int, device: str) -> list[Moments]:
    """Random shard moments with a next-token signal (C1 from the states' own factors), resident on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(n_shards):
        X = torch.randn(d, 2 * d, device=device, dtype=torch.float64, generator=g)
        Z = 0.7 * X + torch.randn(d, 2 * d, device=device, dtype=torch.float64, generator=g)
        tensors = {"Sxx": X @ X.mT / (2 * d), "C0": Z @ Z.mT / (2 * d), "C1": X @ Z.mT / (2 * d),
                   "Sxy": 0.1 * torch.randn(d, n_classes, device=device, dtype=torch.float64, generator=g)}
        arrays = {name: t.cpu().numpy() for name, t in tensors.items()}
        shard = Moments(Syy=np.eye(n_classes) / n_classes, n_texts=200, n_tokens=3000, **arrays)
        for name, t in tensors.items():
            keep_resident(getattr(shard, name), t)
        out.append(shard)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rotation", action="store_true", help="also time interval='rotation'")
    parser.add_argument("--no-estimate", action="store_true", help="do not time ntps_estimate")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    shards = shards_on_device(args.d, args.shards, args.classes, args.device)
    # the same numbers in new host arrays, which have no resident copy
    on_host = [dataclasses.replace(s, **{name: np.array(a) for name, a in s.arrays().items()}) for s in shards]
    ks = [1, 2, 4, 8]
    calls = {
        "Moments.combine of the shards (host)": lambda: Moments.combine(shards),
        "ntps_sweep, plugin": lambda: ntps_sweep(shards, device=args.device),
        "ntps at k = 8, plugin": lambda: ntps(shards, 8, device=args.device),
        "ntps_sweep, plugin, shards on the host": lambda: ntps_sweep(on_host, device=args.device),
        "ntps_sweep_torch, richardson": lambda: ntps_sweep_torch(shards, estimator="richardson", device=args.device),
    }
    if not args.no_estimate:
        calls["ntps_estimate, the default row"] = lambda: ntps_estimate(shards, ks, device=args.device)
    if args.rotation:
        calls["ntps_estimate, interval='rotation'"] = lambda: ntps_estimate(shards, ks, device=args.device,
                                                                             interval="rotation")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"d = {args.d}, {args.shards} shards resident on {where} (and host copies), best of {args.repeats}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"the package at {os.path.relpath(os.path.dirname(ntps_nb.__file__))}")
    for name, values in times.items():
        print(f"  {name:40s} {min(values):8.3f} s")


if __name__ == "__main__":
    main()
