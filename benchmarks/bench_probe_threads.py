"""BLAS threads of the held-out logistic probe (scikit-learn lbfgs on standardised features): the
same fits timed with one thread and with every core, side by side in one run.

lbfgs on N x d features is a sequence of small matrix-vector products; on the project's 2-core
machines OpenBLAS's thread wake-ups cost more than the second core gives. Run:

    .venv/bin/python benchmarks/bench_probe_threads.py [--sizes 300x576 2000x576 2000x896] [--repeats 3]

Prints, per size, the median seconds of `ntps_nb.core.probes.heldout_probe` with 1 thread and with
all cores, their ratio, and whether the two fits agree (accuracy and predictions).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ntps_nb.core.probes import _heldout_probe
from ntps_nb.core.threads import available_cores


def _fit(X, y, Xt, yt, threads: int | None):
    kept: dict = {}
    start = time.perf_counter()
    # the private entry point: the public one bounds its own fit to one thread
    row = _heldout_probe(X, y, Xt, yt, n_classes=int(y.max()) + 1, seed=0, C=1.0, ridge=1.0, protocol="heldout",
                         max_iter=1000, tol=1e-6, kept=kept, fit_threads=threads)
    return time.perf_counter() - start, row["accuracy"], kept["predictions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["300x576", "2000x576", "2000x896"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()
    cores = available_cores()
    print(f"bench_probe_threads: {platform.processor() or platform.machine()}, {cores} cores, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        n, d = (int(v) for v in size.split("x"))
        centres = rng.standard_normal((args.classes, d)) * 0.15
        y, yt = rng.integers(0, args.classes, n), rng.integers(0, args.classes, n // 2)
        X, Xt = centres[y] + rng.standard_normal((n, d)), centres[yt] + rng.standard_normal((n // 2, d))
        times = {1: [], cores: []}
        results = {}
        for _ in range(args.repeats):
            for threads in (1, cores):  # interleaved, so drift in the machine's load hits both alike
                seconds, accuracy, predictions = _fit(X, y, Xt, yt, threads)
                times[threads].append(seconds)
                results[threads] = (accuracy, predictions)
        one, every = np.median(times[1]), np.median(times[cores])
        same = results[1][0] == results[cores][0] and np.array_equal(results[1][1], results[cores][1])
        print(f"  N = {n}, d = {d}: 1 thread {one:.3f} s, {cores} threads {every:.3f} s, "
              f"{cores} threads / 1 thread = {every / one:.2f}; same accuracy and predictions: {same}")


if __name__ == "__main__":
    main()
