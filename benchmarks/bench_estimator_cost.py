"""Cost of the default estimator against the plug-in, measured side by side in one run.

Times `estimate_ntps` (the point estimate), `ntps_sweep` (every k, with its warnings) and
`ntps_estimate` (estimate, jackknife interval and reliability flag) for "plugin" and "richardson"
with the jackknife-t interval (and richardson without the flag's rotation condition,
``rotation_flag=False``, with ``interval="rotation"`` and with the default interval, "quadratic",
whose interactions take at most 5 shards of each half, widened on the reliable rows over the rotation sets
(the default since session 63; its rotation sets at 0.6 since session 64, and at the interval's 0.90 as before,
``widening_level=0.90``) and not (``rotation_widening=False``); and that interval with every shard,
``interaction_half=None``) on the same shard moments of one layer (an LDS generator, d hidden
dimensions, N texts in S shards), interleaved over ``--repeats`` rounds, and prints the median
seconds and the ratio to the plug-in, and beside them the number of d x d symmetric eigensolves
each call makes (counted on one more, untimed call) and its ratio to the plug-in's. The issue's
budget: the default estimator at most 3x the plug-in's factorisations (richardson: the full sample
and its two halves). ``--device cuda`` solves the sweeps and `ntps_estimate` on a torch device.

    python benchmarks/bench_estimator_cost.py --d 576 --texts 2000 --shards 20
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

import ntps_nb  # noqa: E402
from ntps_nb.core.estimators import estimate_ntps, ntps_estimate  # noqa: E402
from ntps_nb.core.score import ntps_sweep  # noqa: E402
from ntps_nb.core.simulate import lds_model, sample_shards  # noqa: E402


def count_eigensolves(call, d: int) -> int:
    """The d x d symmetric eigensolves (scipy's and numpy's eigh) ``call`` makes."""
    count = 0
    originals = scipy.linalg.eigh, np.linalg.eigh

    def counted(original):
        def eigh(a, *args, **kwargs):
            nonlocal count
            count += np.shape(a)[-1] == d
            return original(a, *args, **kwargs)
        return eigh

    scipy.linalg.eigh, np.linalg.eigh = (counted(f) for f in originals)
    try:
        call()
    finally:
        scipy.linalg.eigh, np.linalg.eigh = originals
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gap", default="moderate", help="the LDS generator's eigengap design (lds_model's gap)")
    parser.add_argument("--all-ks", action="store_true", help="every k from 1 to d (a study's k = \"all\")")
    parser.add_argument("--device", default=None,
                        help="a torch device (\"cuda\"): ntps_sweep and ntps_estimate solve there (ntps_sweep_torch, "
                             "device=); estimate_ntps stays numpy; the eigensolves counted are then the host's")
    parser.add_argument("--without", action="append", default=[],
                        choices=("estimate_ntps", "ntps_sweep", "ntps_estimate"),
                        help="leave this function's calls out (repeatable; e.g. the host's estimate_ntps at a large d)")
    args = parser.parse_args()
    options = {} if args.device is None else {"device": args.device}
    if args.device is not None:
        from ntps_nb.core.backends.torch import ntps_sweep_torch

        def sweep(shards, **kwargs):
            return ntps_sweep_torch(shards, device=args.device, **kwargs)
    else:
        sweep = ntps_sweep
    model = lds_model(d=args.d, n_classes=6, n_tokens=8, gap=args.gap)
    shards = sample_shards(model, args.texts, args.shards, np.random.default_rng(0))
    ks = list(range(1, args.d + 1)) if args.all_ks else [1, 2, 4, 8, 16, 32]
    calls = {
        ("estimate_ntps", e): (lambda e=e: estimate_ntps(shards, ks, estimator=e)) for e in ("plugin", "richardson")
    }
    calls.update({("ntps_sweep", e): (lambda e=e: sweep(shards, estimator=e)) for e in ("plugin", "richardson")})
    calls.update({("ntps_estimate", e): (lambda e=e: ntps_estimate(shards, ks, estimator=e, interval="jackknife",
                                                                   **options))
                  for e in ("plugin", "richardson")})
    # the flag's rotation condition (ntps_nb.core.rotation.rotation_stability) left out, the rotation
    # interval, and the default interval ("quadratic": 25 more plug-ins at 10 shards and at 20; with every shard
    # of each half, 100 at 20)
    calls[("ntps_estimate", "richardson, no rotation flag")] = lambda: ntps_estimate(shards, ks, rotation_flag=False,
                                                                                     interval="jackknife", **options)
    calls[("ntps_estimate", "richardson+rotation")] = lambda: ntps_estimate(shards, ks, interval="rotation", **options)
    calls[("ntps_estimate", "richardson+quadratic, unwidened")] = lambda: ntps_estimate(shards, ks,
                                                                                        rotation_widening=False,
                                                                                        **options)
    calls[("ntps_estimate", "richardson+quadratic, sets at 0.90")] = lambda: ntps_estimate(shards, ks,
                                                                                           widening_level=0.90,
                                                                                           **options)
    calls[("ntps_estimate", "richardson+quadratic (default)")] = lambda: ntps_estimate(shards, ks, **options)
    calls[("ntps_estimate", "richardson+quadratic, every shard")] = lambda: ntps_estimate(shards, ks,
                                                                                         interaction_half=None,
                                                                                         **options)
    calls = {key: call for key, call in calls.items() if key[0] not in args.without}
    solves = {key: count_eigensolves(call, args.d) for key, call in calls.items()}
    times = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    print(f"d = {args.d}, N = {args.texts}, {args.shards} shards, gap {args.gap!r}, {len(ks)} values of k, "
          f"median of {args.repeats} interleaved rounds, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
          + ("" if args.device is None else f", ntps_sweep and ntps_estimate on {args.device}")
          + f", the package at {os.path.relpath(os.path.dirname(ntps_nb.__file__))}")
    for what in ("estimate_ntps", "ntps_sweep", "ntps_estimate"):
        if what in args.without:
            continue
        base = np.median(times[(what, "plugin")])
        for e in ("plugin", "richardson, no rotation flag", "richardson", "richardson+rotation",
                  "richardson+quadratic, unwidened", "richardson+quadratic, sets at 0.90",
                  "richardson+quadratic (default)",
                  "richardson+quadratic, every shard"):
            if (what, e) in times:
                t = np.median(times[(what, e)])
                n, n_base = solves[(what, e)], solves[(what, "plugin")]
                ratio = f", ratio {n / n_base:5.2f}" if n_base else ""
                print(f"  {what:14s} {e:33s} {t:8.3f} s   ratio to plugin {t / base:5.2f}   {n:4d} eigensolves{ratio}")
    if "ntps_estimate" not in args.without:
        # the flag's rotation condition computes its ranges on the rows its other conditions accept only
        frame = ntps_estimate(shards, ks, **options)
        print(f"  the default row's flag computed rotation ranges on {int(frame['rotation_lower'].notna().sum())} of "
              f"{len(frame)} rows (reliable: {int(frame['reliable'].sum())}; widened, the default since session 63: "
              f"{int(frame['rotation_U'].notna().sum())})")


if __name__ == "__main__":
    main()
