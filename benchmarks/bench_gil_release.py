"""Does a LAPACK eigensolver front end release the GIL? (Why the host solver comparison runs in processes.)

Each eigensolver (scipy / numpy, float32 / float64, and scipy's generalized problem) runs in a thread
while the main thread sleeps 1 ms at a time and counts its wake-ups: a call that releases the GIL
lets the main thread wake ~once a millisecond; one that keeps it lets it wake only a few times. With
one BLAS thread, a 1500 x 1500 matrix:

    python benchmarks/bench_gil_release.py
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1500)
    args = parser.parse_args()
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((args.d, args.d))
    a = a @ a.T
    b = a + 10 * np.eye(args.d)
    solvers = {"scipy f32": lambda: scipy.linalg.eigh(a.astype(np.float32)),
               "scipy f64": lambda: scipy.linalg.eigh(a),
               "numpy f32": lambda: np.linalg.eigh(a.astype(np.float32)),
               "numpy f64": lambda: np.linalg.eigh(a),
               "scipy f32 gen": lambda: scipy.linalg.eigh(a.astype(np.float32), b.astype(np.float32))}
    for name, solve in solvers.items():
        start = time.perf_counter()
        solve()
        alone = time.perf_counter() - start
        done = threading.Event()
        worker = threading.Thread(target=lambda: (solve(), done.set()))
        worker.start()
        ticks, start = 0, time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            ticks += 1
        elapsed = time.perf_counter() - start
        worker.join()
        print(f"{name}: alone {alone:.2f}s; main-thread ticks of 1 ms during it: {ticks} in {elapsed:.2f}s", flush=True)


if __name__ == "__main__":
    main()
