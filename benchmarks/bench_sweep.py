"""Full 19-fraction NTPS sweep (reference variant): one pseudo-inverse per fraction vs ntps_nb's
nested projectors (one orthonormalisation of V), side by side in one run.

    .venv/bin/python benchmarks/bench_sweep.py [--dims 896 2048] [--classes 4] [--repeats 3]

Both paths share the same two eigensolves, timed apart: the projector ratio isolates the step
the nested projectors replace; the sweep ratio includes the eigensolves. Values in float64.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ntps_nb import Moments, ntps_sweep
from ntps_nb.core.score import REFERENCE_FRACTIONS, _reference_subspaces
from ntps_nb.core.subspaces import REFERENCE_ABS_TOL, nested_orthonormal_basis


def random_layer(d: int, n_classes: int, seed: int) -> Moments:
    rng = np.random.default_rng(seed)
    n = 2 * d
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    S = np.cumsum(rng.standard_normal((n, d)), axis=0) / np.sqrt(n)
    H = S @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal((n, d))
    Y = np.eye(n_classes)[rng.integers(0, n_classes, n)]
    return Moments(Sxx=X.T @ X / n, Sxy=X.T @ Y / n, Syy=Y.T @ Y / n, C0=S.T @ S / n, C1=S.T @ H / n,
                   n_texts=n, n_tokens=n)


def pinv_sweep(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    values = []
    for f in REFERENCE_FRACTIONS:
        U_f, V_f = U[:, : int(f * U.shape[1])], V[:, : int(f * V.shape[1])]
        P = V_f @ np.linalg.pinv(V_f)
        values.append(np.linalg.norm(P @ U_f) ** 2 / np.linalg.norm(U_f) ** 2)
    return np.array(values)


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def nested_sweep(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """ntps_nb's projector step, as `reference_geometry` does it after the eigensolves."""
    basis, counts = nested_orthonormal_basis(V)
    projected = np.cumsum(np.cumsum((basis.T @ U) ** 2, axis=0), axis=1)
    norms = np.cumsum(np.sum(U**2, axis=0))
    values = []
    for f in REFERENCE_FRACTIONS:
        kU, kV = int(f * U.shape[1]), int(f * V.shape[1])
        values.append(projected[counts[kV - 1] - 1, kU - 1] / norms[kU - 1])
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[896, 2048])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, best of {args.repeats}")
    print("projector: the 19 projections given U and V; sweep: eigensolves + projector (what a user waits for)")
    print(f"{'d':>6} {'eigh s':>8} {'pinv x19 s':>11} {'nested s':>9} {'projector ratio':>16} "
          f"{'sweep ratio':>12} {'max |diff|':>11} {'api == nested':>14}")
    for d in args.dims:
        m = random_layer(d, args.classes, seed=d)
        t_eig, (U, V) = best_of(args.repeats, lambda: _reference_subspaces(m, "float64", REFERENCE_ABS_TOL))
        t_pinv, slow = best_of(args.repeats, lambda: pinv_sweep(U, V))
        t_nested, fast = best_of(args.repeats, lambda: nested_sweep(U, V))
        api = ntps_sweep(m, variant="reference", precision="float64").ntps.to_numpy()
        diff = float(np.max(np.abs(fast - slow)))
        print(f"{d:>6} {t_eig:>8.2f} {t_pinv:>11.2f} {t_nested:>9.3f} {t_pinv / t_nested:>16.1f} "
              f"{(t_eig + t_pinv) / (t_eig + t_nested):>12.2f} {diff:>11.2e} {str(np.array_equal(api, fast)):>14}")


if __name__ == "__main__":
    main()
