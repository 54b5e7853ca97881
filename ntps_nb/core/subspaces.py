"""Generalized eigenproblems behind the perception subspace U and the next-token subspace V.

For a pair (A, B), B symmetric positive semi-definite, restricted to the range of B (SPEC
section 3): eigendecompose B, keep the eigenvalues above a tolerance, whiten with
W = Q_r S_r^{-1/2}, eigendecompose W^T A W = Y diag(lambda) Y^T, and return X = W Y, so that
X^T B X = I. The eigenvalue order is always explicit: ``order="descending"`` (top-k, the theory)
or ``"ascending"`` (the order `eigh` returns, which the released NTPS code relied on).

Every eigensolve goes through numpy's LAPACK (`symmetric_eigh`), on the BLAS that numpy's products use, except
the reference variant's, which keeps scipy's as the released code did (SPEC section 4). pip's numpy and scipy
wheels each bundle their own OpenBLAS, with its own thread pool; a pool's threads keep spinning for a while
after each call, so analysis code that alternates scipy's LAPACK with numpy's products runs two pools of
threads against each other: on 2 cores a theory geometry at d = 256 took 4.1x as long as it does now with
both pools at 2 threads (`benchmarks/bench_blas_pools.py`, docs/estimator.md "One BLAS pool").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
from jaxtyping import Float

from ntps_nb.core.moments import Moments

Order = Literal["descending", "ascending"]
#: The LAPACK front end of a symmetric eigensolve: "numpy" (the package's) or "scipy" (the released code's, kept by
#: the reference variant and compared by `ntps_nb.core.diagnostics`' solver check).
Solver = Literal["numpy", "scipy"]

#: Default relative tolerance: eigenvalues of B at or below ``RANGE_RTOL * max eigenvalue`` are
#: treated as zero (outside the range of B).
RANGE_RTOL = 1e-10
#: Relative tolerance below which an eigenvalue of the reduced problem counts as zero when
#: computing the rank m of A (e.g. rank(Sxy Sxy^T) <= C).
A_RANK_RTOL = 1e-10
#: The absolute tolerance of the released code (eigenvalues of B kept when > 1e-8).
REFERENCE_ABS_TOL = 1e-8


def negative_reach(B: Float[np.ndarray, "d d"], *, tol: float | None = None, rtol: float = RANGE_RTOL) -> float:
    """How far below zero a symmetric B that is positive semi-definite in exact arithmetic (a sum of outer
    products: C0, Sxx) reaches, over its largest eigenvalue: 0 where it reaches no lower than the range
    tolerance below zero (-``rtol`` x the largest, default `RANGE_RTOL`, or -``tol``), the threshold above which
    the solves retain B's eigenvalues as directions. A larger reach is the rounding of its products, and
    rounding of that size spreads about zero: where B is rank deficient (C0 at the embedding layer of texts with
    fewer distinct tokens than d, under float32 token products) it puts positive eigenvalues of about the same
    size in B's null directions (0.88-1.09 times the most negative one on a random model's embedding layer,
    benchmarks/token_rounding_check.py), which the tolerance keeps as directions: r_V grows past C0's rank (39
    against 14 there), NTPS at the added k is rounding, and a next-token tie can go unsaid
    (`ntps_nb.extract.token_rounding`, the extraction's check, is the torch twin; docs/estimator.md, "Float32
    token products where C0 is rank deficient"). A Cholesky factorisation of B + rtol x max(diag B) I (of
    B + tol I) succeeds only where every eigenvalue lies above -rtol x max(diag B) >= -rtol x the largest (above
    -tol); the eigenvalues are computed only where it fails.

    Parameters
    ----------
    B : (d, d) symmetric matrix.
    tol, rtol : the range tolerance, absolute (overrides ``rtol``) or relative to B's largest eigenvalue, as in
        `generalized_eigh`.

    Returns
    -------
    float >= 0: -lambda_min / lambda_max where -lambda_min exceeds the tolerance, else 0.
    """
    B = _finite(np.asarray(B, dtype=np.float64))
    B = (B + B.T) / 2
    shift = float(tol) if tol is not None else rtol * max(float(np.diagonal(B).max()), 0.0)
    if shift > 0:
        try:
            np.linalg.cholesky(B + shift * np.eye(B.shape[0]))
            return 0.0
        except np.linalg.LinAlgError:
            pass
    return reach_of(np.linalg.eigvalsh(B), tol=tol, rtol=rtol)


def reach_of(eigenvalues: Float[np.ndarray, " d"], *, tol: float | None = None, rtol: float = RANGE_RTOL) -> float:
    """`negative_reach` from a symmetric matrix's eigenvalues (any order).

    Parameters
    ----------
    eigenvalues : (d,) the eigenvalues.
    tol, rtol : the range tolerance, as in `negative_reach`.

    Returns
    -------
    float >= 0: -lambda_min / lambda_max where -lambda_min exceeds the tolerance, else 0 (0 too where none is
    positive).
    """
    s = np.asarray(eigenvalues, dtype=np.float64)
    top = float(s.max())
    if top <= 0:
        return 0.0  # zero or negative definite: the moments' checks and the solves say so
    return -float(s.min()) / top if -float(s.min()) > _range_threshold(s, tol, rtol) else 0.0


@dataclass(frozen=True, eq=False)
class Subspace:
    """Solution of a generalized eigenproblem (A, B) on the range of B.

    Attributes
    ----------
    eigenvalues : (r,) in the stated ``order``.
    vectors : (d, r) B-orthonormal generalized eigenvectors X = W Y, columns in ``order``.
    whitened : (d, r) the same directions in B-whitened coordinates, Q_r Y (orthonormal columns).
    range_basis : (d, r) orthonormal basis Q_r of the retained range of B.
    range_eigenvalues : (r,) the retained eigenvalues of B (ascending, as eigh gives them).
    rank_B : r, the number of retained directions of B.
    rank_A : m, the number of eigenvalues of the reduced problem above ``A_RANK_RTOL * max``.
    order : "descending" or "ascending".
    """

    eigenvalues: Float[np.ndarray, " r"]
    vectors: Float[np.ndarray, "d r"]
    whitened: Float[np.ndarray, "d r"]
    range_basis: Float[np.ndarray, "d r"]
    range_eigenvalues: Float[np.ndarray, " r"]
    rank_B: int
    rank_A: int
    order: Order

    def top(self, k: int) -> Float[np.ndarray, "d k"]:
        """The first k columns in this subspace's order.

        Parameters
        ----------
        k : number of columns, 0 <= k <= r (larger k gives all r columns).

        Returns
        -------
        (d, k) float array, a view of ``vectors``.
        """
        return self.vectors[:, :k]


def _range_threshold(evals: np.ndarray, tol: float | None, rtol: float) -> float:
    if tol is not None:
        return float(tol)
    return float(rtol * max(float(evals.max()), 0.0))


def symmetric_eigh(matrix: Float[np.ndarray, "d d"], solver: Solver = "numpy"
                   ) -> tuple[Float[np.ndarray, " d"], Float[np.ndarray, "d d"]]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix (its lower triangle).

    ``solver="numpy"`` runs LAPACK's divide-and-conquer driver on numpy's BLAS, the one numpy's products
    use, so that analysis code does not alternate between two BLAS thread pools (module docstring);
    ``"scipy"`` is `scipy.linalg.eigh` (its default driver), as the released NTPS code called it. Both
    refuse a matrix with NaN or inf entries, which numpy's own `eigh` would turn into NaN silently.

    Parameters
    ----------
    matrix : (d, d) symmetric float array (float32 stays float32).
    solver : "numpy" (default) or "scipy".

    Returns
    -------
    (eigenvalues, eigenvectors) : (d,) ascending, and (d, d) with the eigenvectors as columns.

    Raises
    ------
    ValueError on a non-finite entry or an unknown solver.
    """
    if solver == "scipy":
        return scipy.linalg.eigh(matrix)
    if solver != "numpy":
        raise ValueError(f"solver must be 'numpy' or 'scipy', got {solver!r}")
    evals, evecs = np.linalg.eigh(_finite(np.asarray(matrix)))
    return evals, evecs


def _finite(matrix: np.ndarray) -> np.ndarray:
    """``matrix``, refused where an entry is NaN or inf (scipy's LAPACK front ends check this; numpy's do not)."""
    if not np.isfinite(matrix).all():
        raise ValueError("array must not contain infs or NaNs")
    return matrix


def generalized_eigh(
    B: Float[np.ndarray, "d d"],
    *,
    A_factor: Float[np.ndarray, "d c"] | None = None,
    A: Float[np.ndarray, "d d"] | None = None,
    order: Order = "descending",
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    dtype: type = np.float64,
    name: str = "B",
    solver: Solver = "numpy",
) -> Subspace:
    """Solve (A, B) on the range of B; A is given as A_factor (A = F F^T) or as A itself.

    Passing the factor keeps the reduced matrix W^T A W = (W^T F)(W^T F)^T exactly positive
    semi-definite; passing A reproduces the released code, which formed W^T A W. ``tol``
    (absolute) overrides ``rtol`` (relative to B's largest eigenvalue). ``dtype`` float32
    reproduces the released code's precision.

    Parameters
    ----------
    B : (d, d) symmetric positive semi-definite matrix.
    A_factor : (d, c) factor F with A = F F^T; give exactly one of ``A_factor`` and ``A``.
    A : (d, d) symmetric matrix.
    order : "descending" (default) or "ascending" order of the eigenvalues.
    tol, rtol : absolute / relative threshold above which an eigenvalue of B is retained.
    dtype : float dtype of the computation (np.float64 or np.float32).
    name : name of B in error messages.
    solver : the LAPACK front end of both eigensolves (`symmetric_eigh`): "numpy" (default) or "scipy"
        (the released code's, which the reference variant keeps).

    Returns
    -------
    `Subspace` with r = rank_B retained directions: (r,) eigenvalues, (d, r) B-orthonormal vectors.

    Raises
    ------
    ValueError if B has no eigenvalue above the threshold, or on mismatched shapes.
    """
    if order not in ("descending", "ascending"):
        raise ValueError(f"order must be 'descending' or 'ascending', got {order!r}")
    if (A is None) == (A_factor is None):
        raise ValueError("give exactly one of A and A_factor")
    B = np.asarray(B, dtype=dtype)
    given = np.asarray(A if A is not None else A_factor, dtype=dtype)
    if B.ndim != 2 or B.shape[0] != B.shape[1] or given.ndim != 2 or given.shape[0] != B.shape[0]:
        raise ValueError(f"shape mismatch: B {B.shape}, A {given.shape}")
    s, Q = symmetric_eigh(B, solver)  # ascending
    threshold = _range_threshold(s, tol, rtol)
    keep = s > threshold
    r = int(keep.sum())
    if r == 0:
        raise ValueError(f"{name} has no eigenvalue above the tolerance {threshold:.3g}: it is zero or negative definite")
    Q_r, s_r = Q[:, keep], s[keep]
    W = Q_r / np.sqrt(s_r)
    if A_factor is not None:
        G = W.T @ given
        M = G @ G.T
    else:
        M = W.T @ given @ W
    lam, Y = symmetric_eigh((M + M.T) / 2, solver)  # ascending
    if order == "descending":
        lam, Y = lam[::-1], Y[:, ::-1]
    rank_A = int(np.count_nonzero(lam > A_RANK_RTOL * max(float(lam.max()), np.finfo(np.float64).tiny)))
    if not np.any(lam > 0):
        rank_A = 0
    return Subspace(
        eigenvalues=lam,
        vectors=W @ Y,
        whitened=Q_r @ Y,
        range_basis=Q_r,
        range_eigenvalues=s_r,
        rank_B=r,
        rank_A=rank_A,
        order=order,
    )


def check_labels(moments: Moments) -> None:
    """Raise if the label moments describe fewer than two classes.

    Parameters
    ----------
    moments : `Moments`; for uncentred moments, a class counts as present when its Syy diagonal is > 0.

    Returns
    -------
    None; raises ValueError when C < 2 or fewer than two classes have texts.
    """
    check_class_counts(moments.Syy, is_centred=moments.is_centred)


def check_class_counts(Syy: Float[np.ndarray, "C C"], *, is_centred: bool) -> None:
    """`check_labels` from the label moment alone (what the torch backend checks of moments pooled on a device).

    Parameters
    ----------
    Syy : (C, C) the label second moment.
    is_centred : whether it is centred (then only C is checked).

    Returns
    -------
    None; raises ValueError when C < 2 or, uncentred, fewer than two classes have texts.
    """
    n_classes = Syy.shape[0]
    if n_classes < 2:
        raise ValueError(f"the label matrix has {n_classes} column(s); NTPS needs at least 2 classes")
    if not is_centred:
        present = int(np.count_nonzero(np.diag(Syy) > 0))
        if present < 2:
            raise ValueError(f"the labels contain {present} class(es) with any texts; NTPS needs at least 2 classes")


def perception_subspace(
    moments: Moments, *, order: Order = "descending", tol: float | None = None, rtol: float = RANGE_RTOL,
    dtype: type = np.float64,
) -> Subspace:
    """U: the k features of the pooled states that best predict the labels (A = Sxy Sxy^T, B = Sxx).

    Parameters
    ----------
    moments : the layer's `Moments` (at least two classes present).
    order, tol, rtol, dtype : as in `generalized_eigh`.

    Returns
    -------
    `Subspace` of (Sxy Sxy^T, Sxx); ``rank_A`` = m <= C directions carry label signal.
    """
    check_labels(moments)
    return generalized_eigh(moments.Sxx, A_factor=moments.Sxy, order=order, tol=tol, rtol=rtol, dtype=dtype, name="Sxx")


def next_token_subspace(
    moments: Moments, *, order: Order = "descending", tol: float | None = None, rtol: float = RANGE_RTOL,
    dtype: type = np.float64,
) -> Subspace:
    """V: the k features of the prefix sums that best predict the next state (A = C1 C1^T, B = C0).

    Parameters
    ----------
    moments : the layer's `Moments` (``n_tokens`` > 0).
    order, tol, rtol, dtype : as in `generalized_eigh`.

    Returns
    -------
    `Subspace` of (C1 C1^T, C0), with r_V = ``rank_B`` directions.
    """
    if moments.n_tokens == 0:
        raise ValueError("no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero")
    return generalized_eigh(moments.C0, A_factor=moments.C1, order=order, tol=tol, rtol=rtol, dtype=dtype, name="C0")


def nested_orthonormal_basis(
    columns: Float[np.ndarray, "d n"], *, rtol: float = 1e-9
) -> tuple[Float[np.ndarray, "d q"], np.ndarray]:
    """Orthonormal Q and counts such that span(columns[:, :j]) = span(Q[:, :counts[j-1]]) for all j.

    A column whose residual against the span of the earlier columns is below ``rtol`` times its
    own norm adds no direction (the span is rank deficient there); plain Householder QR would
    put an arbitrary direction in its place. Blocks of independent columns go through one QR.

    Parameters
    ----------
    columns : (d, n) float array.
    rtol : relative residual below which a column adds no direction.

    Returns
    -------
    Q : (d, q) float64 array with orthonormal columns, q <= min(d, n).
    counts : (n,) int64 array, non-decreasing, ``counts[j]`` the number of columns of Q spanning
        the first j + 1 columns.
    """
    A = np.asarray(columns, dtype=np.float64)
    d, n = A.shape
    norms = np.linalg.norm(A, axis=0)
    basis = np.zeros((d, 0))
    counts = np.zeros(n, dtype=np.int64)
    start = 0
    while start < n:
        block = A[:, start:]
        for _ in range(2):  # twice is enough (Kahan-Parlett) for a numerically orthogonal residual
            block = block - basis @ (basis.T @ block)
        residual = np.linalg.norm(block, axis=0)
        dependent = residual <= rtol * np.maximum(norms[start:], np.finfo(np.float64).tiny)
        if dependent[0]:  # a run of columns already in the span: skip them together
            run = int(np.argmin(dependent)) if not dependent.all() else dependent.size
            counts[start:start + run] = basis.shape[1]
            start += run
            continue
        # columns up to the next dependent one (on the current basis) are handled by one QR
        stop = int(np.argmax(dependent)) if dependent.any() else block.shape[1]
        stop = min(stop, d - basis.shape[1])  # no more new directions than dimensions left
        Q, R = np.linalg.qr(block[:, :stop])
        diag = np.abs(np.diag(R))
        bad = diag <= rtol * norms[start:start + stop]
        take = int(np.argmax(bad)) if bad.any() else stop
        take = max(take, 1)
        basis = np.hstack([basis, Q[:, :take]])
        counts[start:start + take] = basis.shape[1] - take + 1 + np.arange(take)
        start += take
    return basis, counts
