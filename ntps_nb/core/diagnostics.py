"""Does the score measure the task? Stability and label-dependence diagnostics for both NTPS variants.

A score that is meant to say how well a layer serves a labelled task should (i) respond to the
labels: replacing them by a random permutation should lower it, and (ii) survive rounding: a
perturbation of the moments far below their sampling error should not move it. This module
measures both for one layer, for the two variants of `ntps_nb.core.score`:

- label-permutation null: Sxy is recomputed from the pooled features under random permutations
  of the labels (Syy, Sxx, C0, C1 do not change), and the real NTPS is compared with the null
  (one-sided p-value with the +1 correction, z-score);
- perturbation: every moment M becomes M + scale * ||M||_F / sqrt(size) * E with E standard
  normal (symmetrised for Sxx, Syy, C0), and the largest change of NTPS is reported;
- eigensolvers: scipy against numpy, and (reference variant) float32 against float64.

Why the reference variant fails (ii) (SPEC section 4): it takes U's columns in ASCENDING order,
i.e. from the zero-eigenvalue eigenspace of the rank-C matrix Sxy Sxy^T, where any orthonormal
basis is valid, so rounding and the LAPACK driver decide which subspace enters the score.
`three_dim_example` shows this in three dimensions.

The permutation null reuses everything that does not depend on the labels: the whitening of Sxx
and the nested orthonormal basis of the next-token subspace are computed once
(`TheoryFactorization`, `ReferenceFactorization`), and each permutation only redoes U.

The theory rows can come from another estimator of the population NTPS than the plug-in
(``estimator=``, `ntps_nb.core.estimators.ESTIMATORS`): the estimator is then evaluated on the
real moments, on every perturbed copy and on the moments of every label permutation (a full
evaluation each, no factorisation reused), and ``solver_max_dev`` is not measured (NaN). Only the
pooled estimators can be: the perturbations and permutations act on the pooled moments and the
per-text pooled features, which say nothing of shards, so a shard estimator
(`ntps_nb.core.estimators.SHARD_ESTIMATORS`) is refused with a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg
from jaxtyping import Float

from ntps_nb.core.backends import analysis_backend
from ntps_nb.core.moments import Moments, one_hot
from ntps_nb.core.progress import progress_bar
from ntps_nb.core.score import (
    REFERENCE_FRACTIONS,
    SPAN_RTOL,
    ReferenceGeometry,
    TheoryGeometry,
    reference_geometry,
    reference_geometry_from,
    theory_geometry,
    warn_of_the_sample,
)
from ntps_nb.core.subspaces import (
    A_RANK_RTOL,
    RANGE_RTOL,
    REFERENCE_ABS_TOL,
    Solver,
    check_labels,
    generalized_eigh,
    nested_orthonormal_basis,
    symmetric_eigh,
)


#: Default relative size of the moment perturbation (far below any sampling error).
PERTURB_SCALE = 1e-6
#: A score "survives rounding" when no perturbation of size `PERTURB_SCALE` moves it by this much.
PERTURB_THRESHOLD = 1e-3
#: A score "responds to labels" when its permutation p-value is below this.
SIGNIFICANCE = 0.05
#: Relative Frobenius mismatch allowed between the given moments' Sxx / Sxy and those recomputed
#: from the given features and labels (float32 accumulation stays far below it; another layer's
#: features or misaligned labels are far above it).
FEATURE_MATCH_RTOL = 1e-4
#: A permuted NTPS within this of the real one counts as "at least as large" (ties). The reference
#: variant runs in float32, so its values carry rounding noise of ~1e-7.
PERM_TIE_ATOL = {"theory": 1e-10, "reference": 1e-6}
#: The side of the label-permutation p-value: real NTPS larger than under permuted labels.
PERM_P_SIDE = "one-sided greater"
#: Eigensolver settings compared for ``solver_max_dev``: (precision, solver).
SOLVER_CONFIGS = {
    "theory": (("float64", "scipy"), ("float64", "numpy")),
    "reference": (("float32", "scipy"), ("float32", "numpy"), ("float64", "scipy"), ("float64", "numpy")),
}

_VARIANTS = ("theory", "reference")
_PERTURBED = ("Sxx", "Sxy", "Syy", "C0", "C1")
_SYMMETRIC = ("Sxx", "Syy", "C0")


def _whiten(B: np.ndarray, threshold: float | None, rtol: float, solver: Solver
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q_r, s_r, W = Q_r S_r^{-1/2}) on the retained range of B, as `generalized_eigh` does."""
    s, Q = symmetric_eigh(B, solver)
    cut = float(threshold) if threshold is not None else rtol * max(float(s.max()), 0.0)
    keep = s > cut
    if not keep.any():
        raise ValueError(f"no eigenvalue above the tolerance {cut:.3g}: the matrix is zero or negative definite")
    Q_r, s_r = Q[:, keep], s[keep]
    return Q_r, s_r, Q_r / np.sqrt(s_r)


def _same_unlabelled_moments(base: Moments, other: Moments) -> None:
    for name in ("Sxx", "C0", "C1"):
        if not np.array_equal(getattr(base, name), getattr(other, name)):
            raise ValueError(f"these moments differ from the factorised ones in {name}; only Sxy and Syy may change "
                             "(build them with Moments.with_labels)")


@dataclass(frozen=True, eq=False)
class TheoryFactorization:
    """The label-independent part of `theory_geometry`: Sxx's whitening and V's nested basis.

    ``geometry(m)`` for moments that differ only in Sxy / Syy (``moments.with_labels``) then costs
    one thin SVD of the (r_U, C) matrix W^T Sxy instead of two d x d eigenproblems: the top
    eigenvectors of M = W^T Sxy Sxy^T W are the left singular vectors of W^T Sxy.
    """

    moments: Moments
    range_basis: Float[np.ndarray, "d rU"]
    whitening: Float[np.ndarray, "d rU"]
    v_basis: Float[np.ndarray, "rU q"]
    v_counts: np.ndarray
    r_V: int
    solver: str

    @classmethod
    def from_moments(cls, moments: Moments, *, solver: Solver = "numpy", tol: float | None = None,
                     rtol: float = RANGE_RTOL, span_rtol: float = SPAN_RTOL) -> "TheoryFactorization":
        if moments.n_tokens == 0:
            raise ValueError("no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero")
        Q_r, s_r, W = _whiten(moments.Sxx, tol, rtol, solver)
        _, _, W0 = _whiten(moments.C0, tol, rtol, solver)
        G = W0.T @ moments.C1
        M = G @ G.T
        _, Y = symmetric_eigh((M + M.T) / 2, solver)
        V = W0 @ Y[:, ::-1]  # descending
        v_coords = np.sqrt(s_r)[:, None] * (Q_r.T @ V)  # Sxx^{1/2} V in the range of Sxx
        basis, counts = nested_orthonormal_basis(v_coords, rtol=span_rtol)
        return cls(moments=moments, range_basis=Q_r, whitening=W, v_basis=basis, v_counts=counts,
                   r_V=V.shape[1], solver=solver)

    def geometry(self, moments: Moments) -> TheoryGeometry:
        """`theory_geometry` of moments that share Sxx, C0, C1 with the factorised ones."""
        _same_unlabelled_moments(self.moments, moments)
        check_labels(moments)
        G = self.whitening.T @ moments.Sxy
        if self.solver == "scipy":
            left, sigma, _ = scipy.linalg.svd(G, full_matrices=False)
        else:
            left, sigma, _ = np.linalg.svd(G, full_matrices=False)
        lam = sigma**2
        m = int(np.count_nonzero(lam > A_RANK_RTOL * max(float(lam.max()), np.finfo(np.float64).tiny)))
        if m == 0:
            raise ValueError("Sxy is zero: the pooled states carry no label signal, U is undefined")
        cum = np.cumsum((self.v_basis.T @ left[:, :m]) ** 2, axis=0)
        projected = np.zeros((self.r_V, m))
        has_basis = self.v_counts > 0
        projected[has_basis] = cum[self.v_counts[has_basis] - 1]
        return TheoryGeometry(eigenvalues=lam[:m].copy(), projected=np.clip(projected, 0.0, 1.0), r_V=self.r_V,
                              r_U=self.range_basis.shape[1], trace_Syy=float(np.trace(moments.Syy)))


@dataclass(frozen=True, eq=False)
class ReferenceFactorization:
    """The label-independent part of `reference_geometry`: Sxx's whitening and V (with its nested
    basis), at a chosen precision and eigensolver.

    With ``precision="float32", solver="scipy"`` it repeats the released algorithm operation by
    operation (and so `reference_geometry`); the other settings are the alternatives whose
    disagreement ``solver_max_dev`` reports.
    """

    moments: Moments
    whitening: np.ndarray
    V: np.ndarray
    v_basis: np.ndarray
    v_counts: np.ndarray
    precision: str
    solver: str

    @classmethod
    def from_moments(cls, moments: Moments, *, precision: str = "float32", solver: Solver = "scipy",
                     tol: float = REFERENCE_ABS_TOL, span_rtol: float = SPAN_RTOL) -> "ReferenceFactorization":
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        dtype = np.float32 if precision == "float32" else np.float64
        _, _, W = _whiten(moments.Sxx.astype(dtype), tol, RANGE_RTOL, solver)
        _, _, W0 = _whiten(moments.C0.astype(dtype), tol, RANGE_RTOL, solver)
        C1 = moments.C1.astype(dtype)
        V = cls._reduced(W0, C1 @ C1.T, solver)
        basis, counts = nested_orthonormal_basis(V.astype(np.float64), rtol=span_rtol)
        return cls(moments=moments, whitening=W, V=V, v_basis=basis, v_counts=counts, precision=precision,
                   solver=solver)

    @staticmethod
    def _reduced(W: np.ndarray, A: np.ndarray, solver: Solver) -> np.ndarray:
        # the released code forms W^T A W and keeps eigh's ascending order
        M = W.T @ A @ W
        _, Y = symmetric_eigh((M + M.T) / 2, solver)
        return W @ Y

    def geometry(self, moments: Moments) -> ReferenceGeometry:
        """`reference_geometry` of moments that share Sxx, C0, C1 with the factorised ones."""
        _same_unlabelled_moments(self.moments, moments)
        check_labels(moments)
        Sxy = moments.Sxy.astype(self.whitening.dtype)
        U = self._reduced(self.whitening, Sxy @ Sxy.T, self.solver)
        return reference_geometry_from(U, self.V, self.v_basis, self.v_counts, self.precision)


def _theory_values(geometry: TheoryGeometry, ks: np.ndarray) -> np.ndarray:
    """NTPS_theory at every k of ``ks`` from one geometry; NaN where k exceeds its r_V."""
    out = np.full(ks.shape, np.nan)
    valid = ks <= geometry.r_V
    if valid.any():
        kk = ks[valid]
        kU = np.minimum(kk, geometry.m)
        cum = np.cumsum(geometry.projected, axis=1)
        out[valid] = cum[kk - 1, kU - 1] / kU
    return out


def _reference_values(geometry: ReferenceGeometry, fractions: np.ndarray) -> np.ndarray:
    return np.array([geometry.ntps(float(f)) for f in fractions])


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        return [value]
    if np.ndim(value) == 0:
        return [value]
    return list(np.asarray(value).ravel()) if not isinstance(value, (list, tuple)) else list(value)


def _variants(variant: str | Sequence[str]) -> list[str]:
    chosen = []
    for v in _as_list(variant) or []:
        if v not in _VARIANTS:
            raise ValueError(f"variant must be 'theory' or 'reference' (or a list of them), got {v!r}")
        if v not in chosen:
            chosen.append(v)
    if not chosen:
        raise ValueError("no variant given")
    return chosen


def _count(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or int(value) != value or int(value) < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _theory_ks(k: Any, fraction: Any, r_V: int) -> tuple[np.ndarray, np.ndarray]:
    """(ks, fractions) of the theory rows: k if given, else int(fraction * r_V), else every k."""
    ks = _as_list(k)
    if ks is not None:
        for value in ks:
            if isinstance(value, (bool, np.bool_)) or int(value) != value:
                raise ValueError(f"k must be an integer (or a list of integers), got {value!r}")
        ks = np.array([int(v) for v in ks])
        fractions = ks / r_V
    elif fraction is not None:
        fractions = np.array(_fractions(fraction, upper_inclusive=True), dtype=np.float64)
        ks = np.array([int(f * r_V) for f in fractions])
        if np.any(ks < 1):
            raise ValueError(f"fraction {fractions[ks < 1][0]} of the retained rank r_V = {r_V} selects no direction")
    else:
        ks = np.arange(1, r_V + 1)
        fractions = ks / r_V
    bad = (ks < 1) | (ks > r_V)
    if bad.any():
        raise ValueError(f"k = {int(ks[bad][0])} is outside 1..r_V = {r_V} (the retained rank of C0)")
    return ks, fractions


def _fractions(fraction: Any, *, upper_inclusive: bool) -> list[float]:
    values = [float(f) for f in _as_list(fraction)]
    for f in values:
        if not (0 < f < 1 or (upper_inclusive and f == 1)):
            raise ValueError(f"fraction must lie in (0, {'1]' if upper_inclusive else '1)'}, got {f}")
    return values


def _label_design(moments: Moments, features: Any, labels: Any, rtol: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (X, Y, shift): Sxy under permuted labels is X^T Y[perm] / N - shift."""
    X = np.asarray(features, dtype=np.float64)
    label_array = np.asarray(labels)
    if X.ndim != 2:
        raise ValueError(f"features must be an (N, d) array of pooled states, got shape {X.shape}")
    if label_array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {label_array.shape}")
    if X.shape[0] != label_array.shape[0]:
        raise ValueError(f"features have {X.shape[0]} rows but there are {label_array.shape[0]} labels")
    if X.shape[1] != moments.d:
        raise ValueError(f"features have dimension {X.shape[1]}, the moments d = {moments.d}")
    if not np.all(np.isfinite(X)):
        raise ValueError("features contain NaN/inf")
    Y = one_hot(label_array, moments.n_classes)
    n = X.shape[0]
    Sxx, Sxy = X.T @ X / n, X.T @ Y / n
    shift = np.zeros_like(Sxy)
    if moments.is_centred:
        x_mean = X.mean(axis=0)
        Sxx = Sxx - np.outer(x_mean, x_mean)
        shift = np.outer(x_mean, Y.mean(axis=0))
        Sxy = Sxy - shift
    for name, ours in (("Sxx", Sxx), ("Sxy", Sxy)):
        given = getattr(moments, name)
        mismatch = np.linalg.norm(ours - given) / max(float(np.linalg.norm(given)), np.finfo(float).tiny)
        if mismatch > rtol:
            raise ValueError(
                f"the features and labels do not reproduce the moments' {name}: relative mismatch {mismatch:.3g} > "
                f"{rtol:g} (features of another layer or split, or labels in another order?)")
    return X, Y, shift


def _perturb(moments: Moments, scale: float, rng: np.random.Generator) -> Moments:
    """M + scale * ||M||_F / sqrt(size) * E for the five moments NTPS reads; new arrays only."""
    changed = {}
    for name in _PERTURBED:
        M = getattr(moments, name)
        E = rng.standard_normal(M.shape)
        if name in _SYMMETRIC:
            E = (E + E.T) / math.sqrt(2.0)  # unit variance off the diagonal, symmetric
        changed[name] = M + scale * np.linalg.norm(M) / math.sqrt(M.size) * E
    return replace(moments, **changed)


def _column_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per column: max, min, mean, std (ddof 1) over the finite entries; NaN where too few, no warnings."""
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    filled = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(axis=0) / n, np.nan)
        var = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0) / (n - 1)
    return {"max": np.where(n > 0, np.where(finite, values, -np.inf).max(axis=0, initial=-np.inf), np.nan),
            "min": np.where(n > 0, np.where(finite, values, np.inf).min(axis=0, initial=np.inf), np.nan),
            "mean": mean, "std": np.where(n > 1, np.sqrt(var), np.nan), "n": n}


def _tail(real: np.ndarray, null: np.ndarray, atol: float) -> dict[str, np.ndarray]:
    """Per configuration (columns of ``null``): mean, std, one-sided p (+1 corrected), z."""
    stats = _column_stats(null)
    hits = np.sum(np.isfinite(null) & (null >= real[None, :] - atol), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(np.isfinite(real) & (stats["n"] > 0), (1.0 + hits) / (1.0 + stats["n"]), np.nan)
        z = np.where(stats["std"] > atol, (real - stats["mean"]) / stats["std"], np.nan)
    return {"perm_mean": stats["mean"], "perm_std": stats["std"], "p_value": p, "p_side": PERM_P_SIDE,
            "perm_z": z}



def _solver_geometries(moments: Moments, name: str, configs: Sequence[tuple[str, str]]) -> list:
    """The variant's geometry of the moments under each host eigensolver setting (precision, solver)."""
    if name == "theory":
        return [TheoryFactorization.from_moments(moments, solver=solver).geometry(moments) for _, solver in configs]
    return [ReferenceFactorization.from_moments(moments, precision=precision, solver=solver).geometry(moments)
            for precision, solver in configs]


def _solver_values(moments: Moments, name: str, ks: np.ndarray | None, fractions: np.ndarray) -> list[np.ndarray]:
    """NTPS at the grid (ks for the theory variant, fractions for the reference) under each host
    eigensolver setting of `SOLVER_CONFIGS`."""
    return [_theory_values(g, ks) if name == "theory" else _reference_values(g, fractions)
            for g in _solver_geometries(moments, name, SOLVER_CONFIGS[name])]


def host_solver_values(moments: Moments, variant: str, *, k: Any = None, fraction: Any = None,
                       configs: Sequence[tuple[str, str]] | None = None) -> list[np.ndarray]:
    """The host eigensolver settings' NTPS of one variant, at the grid `ntps_diagnostics` would use
    for the same ``k`` / ``fraction``: what its ``solver_max_dev`` compares, computed apart (the
    study computes them for every layer at once, beside the device work) and handed back as
    ``ntps_diagnostics(..., solvers={variant: values})``.

    Parameters
    ----------
    moments : the layer's `Moments`.
    variant : "theory" or "reference".
    k, fraction : as in `ntps_diagnostics` for that variant.
    configs : some of the settings ``SOLVER_CONFIGS[variant]`` (precision, solver), to compute
        them apart (in parallel); default all of them.

    Returns
    -------
    list of (G,) float arrays, one per setting of ``configs``, in its order.
    """
    if variant not in SOLVER_CONFIGS:
        raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")
    chosen = list(SOLVER_CONFIGS[variant]) if configs is None else [tuple(c) for c in configs]
    unknown = [c for c in chosen if c not in SOLVER_CONFIGS[variant]]
    if unknown:
        raise ValueError(f"unknown solver settings {unknown} for the {variant} variant; choose from "
                         f"{list(SOLVER_CONFIGS[variant])}")
    geometries = _solver_geometries(moments, variant, chosen)
    if variant == "theory":
        ks = _theory_ks(k, fraction if k is None else None, geometries[0].r_V)[0] if geometries else np.array([], int)
        return [_theory_values(g, ks) for g in geometries]
    fractions = np.array(_fractions(fraction, upper_inclusive=False) if fraction is not None
                         else REFERENCE_FRACTIONS, dtype=np.float64)
    return [_reference_values(g, fractions) for g in geometries]


#: A worker process's BLAS bound (`_bind_worker`), kept for the worker's life.
_WORKER_BOUND: list = []


def _bind_worker(threads: int) -> None:
    """A `HostSolverProcesses` worker's start: bound its BLAS threads to ``threads``."""
    from ntps_nb.core.threads import analysis_threads

    _WORKER_BOUND.append(analysis_threads(threads))


def _setting_values(moments: Moments, variant: str, config: tuple[str, str], grid: Mapping[str, Any]) -> np.ndarray:
    """One host eigensolver setting's NTPS (a worker's task). ``grid``: ``ks`` and ``fractions``
    (the caller's grid, evaluated as given) or `host_solver_values`'s ``k`` / ``fraction``."""
    if "fractions" in grid:
        geometry = _solver_geometries(moments, variant, [tuple(config)])[0]
        if variant == "theory":
            return _theory_values(geometry, np.asarray(grid["ks"]))
        return _reference_values(geometry, np.asarray(grid["fractions"], dtype=np.float64))
    return host_solver_values(moments, variant, configs=[config], **grid)[0]


class HostSolverProcesses:
    """Host eigensolver settings (what ``solver_max_dev`` compares) computed in worker processes,
    one setting a task, while this process drives a device.

    scipy's LAPACK wrappers keep the GIL for a whole factorisation (numpy's release it): in a thread,
    a scipy eigh of a 4096 x 4096 matrix stops the thread that launches the device's work for as long
    as it takes (measured on an H200 host: a theory interval sweep took 174.7 s beside the
    comparison's threads against 57.9 s alone). Worker processes do not share the GIL. They are
    joblib's loky workers: fresh interpreters (safe beside an initialised CUDA context and running
    BLAS threads) that, unlike ``multiprocessing``'s spawn, do not re-run the calling script, so a
    script needs no ``if __name__ == "__main__"`` guard. Each binds its BLAS threads to ``threads``
    when it starts; tasks receive the moments without ``Shh`` (no geometry reads it).

    Parameters
    ----------
    workers : worker processes, a positive integer.
    threads : BLAS threads of each worker, a positive integer.
    """

    def __init__(self, workers: int, threads: int):
        from joblib.externals.loky import ProcessPoolExecutor  # joblib: a dependency of scikit-learn

        if int(workers) < 1 or int(threads) < 1:
            raise ValueError(f"workers and threads must be positive, got {workers} and {threads}")
        self.threads = int(threads)
        self.pool = ProcessPoolExecutor(max_workers=int(workers), initializer=_bind_worker, initargs=(self.threads,))

    @classmethod
    def beside_device(cls, n_tasks: int) -> "HostSolverProcesses":
        """Workers for ``n_tasks`` settings sharing the BLAS bound in force (the largest BLAS pool's
        threads) less one core, which stays with the thread that drives the device.

        Parameters
        ----------
        n_tasks : how many settings will be submitted (at most that many workers start).

        Returns
        -------
        HostSolverProcesses
        """
        from threadpoolctl import threadpool_info

        bounds = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        budget = max(1, (max(bounds) if bounds else 1) - 1)
        workers = max(1, min(int(n_tasks), budget))
        return cls(workers, max(1, budget // workers))

    def submit(self, moments: Moments, variant: str, config: tuple[str, str], **grid: Any):
        """Start one setting's values.

        Parameters
        ----------
        moments : the layer's `Moments`.
        variant : "theory" or "reference".
        config : one setting (precision, solver) of ``SOLVER_CONFIGS[variant]``.
        **grid : ``k`` or ``fraction`` as in `host_solver_values`, or ``ks`` and ``fractions``: a
            grid computed by the caller's own solve, evaluated as given.

        Returns
        -------
        concurrent.futures.Future
            Of the (G,) float array of that setting's NTPS at the grid.
        """
        if variant not in SOLVER_CONFIGS or tuple(config) not in SOLVER_CONFIGS[variant]:
            raise ValueError(f"unknown solver setting {config!r} for variant {variant!r}; choose from {SOLVER_CONFIGS}")
        light = replace(moments, Shh=None) if moments.Shh is not None else moments
        return self.pool.submit(_setting_values, light, variant, tuple(config), dict(grid))

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after their tasks, or (``cancel``) at once, dropping the queued tasks and
        terminating the running ones (an interrupted analysis does not wait for a factorisation of
        minutes whose result nobody reads).

        Parameters
        ----------
        cancel : drop the queued tasks and terminate the running ones.

        Returns
        -------
        None
        """
        # loky fails the queued futures itself when it kills the workers (cancelling them first makes
        # its manager thread raise InvalidStateError)
        self.pool.shutdown(wait=True, kill_workers=cancel)

    def __enter__(self) -> "HostSolverProcesses":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(cancel=exc_info[0] is not None)


def solver_deviations(variants: Sequence[str], grids: dict, solvers: Any, compute, *,
                      compared: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``solver_max_dev`` per variant: the spread (max - min) of NTPS over this computation's own
    solve and the host settings' values, which ``solvers`` gives (a mapping variant -> the list
    `host_solver_values` returns) or asks to compute (True: ``compute(variant)``; False: none).

    Parameters
    ----------
    variants : the variants of the frame.
    grids : per variant, at least ``ntps`` (this computation's values at the grid).
    solvers : bool or mapping, as in `ntps_diagnostics`.
    compute : callable variant -> list of arrays, used when ``solvers`` is True.
    compared : the variants that get a spread (default: all); the others stay NaN.

    Returns
    -------
    dict variant -> (G,) array, NaN where not compared.
    """
    out = {name: np.full(len(grids[name]["ntps"]), np.nan) for name in variants}
    if solvers is False or solvers is None:
        return out
    for name in (variants if compared is None else compared):
        if isinstance(solvers, Mapping):
            if name not in solvers:
                raise ValueError(f"solvers= gives host solver values for {sorted(solvers)}, not for {name!r}")
            values = [np.asarray(v, dtype=np.float64) for v in solvers[name]]
            if len(values) != len(SOLVER_CONFIGS[name]) or any(v.shape != out[name].shape for v in values):
                raise ValueError(f"solvers[{name!r}] must be {len(SOLVER_CONFIGS[name])} arrays of {out[name].size} "
                                 "values (host_solver_values at the same k / fraction)")
        elif solvers is True:
            values = compute(name)
        else:
            raise ValueError(f"solvers must be True, False or a mapping variant -> host_solver_values, got {solvers!r}")
        spread = _column_stats(np.vstack([grids[name]["ntps"], *values]))
        out[name] = spread["max"] - spread["min"]
    return out


def check_diagnostics_inputs(moments, features, labels, variant, n_perturb, n_permutations,
                             perturb_scale) -> tuple[list[str], int, int]:
    """The argument checks of `ntps_diagnostics` (shared with the torch backend), in its order.

    Parameters
    ----------
    moments, features, labels, variant, n_perturb, n_permutations, perturb_scale : as in
        `ntps_diagnostics`.

    Returns
    -------
    (variants, n_perturb, n_permutations) : the variants to compute and the two checked counts.
    """
    if not isinstance(moments, Moments):
        raise TypeError(f"moments must be a Moments, got {type(moments).__name__}")
    variants = _variants(variant)
    n_perturb = _count(n_perturb, "n_perturb")
    n_permutations = _count(n_permutations, "n_permutations")
    if not (np.isfinite(perturb_scale) and perturb_scale > 0):
        raise ValueError(f"perturb_scale must be a positive number, got {perturb_scale!r}")
    if (features is None) != (labels is None):
        raise ValueError("give both features and labels (for the label-permutation null), or neither")
    if n_permutations > 0 and features is None:
        raise ValueError(f"n_permutations = {n_permutations} asks for the label-permutation null, which needs the "
                         "pooled features and labels; pass them, or n_permutations=0 to skip the null")
    if n_permutations == 0 and features is not None:
        raise ValueError("features and labels were given but n_permutations = 0: pass n_permutations >= 1 for the "
                         "label-permutation null, or leave features and labels out to skip it")
    return variants, n_perturb, n_permutations


def diagnostics_frame(variants, grids: dict, perturbed: dict, null: dict, rank_changes: dict, solver_dev: dict, *,
                      n_perturb: int, n_permutations: int, perturb_scale: float, seed: int, estimator: str,
                      provenance: dict) -> pd.DataFrame:
    """The table of `ntps_diagnostics` from its parts (shared with the torch backend's copy).

    Parameters
    ----------
    variants : the variants computed, in order.
    grids : per variant, the real NTPS grid: ``ntps``, ``ranks`` (r_U, r_V), ``fractions`` and, for
        the theory variant, ``geometry`` and ``ks``; for the reference variant, ``counts``.
    perturbed, null : per variant, (n_perturb, K) perturbed and (n_permutations, K) label-null values.
    rank_changes, solver_dev : per variant, the perturbed copies whose ranks changed and the solver
        spread per row.
    n_perturb, n_permutations, perturb_scale, seed, estimator : as in `ntps_diagnostics`.
    provenance : constant columns added to every row.

    Returns
    -------
    DataFrame with the columns of `ntps_diagnostics`.
    """
    frames = []
    for name in variants:
        grid = grids[name]
        real = grid["ntps"]
        n_rows = real.size
        max_dev = _column_stats(np.abs(perturbed[name] - real[None, :]))["max"]
        std = _column_stats(perturbed[name])["std"]
        tail = (_tail(real, null[name], PERM_TIE_ATOL[name]) if n_permutations
                else {**dict.fromkeys(("perm_mean", "perm_std", "p_value"), np.full(n_rows, np.nan)),
                      "p_side": PERM_P_SIDE, "perm_z": np.full(n_rows, np.nan)})
        r_U, r_V = grid["ranks"]
        if name == "theory":
            geometry = grid["geometry"]
            ks = grid["ks"]
            columns = {"k": pd.array(ks, dtype="Int64"), "fraction": grid["fractions"],
                       "k_U": pd.array(np.minimum(ks, geometry.m), dtype="Int64"), "k_V": pd.array(ks, dtype="Int64"),
                       "m": pd.array([geometry.m] * n_rows, dtype="Int64"), "precision": "float64"}
        else:  # k is a theory notion; the reference rows are indexed by fraction
            columns = {"k": pd.array([pd.NA] * n_rows, dtype="Int64"), "fraction": grid["fractions"],
                       "k_U": pd.array(grid["counts"][:, 0], dtype="Int64"),
                       "k_V": pd.array(grid["counts"][:, 1], dtype="Int64"),
                       "m": pd.array([pd.NA] * n_rows, dtype="Int64"), "precision": "float32"}
        frames.append(pd.DataFrame({
            "variant": name, "estimator": estimator if name == "theory" else "plugin", **columns, "r_U": r_U, "r_V": r_V, "ntps": real,
            "perturb_max_dev": max_dev, "perturb_std": std, "perturb_rank_changes": rank_changes[name] if n_perturb else 0,
            **tail, "solver_max_dev": solver_dev[name], "n_perturb": n_perturb, "perturb_scale": float(perturb_scale),
            "n_permutations": n_permutations, "seed": seed, **provenance,
        }, index=pd.RangeIndex(n_rows)))
    return pd.concat(frames, ignore_index=True)


def ntps_diagnostics(
    moments: Moments,
    features: Float[np.ndarray, "N d"] | None = None,
    labels: Iterable[int] | None = None,
    *,
    variant: str | Sequence[str] = "theory",
    k: int | Sequence[int] | None = None,
    fraction: float | Sequence[float] | None = None,
    n_perturb: int = 20,
    perturb_scale: float = PERTURB_SCALE,
    n_permutations: int = 100,
    seed: int = 0,
    solvers: bool = True,
    feature_rtol: float = FEATURE_MATCH_RTOL,
    estimator: str = "plugin",
    device: Any = None,
    progress: bool = True,
    **provenance: Any,
) -> pd.DataFrame:
    """Stability and label dependence of NTPS for one layer, at a grid of k / fractions, in one call.

    Parameters
    ----------
    moments : the layer's `Moments` (never modified).
    features : (N, d) pooled states the moments' perception side came from; needed for the
        label-permutation null, and checked against ``moments`` (Sxx and Sxy within
        ``feature_rtol``), which catches another layer's features or misaligned labels.
    labels : (N,) integer labels, aligned with ``features``.
    variant : "theory", "reference" or a list of both.
    k : theory only: one k or a list. Without it, the theory rows come from ``fraction``
        (k = int(fraction * r_V)) or, if that is absent too, from every k = 1..r_V.
    fraction : one fraction or a list; the reference rows come from it (default: the released 19
        fractions, where ones that select no direction give NaN); the theory rows use it only
        when ``k`` is not given.
    n_perturb : number of perturbed copies of the moments; 0 skips (perturb columns NaN).
    perturb_scale : relative size of each perturbation: M + scale * ||M||_F / sqrt(size) * E,
        E standard normal, symmetrised for Sxx, Syy and C0.
    n_permutations : number of label permutations. It must be >= 1 when features and labels are
        given and 0 when they are not: 0 means "skip the null" (perm columns NaN), and giving
        features with 0 is rejected as a contradictory request.
    seed : seeds the perturbations and the permutations (independent streams, shared by the
        variants, so their rows are paired).
    solvers : also compute ``solver_max_dev``: the largest disagreement of NTPS between
        eigensolver settings, scipy vs numpy in float64 for the theory variant (it is defined in
        float64) and {float32, float64} x {scipy, numpy} for the reference variant. Or a mapping
        variant -> `host_solver_values` at the same k / fraction, computed elsewhere (the study
        computes every layer's at once, in worker processes beside the device work).
    feature_rtol : tolerance of the features-vs-moments check.
    estimator : the estimator of the theory rows: "plugin" (default) or a pooled estimator of
        `ntps_nb.core.estimators.ESTIMATORS` (one not in ``SHARD_ESTIMATORS``; uncentred moments,
        theory variant only), evaluated on the real, perturbed and permuted moments alike; its
        rows have ``solver_max_dev`` NaN. A shard estimator raises a ValueError (module docstring).
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...):
        the same frame from `ntps_nb.core.backends.torch.ntps_diagnostics_torch`.
    progress : a bar over the perturbed copies and permutations, shown once the call has run
        `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds (on a torch device advanced a solved block at a time).
    **provenance : constant columns (model, dataset, layer, ...) added to every row.

    The theory rows' unperturbed NTPS comes with the warnings `ntps_nb.core.score.ntps_sweep` gives it
    (`ntps_nb.core.score.warn_of_the_sample`: no more texts than the rank of Sxx, tied next-token eigenvalues at
    one of its k, rounded moments); the perturbed copies and permutations say nothing.

    Returns
    -------
    DataFrame, one row per (variant, k or fraction), with columns variant, estimator (the theory
    rows' ``estimator``; "plugin" for the reference rows), k, fraction, k_U, k_V,
    m (theory), r_U, r_V, precision, ntps (unperturbed), perturb_max_dev (max |NTPS_perturbed -
    NTPS|), perturb_std, perturb_rank_changes (perturbed copies whose retained ranks r_U / r_V
    differ), perm_mean, perm_std, p_value ((1 + #{null >= real}) / (1 + n)) with p_side
    "one-sided greater" (real NTPS larger than under permuted labels), perm_z, solver_max_dev, n_perturb, perturb_scale,
    n_permutations, seed, then the provenance columns.
    """
    backend = analysis_backend(device)
    if backend is not None:
        return backend.ntps_diagnostics_torch(
            moments, features, labels, variant=variant, k=k, fraction=fraction, n_perturb=n_perturb,
            perturb_scale=perturb_scale, n_permutations=n_permutations, seed=seed, solvers=solvers,
            feature_rtol=feature_rtol, device=device, estimator=estimator, progress=progress, **provenance)
    variants, n_perturb, n_permutations = check_diagnostics_inputs(moments, features, labels, variant, n_perturb,
                                                                   n_permutations, perturb_scale)
    _check_diagnostics_estimator(estimator, variants, moments)
    clash = set(provenance) & {"variant", "estimator", "k", "fraction", "ntps", "seed", "n_perturb", "n_permutations"}
    if clash:
        raise ValueError(f"provenance names {sorted(clash)} clash with result columns")
    if variants == ["reference"] and k is not None:
        raise ValueError("the reference variant takes fraction= (its k_U, k_V are int(fraction * rank)), not k=")
    if variants == ["theory"] and k is not None and fraction is not None:
        raise ValueError("give k or fraction for the theory variant, not both")

    if n_permutations:  # checked before any eigensolve: wrong features fail fast
        X, Y, shift = _label_design(moments, features, labels, feature_rtol)

    # Unperturbed geometry and the grid of each variant.
    grids: dict[str, dict[str, Any]] = {}
    plugin = estimator == "plugin"
    if "theory" in variants:
        geometry = theory_geometry(moments)
        ks, fracs = _theory_ks(k, fraction if k is None else None, geometry.r_V)
        warn_of_the_sample(moments, [moments], geometry, ks, estimator=estimator)
        real = _theory_values(geometry, ks) if plugin else _estimated(moments, ks, estimator, seed)
        grids["theory"] = {"ks": ks, "fractions": fracs, "ntps": real,
                           "ranks": (geometry.r_U, geometry.r_V), "geometry": geometry}
    if "reference" in variants:
        geometry = reference_geometry(moments)
        explicit = fraction is not None
        fracs = np.array(_fractions(fraction, upper_inclusive=False) if explicit else REFERENCE_FRACTIONS, float)
        counts = np.array([geometry.counts_at(f) for f in fracs], dtype=np.int64).reshape(-1, 2)
        if explicit and np.any(counts < 1):
            bad = int(np.argmax(np.any(counts < 1, axis=1)))
            raise ValueError(f"fraction {fracs[bad]} selects k_U = {counts[bad, 0]}, k_V = {counts[bad, 1]} directions "
                             f"(r_U = {geometry.r_U}, r_V = {geometry.r_V})")
        grids["reference"] = {"fractions": fracs, "counts": counts, "ntps": _reference_values(geometry, fracs),
                              "ranks": (geometry.r_U, geometry.r_V), "geometry": geometry}

    def evaluate(name: str, geometry: TheoryGeometry | ReferenceGeometry) -> np.ndarray:
        if name == "theory":
            return _theory_values(geometry, grids[name]["ks"])
        return _reference_values(geometry, grids[name]["fractions"])

    perturb_seq, perm_seq = np.random.SeedSequence(seed).spawn(2)

    # Perturbations: one perturbed copy at a time (memory O(d^2)), every variant evaluated on it.
    perturbed = {name: np.full((n_perturb, len(grids[name]["ntps"])), np.nan) for name in variants}
    rank_changes = dict.fromkeys(variants, 0)
    with progress_bar(n_perturb + n_permutations, "ntps_diagnostics", progress, unit="copy") as bar:
        rng = np.random.default_rng(perturb_seq)
        for i in range(n_perturb):
            copy = _perturb(moments, perturb_scale, rng)
            for name in variants:
                geometry = theory_geometry(copy) if name == "theory" else reference_geometry(copy)
                perturbed[name][i] = (evaluate(name, geometry) if plugin or name != "theory"
                                      else _estimated(copy, grids[name]["ks"], estimator, seed))
                rank_changes[name] += int((geometry.r_U, geometry.r_V) != grids[name]["ranks"])
            bar.update(1)

        # Label-permutation null: only Sxy changes, so U is redone on factorised Sxx and V.
        null = {name: np.full((n_permutations, len(grids[name]["ntps"])), np.nan) for name in variants}
        if n_permutations:
            factor = {"theory": TheoryFactorization.from_moments(moments) if "theory" in variants and plugin else None,
                      "reference": ReferenceFactorization.from_moments(moments) if "reference" in variants else None}
            rng = np.random.default_rng(perm_seq)
            XT = X.T / X.shape[0]
            for b in range(n_permutations):
                permuted = moments.with_labels(XT @ Y[rng.permutation(Y.shape[0])] - shift, moments.Syy)
                for name in variants:
                    null[name][b] = (evaluate(name, factor[name].geometry(permuted)) if factor[name] is not None
                                     else _estimated(permuted, grids[name]["ks"], estimator, seed))
                bar.update(1)

    # Eigensolver settings.
    solver_dev = solver_deviations(variants, grids, solvers,
                                   lambda name: _solver_values(moments, name, grids[name].get("ks"),
                                                               grids[name]["fractions"]),
                                   compared=[v for v in variants if plugin or v != "theory"])

    return diagnostics_frame(variants, grids, perturbed, null, rank_changes, solver_dev, n_perturb=n_perturb,
                             n_permutations=n_permutations, perturb_scale=perturb_scale, seed=seed,
                             estimator=estimator, provenance=provenance)


def _check_diagnostics_estimator(estimator: str, variants: list[str], moments: Moments) -> None:
    """A known estimator that the diagnostics can evaluate on these moments, or a ValueError."""
    from ntps_nb.core.estimators import ESTIMATORS, SHARD_ESTIMATORS

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "plugin":
        return
    if estimator in SHARD_ESTIMATORS:
        pooled = tuple(e for e in ESTIMATORS if e not in SHARD_ESTIMATORS)
        raise ValueError(f"estimator {estimator!r} needs per-shard moments, and the diagnostics perturb the pooled "
                         "moments and permute the labels of the pooled features, which hold no shards; use one of "
                         f"the pooled estimators {pooled}")
    if "reference" in variants:
        raise ValueError("the reference variant is the released algorithm, computed from the pooled moments; "
                         f"estimator={estimator!r} applies to the theory variant only (variant='theory')")
    if moments.is_centred:
        raise ValueError(f"estimator={estimator!r} takes uncentred moments; centred moments are an option of the "
                         "plug-in")


def _estimated(moments: Moments, ks: np.ndarray, estimator: str, seed: int) -> np.ndarray:
    """A (pooled) estimator of NTPS at ``ks`` on one set of moments."""
    from ntps_nb.core.estimators import estimate_ntps

    return estimate_ntps(moments, ks, estimator=estimator, seed=seed).estimate


def label_null_p_value(frame: pd.DataFrame) -> pd.DataFrame:
    """A diagnostics table with its label-permutation p-value under the package's result names.

    Tables written before version 2 of the study's diagnostics stage name the p-value ``perm_p``; this returns a copy where it is ``p_value``,
    with ``p_side`` = `PERM_P_SIDE` ("one-sided greater": real NTPS above the permutation null)
    beside it. A table that already has ``p_value`` keeps it. Committed tables are read as they are.

    Parameters
    ----------
    frame : DataFrame
        Output of `ntps_diagnostics` or a stored diagnostics table, one row per configuration.

    Returns
    -------
    DataFrame
        A copy with ``p_value`` and ``p_side`` in place of ``perm_p`` (same rows, same order).
    """
    out = frame.copy()
    if "p_value" not in out.columns and "perm_p" in out.columns:
        position = list(out.columns).index("perm_p")
        out = out.rename(columns={"perm_p": "p_value"})
        out.insert(position + 1, "p_side", PERM_P_SIDE)
    elif "p_value" in out.columns and "p_side" not in out.columns:
        out["p_side"] = PERM_P_SIDE
    return out


def stability_summary(
    frame: pd.DataFrame, *, threshold: float = PERTURB_THRESHOLD, alpha: float = SIGNIFICANCE,
    by: Sequence[str] = ("variant",),
) -> pd.DataFrame:
    """Per variant (or per ``by`` group): does the score respond to labels, does it survive rounding?

    ``responds_to_labels``: in at least half of the configurations the permutation p-value is below
    ``alpha``. ``survives_rounding``: no configuration moved by ``threshold`` or more under the
    perturbations. ``statement`` says both in words, with the numbers.

    Parameters
    ----------
    frame : DataFrame
        Output of `ntps_diagnostics` (or a stored diagnostics table: its ``perm_p`` is read as
        ``p_value``, see `label_null_p_value`), one row per configuration.
    threshold : float
        Largest perturbation deviation of NTPS that still "survives rounding".
    alpha : float
        Significance level of the label-permutation p-value.
    by : sequence of str
        Columns whose groups are summarised separately.

    Returns
    -------
    DataFrame
        One row per group: the ``by`` columns, ``n_configs``, ``median_ntps``,
        ``share_label_responsive``, ``median_perm_p`` (median p-value of the label null),
        ``max_perturb_dev``, ``max_solver_dev``, ``responds_to_labels``, ``survives_rounding``
        (None when not run), ``statement``.
    """
    frame = label_null_p_value(frame)
    missing = [c for c in (*by, "p_value", "perturb_max_dev", "perturb_scale") if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; pass the output of ntps_diagnostics")
    rows = []
    for key, group in frame.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        p = group["p_value"].to_numpy(dtype=float)
        dev = group["perturb_max_dev"].to_numpy(dtype=float)
        tested = np.isfinite(p)
        share = float(np.mean(p[tested] < alpha)) if tested.any() else np.nan
        worst = float(np.nanmax(dev)) if np.isfinite(dev).any() else np.nan
        responds = bool(share >= 0.5) if tested.any() else None
        survives = bool(worst < threshold) if np.isfinite(worst) else None
        solver = group["solver_max_dev"].to_numpy(dtype=float) if "solver_max_dev" in group else np.array([np.nan])
        scale = float(group["perturb_scale"].iloc[0])
        name = ", ".join(str(v) for v in key)
        label_text = ("label null not run" if responds is None else
                      f"{'responds' if responds else 'does not respond'} to labels (permutation p < {alpha:g} in "
                      f"{int(np.sum(p[tested] < alpha))}/{int(tested.sum())} configurations)")
        rounding_text = ("perturbations not run" if survives is None else
                         f"a {scale:.0e} relative perturbation moves it by up to {worst:.2g} "
                         f"({'survives' if survives else 'does NOT survive'} rounding, threshold {threshold:g})")
        rows.append({**dict(zip(by, key)), "n_configs": len(group), "median_ntps": float(group["ntps"].median()),
                     "share_label_responsive": share, "median_perm_p": float(np.nanmedian(p)) if tested.any() else np.nan,
                     "max_perturb_dev": worst,
                     "max_solver_dev": float(np.nanmax(solver)) if np.isfinite(solver).any() else np.nan,
                     "responds_to_labels": responds, "survives_rounding": survives,
                     "statement": f"{name}: {label_text}; {rounding_text}."})
    return pd.DataFrame(rows)


def three_dim_example(eps: float = 1e-9) -> dict[str, Any]:
    """Three dimensions, A = a a^T of rank 1, B = I: the ascending-order "first" eigenvector is
    arbitrary, the descending-order one is not.

    The eigenvalues of A are (0, 0, |a|^2). Two perturbations of relative size ``eps``, one along
    each of two orthonormal directions b1, b2 of the zero eigenspace (a^T b = 0), leave the top
    eigenvector at a / |a| but make the first ascending eigenvector b1 in one case and b2 in the
    other: two equally valid answers, orthogonal to each other. Unperturbed, scipy and numpy each
    pick some vector of the plane; which one is up to the driver.

    Parameters
    ----------
    eps : float
        Relative size of the two perturbations (of ||A||).

    Returns
    -------
    dict
        ``A`` (3, 3), ``a`` (3,), ``zero_space`` (3, 2), ``eps``, ``frame`` (one row per (case,
        order): eigenvalue and components of the first vector, its |cosine| with a/|a|, and its
        norm inside the zero eigenspace), ``ascending_overlap`` (|cos| between the two perturbed
        ascending-first vectors, ~0) and ``descending_overlap`` (same for the top vectors, ~1).
    """
    a = np.array([1.0, 2.0, 2.0])
    A = np.outer(a, a)
    # orthonormal basis of the plane a^T x = 0
    b1 = np.array([2.0, -1.0, 0.0]) / math.sqrt(5.0)
    b2 = np.cross(a / np.linalg.norm(a), b1)
    size = eps * np.linalg.norm(A)
    cases = {
        "+eps along b2": ("numpy", A + size * np.outer(b2, b2)),
        "+eps along b1": ("numpy", A + size * np.outer(b1, b1)),
        "exact (scipy)": ("scipy", A),
        "exact (numpy)": ("numpy", A),
    }
    rows, firsts = [], {}
    for case, (solver, matrix) in cases.items():
        for order in ("ascending", "descending"):
            if case.startswith("+eps"):  # the package's solver, with the order stated explicitly
                sub = generalized_eigh(np.eye(3), A=matrix, order=order, tol=0.0)
                value, vector = float(sub.eigenvalues[0]), sub.vectors[:, 0]
            else:  # the two LAPACK front ends on the same exact matrix
                evals, evecs = symmetric_eigh(matrix, solver)
                pick = 0 if order == "ascending" else -1
                value, vector = float(evals[pick]), evecs[:, pick]
            firsts[(case, order)] = vector
            rows.append({"case": case, "order": order, "eigenvalue": value, "x": vector[0], "y": vector[1],
                         "z": vector[2], "abs_cos_with_a": abs(float(vector @ a)) / np.linalg.norm(a),
                         "norm_in_zero_space": float(np.linalg.norm(np.column_stack([b1, b2]).T @ vector))})
    overlap = {order: abs(float(firsts[("+eps along b2", order)] @ firsts[("+eps along b1", order)]))
               for order in ("ascending", "descending")}
    return {"A": A, "a": a, "zero_space": np.column_stack([b1, b2]), "eps": eps, "frame": pd.DataFrame(rows),
            "ascending_overlap": overlap["ascending"], "descending_overlap": overlap["descending"]}
