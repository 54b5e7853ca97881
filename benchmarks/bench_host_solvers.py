"""The diagnostics' host eigensolver comparison at one layer: one setting after another with every
BLAS thread, against the settings in concurrent threads sharing the threads, and in worker
processes sharing them (`HostSolverProcesses`, as the study's diagnostics stage runs them beside the
device work since threads were found to stall it: scipy's LAPACK wrappers keep the GIL), side by
side in one run.

``solver_max_dev`` compares the NTPS of host LAPACK front ends and precisions
(`ntps_nb.core.diagnostics.SOLVER_CONFIGS`): a host computation by definition, and at d = 4096 most
of the diagnostics stage's time on a GPU machine. Synthetic moments: N texts in d dimensions (Sxx
of rank min(N, d)), C classes, full-rank C0. Example (the H200 machine's 16 cores):

    python benchmarks/bench_host_solvers.py --d 4096 --n-texts 2000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import numpy as np
from threadpoolctl import threadpool_info

from ntps_nb.core.diagnostics import SOLVER_CONFIGS, HostSolverProcesses, host_solver_values
from ntps_nb.core.moments import Moments
from ntps_nb.core.threads import analysis_threads

GRIDS = {"theory": {"k": [1, 2, 4, 8, 16, 32]}, "reference": {"fraction": [0.05, 0.1, 0.25, 0.5]}}


def synthetic_moments(d: int, n_texts: int, n_classes: int, seed: int = 0) -> Moments:
    """Moments of N random texts with a planted class signal: Sxx of rank min(N, d), C0 full rank."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_texts)
    Y = np.eye(n_classes)[labels]
    X = rng.standard_normal((n_texts, d)) + Y @ rng.standard_normal((n_classes, d))
    tokens = rng.standard_normal((2 * d, d))
    return Moments(Sxx=X.T @ X / n_texts, Sxy=X.T @ Y / n_texts, Syy=Y.T @ Y / n_texts,
                   C0=tokens.T @ tokens / n_texts, C1=tokens[:-1].T @ tokens[1:] / n_texts, n_texts=n_texts,
                   n_tokens=2 * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 6],
                        help="concurrent threads to try (6: one per setting, as the study's stage)")
    parser.add_argument("--longest-first", action="store_true",
                        help="submit the concurrent settings slowest first (reference float32 scipy: the released "
                             "algorithm's own LAPACK calls)")
    parser.add_argument("--skip-sequential", action="store_true", help="time the concurrent runs only")
    parser.add_argument("--mode", nargs="+", choices=["threads", "processes"], default=["threads", "processes"],
                        help="run the concurrent settings in threads, in worker processes, or both")
    args = parser.parse_args()
    moments = synthetic_moments(args.d, args.n_texts, args.classes)
    tasks = [(variant, config) for variant in GRIDS for config in SOLVER_CONFIGS[variant]]
    bounds = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    print(f"bench_host_solvers: d = {args.d}, N = {args.n_texts}, C = {args.classes}; {len(tasks)} settings; "
          f"{os.cpu_count()} cores, BLAS pools {bounds}")
    with analysis_threads() as n_threads:
        small = synthetic_moments(32, 40, args.classes)
        for variant, config in tasks:  # warm-up: the LAPACK front ends' first calls
            host_solver_values(small, variant, configs=[config], **GRIDS[variant])
        sequential, values = 0.0, {}
        for variant, config in ([] if args.skip_sequential else tasks):
            start = time.perf_counter()
            values[variant, config] = host_solver_values(moments, variant, configs=[config], **GRIDS[variant])[0]
            seconds = time.perf_counter() - start
            sequential += seconds
            print(f"  one after another, {n_threads} threads: {variant:9s} {config[0]} {config[1]:5s} {seconds:7.2f} s")
        if not args.skip_sequential:
            print(f"one after another, {n_threads} BLAS threads each: {sequential:.1f} s")
        if args.longest_first:
            tasks = sorted(tasks, key=lambda task: (task[1][1] != "scipy", task[1][0] != "float32", task[0] != "reference"))
            print("concurrent settings submitted slowest first: " + ", ".join(f"{v} {c[0]} {c[1]}" for v, c in tasks))
        for mode in args.mode:
            for workers in args.workers:
                each = max(1, n_threads // workers)
                start = time.perf_counter()
                if mode == "threads":
                    with analysis_threads(each), concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                        futures = {task: pool.submit(host_solver_values, moments, task[0], configs=[task[1]],
                                                     **GRIDS[task[0]]) for task in tasks}
                        results = {task: futures[task].result()[0] for task in tasks}
                else:  # worker processes (their start, ~seconds of imports, is counted)
                    with HostSolverProcesses(workers, each) as pool:
                        futures = {task: pool.submit(moments, task[0], task[1], **GRIDS[task[0]]) for task in tasks}
                        results = {task: futures[task].result() for task in tasks}
                seconds = time.perf_counter() - start
                label = f"{workers} concurrent {mode}, {each} BLAS threads each: {seconds:.1f} s"
                if values:
                    moved = max(float(np.nanmax(np.abs(results[task] - values[task]))) for task in tasks)
                    print(f"{label} ({seconds / sequential:.2f} x one after another; largest NTPS change {moved:.1e}, "
                          f"LAPACK with other thread counts)", flush=True)
                else:
                    print(label, flush=True)


if __name__ == "__main__":
    main()
