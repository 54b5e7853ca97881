"""The theory analysis in torch, on any device: generalized eigenproblems, NTPS sweeps, interval replicates.

The numpy core is the reference; this module computes the same quantities with the same
definitions and tolerances (`ntps_nb.core.subspaces`, `ntps_nb.core.score`,
`ntps_nb.core.intervals`), in float64 by default, on the device given as ``device=`` ("cpu",
"cuda", "cuda:1", ...), and returns the same numpy objects and pandas frames:

- `generalized_eigh_torch`: (A, B) on the range of B, batched over a leading dimension;
- `theory_geometry_torch` / `theory_sweep_torch`: the `TheoryGeometry` of one layer and its
  sweep, the frame of ``ntps_sweep(moments, variant="theory")``;
- `reference_geometry_torch`: the released algorithm's `ReferenceGeometry` (float32, ascending);
- `ntps_sweep_torch`: ``ntps_sweep`` (either variant, the plug-in estimator) with ``device=``;
- `interval_sweep_torch`: the frame of ``ntps_interval_sweep(shards)`` (theory variant), with
  the bootstrap and jackknife replicate moments formed as one product (shares x stacked shards)
  per block of replicates and each block's eigenproblems solved as one batched call;
- `interval_replicates_torch`: the statistic of every replicate (the batched step alone).

Where the computation differs in form from the numpy code, the quantity is the same:

- U needs only its m <= C label-carrying directions. When C is below the retained rank of Sxx,
  the reduced problem (W^T Sxy)(W^T Sxy)^T is solved through its C x C Gram form
  G^T G = Z diag(lambda) Z^T, Y = G Z diag(lambda)^{-1/2}: the same nonzero eigenpairs, from an
  eigensolve of size C instead of r_U.
- The nested orthonormal basis of Sxx^{1/2} V (`nested_orthonormal_basis`) is one batched
  Householder QR of the first min(r_U, r_V) columns when every diagonal of R is above
  ``span_rtol`` times its column's norm (the generic case, where the numpy function also does a
  single QR and the remaining columns add no direction). A replicate where that check fails,
  i.e. the span is rank deficient, is handed to the numpy `nested_orthonormal_basis` on the CPU.

torch is imported by this module only; nothing else in `ntps_nb.core` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ntps_nb.core.intervals import (
    _check_options,
    _jackknife,
    _summary,
    _warn_failed,
    bootstrap_counts,
    check_shards,
    theory_values,
)
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import (
    REFERENCE_ABS_TOL,
    REFERENCE_FRACTIONS,
    SPAN_RTOL,
    Precision,
    ReferenceGeometry,
    TheoryGeometry,
    Variant,
)
from ntps_nb.core.subspaces import A_RANK_RTOL, RANGE_RTOL, Order, Subspace, check_labels, nested_orthonormal_basis

#: The smallest positive float64, the floor of the rank-of-A threshold (as in `generalized_eigh`).
_TINY = float(np.finfo(np.float64).tiny)
#: Device memory a block of replicates may take on a GPU, as a share of the free memory.
GPU_MEMORY_SHARE = 0.5
#: Memory a block of replicates may take on the CPU, in bytes.
CPU_BLOCK_BYTES = 1 * 2**30
#: Largest number of replicates solved in one batched call.
MAX_BATCH = 256
#: Replicate-sized d x d arrays alive at once while a block is solved (moments, factors, products).
_ARRAYS_PER_REPLICATE = 20


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:0', ...), got {device!r}") from error


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 (default) or torch.float32, got {dtype!r}")
    return dtype


def _tensor(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    # np.array copies: the core's moment arrays are read-only views, which torch.from_numpy warns about
    return torch.from_numpy(np.array(array, dtype=np.float64)).to(device=device, dtype=dtype)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _eigh_range(B: torch.Tensor, tol: float | None, rtol: float):
    """eigh of a batch of symmetric B (ascending), the range threshold and the retained rank r of each."""
    s, Q = torch.linalg.eigh((B + B.mT) / 2)
    if tol is not None:
        threshold = torch.full(s.shape[:-1], float(tol), dtype=s.dtype, device=s.device)
    else:
        threshold = rtol * s[..., -1].clamp(min=0.0)
    rank = (s > threshold[..., None]).sum(dim=-1)
    return s, Q, threshold, rank


def _rank_A(lam: torch.Tensor) -> torch.Tensor:
    """m per batch element from descending eigenvalues, by `generalized_eigh`'s rule."""
    top = lam[..., 0]
    m = (lam > A_RANK_RTOL * top.clamp(min=_TINY)[..., None]).sum(dim=-1)
    return torch.where(top > 0, m, torch.zeros_like(m))


# --------------------------------------------------------------------------------------------
# Generalized eigenproblem


@dataclass(frozen=True, eq=False)
class TorchSubspace:
    """`ntps_nb.core.subspaces.Subspace` with torch tensors on the device that solved it."""

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    whitened: torch.Tensor
    range_basis: torch.Tensor
    range_eigenvalues: torch.Tensor
    rank_B: int
    rank_A: int
    order: Order

    def top(self, k: int) -> torch.Tensor:
        """The first k columns in this subspace's order."""
        return self.vectors[:, :k]

    def to_numpy(self) -> Subspace:
        """The same solution as the core's numpy `Subspace`."""
        return Subspace(eigenvalues=_numpy(self.eigenvalues), vectors=_numpy(self.vectors),
                        whitened=_numpy(self.whitened), range_basis=_numpy(self.range_basis),
                        range_eigenvalues=_numpy(self.range_eigenvalues), rank_B=self.rank_B,
                        rank_A=self.rank_A, order=self.order)


def generalized_eigh_torch(
    B,
    *,
    A_factor=None,
    A=None,
    order: Order = "descending",
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    name: str = "B",
) -> TorchSubspace | list[TorchSubspace]:
    """`ntps_nb.core.subspaces.generalized_eigh` in torch, for one (d, d) B or a (n, d, d) batch.

    Same steps and tolerances: eigh of B, keep the eigenvalues above ``tol`` (absolute) or
    ``rtol`` times the largest, whiten with W = Q_r S_r^{-1/2}, eigendecompose W^T A W (formed as
    (W^T F)(W^T F)^T when A = F F^T is given as ``A_factor``), X = W Y. Batch elements with the
    same retained rank are solved in one batched call.

    Parameters
    ----------
    B : (d, d) or (n, d, d) symmetric positive semi-definite (numpy array or tensor).
    A_factor, A : exactly one; (d, c) / (n, d, c) factor, or (d, d) / (n, d, d) matrix.
    order : "descending" (top-k, the theory) or "ascending" (as eigh returns them).
    tol, rtol : range tolerance on the eigenvalues of B, as in the numpy function.
    dtype : torch.float64 (default) or torch.float32 (the released code's precision).
    device : the torch device that solves it.
    name : what B is called in error messages.

    Returns
    -------
    One `TorchSubspace` for a 2-d B, a list of them (one per batch element) for a 3-d B.
    """
    if order not in ("descending", "ascending"):
        raise ValueError(f"order must be 'descending' or 'ascending', got {order!r}")
    if (A is None) == (A_factor is None):
        raise ValueError("give exactly one of A and A_factor")
    dtype, device = _check_dtype(dtype), _device(device)
    B = _tensor(B, dtype, device)
    given = _tensor(A if A is not None else A_factor, dtype, device)
    single = B.ndim == 2
    if single:
        B, given = B[None], given[None] if given.ndim == 2 else given
    if (B.ndim != 3 or B.shape[-1] != B.shape[-2] or given.ndim != 3 or given.shape[0] != B.shape[0]
            or given.shape[1] != B.shape[1] or (A is not None and given.shape[2] != B.shape[1])):
        raise ValueError(f"shape mismatch: B {tuple(B.shape)}, A {tuple(given.shape)}")
    d = B.shape[-1]
    s, Q, threshold, rank = _eigh_range(B, tol, rtol)
    ranks = _numpy(rank)
    for i, r in enumerate(ranks):
        if r == 0:
            where = "" if single else f" (batch element {i})"
            raise ValueError(f"{name}{where} has no eigenvalue above the tolerance {float(threshold[i]):.3g}: "
                             "it is zero or negative definite")
    out: list[TorchSubspace | None] = [None] * B.shape[0]
    for r in np.unique(ranks):
        members = np.flatnonzero(ranks == r)
        index = torch.as_tensor(members, device=device)
        Q_r, s_r = Q[index][..., d - r:], s[index][..., d - r:]
        W = Q_r / torch.sqrt(s_r)[:, None, :]
        if A_factor is not None:
            G = W.mT @ given[index]
            M = G @ G.mT
        else:
            M = W.mT @ given[index] @ W
        lam, Y = torch.linalg.eigh((M + M.mT) / 2)
        if order == "descending":
            lam, Y = lam.flip(-1), Y.flip(-1)
        rank_A = _numpy(_rank_A(lam.flip(-1) if order == "ascending" else lam))
        X, whitened = W @ Y, Q_r @ Y
        for j, i in enumerate(members):
            out[i] = TorchSubspace(eigenvalues=lam[j], vectors=X[j], whitened=whitened[j], range_basis=Q_r[j],
                                   range_eigenvalues=s_r[j], rank_B=int(r), rank_A=int(rank_A[j]), order=order)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# Theory geometry, batched


def _perception_top(Q_r: torch.Tensor, s_r: torch.Tensor, Sxy: torch.Tensor):
    """Descending eigenvalues and whitened-coordinate eigenvectors Y of (Sxy Sxy^T, Sxx) on the
    range of Sxx, for at most min(C, r_U) directions, and m per batch element."""
    W = Q_r / torch.sqrt(s_r)[:, None, :]
    G = W.mT @ Sxy  # (n, r_U, C)
    r, c = G.shape[-2:]
    if c < r:  # the C x C Gram form of (G G^T): the same nonzero eigenpairs
        H = G.mT @ G
        lam, Z = torch.linalg.eigh((H + H.mT) / 2)
        lam, Z = lam.flip(-1), Z.flip(-1)
        positive = lam > 0
        Y = (G @ Z) / torch.sqrt(torch.where(positive, lam, torch.ones_like(lam)))[:, None, :]
        Y = torch.where(positive[:, None, :], Y, torch.zeros_like(Y))
    else:
        M = G @ G.mT
        lam, Y = torch.linalg.eigh((M + M.mT) / 2)
        lam, Y = lam.flip(-1), Y.flip(-1)
    return lam, Y, _rank_A(lam)


def _next_token_vectors(Q_r: torch.Tensor, s_r: torch.Tensor, C1: torch.Tensor) -> torch.Tensor:
    """V: the C0-orthonormal generalized eigenvectors of (C1 C1^T, C0), descending, (n, d, r_V)."""
    W = Q_r / torch.sqrt(s_r)[:, None, :]
    G = W.mT @ C1
    M = G @ G.mT
    _, Y = torch.linalg.eigh((M + M.mT) / 2)
    return W @ Y.flip(-1)


def _projected(v_coords: torch.Tensor, u_coords: torch.Tensor, span_rtol: float) -> np.ndarray:
    """``projected[:, k-1, i]`` = ||P_k u_i||^2, P_k the projector onto the span of the first k
    columns of v_coords, for every k = 1..r_V; numpy (n, r_V, w)."""
    n, r_U, r_V = v_coords.shape
    q = min(r_U, r_V)
    norms = torch.linalg.vector_norm(v_coords, dim=1)
    basis, R = torch.linalg.qr(v_coords[..., :q])
    diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
    generic = _numpy((diagonal > span_rtol * norms[:, :q]).all(dim=-1))
    cum = torch.cumsum((basis.mT @ u_coords) ** 2, dim=1)  # (n, q, w)
    steps = torch.clamp(torch.arange(r_V, device=cum.device), max=q - 1)
    projected = _numpy(cum[:, steps])
    for j in np.flatnonzero(~generic):  # the span is rank deficient: the numpy function's exact handling
        nested, counts = nested_orthonormal_basis(_numpy(v_coords[j]).astype(np.float64), rtol=span_rtol)
        table = np.cumsum((nested.T @ _numpy(u_coords[j]).astype(np.float64)) ** 2, axis=0)
        projected[j] = 0.0
        has_basis = counts > 0
        projected[j][has_basis] = table[counts[has_basis] - 1]
    return np.clip(projected.astype(np.float64), 0.0, 1.0)


def _theory_geometries(
    Sxx: torch.Tensor, Sxy: torch.Tensor, Syy: torch.Tensor, C0: torch.Tensor, C1: torch.Tensor,
    n_tokens: np.ndarray, labels_ok: np.ndarray, *, tol: float | None, rtol: float, span_rtol: float,
) -> list[TheoryGeometry | str]:
    """`theory_geometry` of each batch element, or the reason (a string) it is undefined, checked
    in the order the numpy code raises."""
    n, d = Sxx.shape[0], Sxx.shape[-1]
    s_U, Q_U, threshold_U, rank_U = _eigh_range(Sxx, tol, rtol)
    s_V, Q_V, threshold_V, rank_V = _eigh_range(C0, tol, rtol)
    trace = _numpy(torch.diagonal(Syy, dim1=-2, dim2=-1).sum(dim=-1))
    r_U, r_V = _numpy(rank_U), _numpy(rank_V)
    out: list[TheoryGeometry | str | None] = [None] * n
    for i in range(n):
        if not labels_ok[i]:
            out[i] = "the labels contain fewer than 2 classes with any texts; NTPS needs at least 2 classes"
        elif r_U[i] == 0:
            out[i] = f"Sxx has no eigenvalue above the tolerance {float(threshold_U[i]):.3g}: it is zero or negative definite"
        elif n_tokens[i] == 0:
            out[i] = "no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero"
        elif r_V[i] == 0:
            out[i] = f"C0 has no eigenvalue above the tolerance {float(threshold_V[i]):.3g}: it is zero or negative definite"
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if out[i] is None:
            groups.setdefault((int(r_U[i]), int(r_V[i])), []).append(i)
    for (ru, rv), members in groups.items():
        if len(members) == n:  # the usual case: one group, no copies
            def take(t):
                return t
        else:
            index = torch.as_tensor(members, device=Sxx.device)

            def take(t):
                return t[index]
        Q_r, s_r = take(Q_U)[..., d - ru:], take(s_U)[..., d - ru:]
        lam, Y, m = _perception_top(Q_r, s_r, take(Sxy))
        V = _next_token_vectors(take(Q_V)[..., d - rv:], take(s_V)[..., d - rv:], take(C1))
        # coordinates in the retained range of Sxx: u_i -> Y[:, i]; Sxx^{1/2} V -> S^{1/2} Q_r^T V
        v_coords = torch.sqrt(s_r)[:, :, None] * (Q_r.mT @ V)
        del V
        projected = _projected(v_coords, Y, span_rtol)
        del v_coords, Q_r
        lam, m = _numpy(lam).astype(np.float64), _numpy(m)
        for j, i in enumerate(members):
            mi = int(m[j])
            if mi == 0:
                out[i] = "Sxy is zero: the pooled states carry no label signal, U is undefined"
                continue
            out[i] = TheoryGeometry(eigenvalues=lam[j, :mi].copy(), projected=projected[j, :, :mi].copy(),
                                    r_V=rv, r_U=ru, trace_Syy=float(trace[i]))
    return out


def theory_geometry_torch(
    moments: Moments, *, centred: bool = False, tol: float | None = None, rtol: float = RANGE_RTOL,
    span_rtol: float = SPAN_RTOL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
) -> TheoryGeometry:
    """`ntps_nb.core.score.theory_geometry`, solved on ``device``; returns the numpy `TheoryGeometry`.

    Parameters
    ----------
    moments : the layer's `Moments`.
    centred, tol, rtol, span_rtol : as in `ntps_nb.core.score.theory_geometry`.
    device : the torch device that solves it ("cpu", "cuda", ...).
    dtype : torch.float64 (default) or torch.float32.

    Returns
    -------
    `TheoryGeometry` (numpy arrays: (m,) eigenvalues, (r_V, m) projected).

    Raises
    ------
    ValueError if the geometry is undefined (e.g. Sxy zero, fewer than two classes).
    """
    if centred:
        moments = moments.centred()
    check_labels(moments)
    dtype, device = _check_dtype(dtype), _device(device)
    arrays = [_tensor(getattr(moments, name), dtype, device)[None] for name in ("Sxx", "Sxy", "Syy", "C0", "C1")]
    (result,) = _theory_geometries(*arrays, np.array([moments.n_tokens]), np.array([True]),
                                   tol=tol, rtol=rtol, span_rtol=span_rtol)
    if isinstance(result, str):
        raise ValueError(result)
    return result


def _pooled(moments: Moments | Sequence[Moments]) -> Moments:
    """One `Moments`, or a list of per-shard `Moments` pooled (as ``ntps_sweep`` takes them)."""
    if isinstance(moments, Moments):
        return moments
    shards = list(moments)
    if not shards or not all(isinstance(s, Moments) for s in shards):
        raise ValueError("moments must be one Moments or a non-empty list of per-shard Moments")
    return Moments.combine(shards) if len(shards) > 1 else shards[0]


def _check_plugin(estimator: str, numpy_function: str = "ntps_nb.core.score.ntps_sweep") -> None:
    if estimator != "plugin":
        raise ValueError(f"the torch backend computes the plug-in estimator only (estimator='plugin'), got "
                         f"estimator={estimator!r}; use {numpy_function} (numpy) for the others")


def theory_sweep_torch(
    moments: Moments | Sequence[Moments], *, centred: bool = False, tol: float | None = None,
    rtol: float = RANGE_RTOL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """The frame of ``ntps_sweep(moments, variant="theory", ...)`` (plug-in), with the factorisations on
    ``device``: NTPS, the excess loss and its bounds at every k = 1..r_V.

    Parameters
    ----------
    moments : the layer's `Moments`, or a list of per-shard `Moments` (pooled).
    centred, tol, rtol, device, dtype : as in `theory_geometry_torch`.

    Returns
    -------
    DataFrame, one row per k = 1..r_V with the columns of `TheoryGeometry.sweep` and estimator
    ("plugin").
    """
    geometry = theory_geometry_torch(_pooled(moments), centred=centred, tol=tol, rtol=rtol, device=device,
                                     dtype=dtype)
    return geometry.sweep().assign(estimator="plugin")


# --------------------------------------------------------------------------------------------
# Reference variant


def _nested_basis(columns: torch.Tensor, span_rtol: float) -> tuple[torch.Tensor, np.ndarray]:
    """`nested_orthonormal_basis` of one (rows, n) matrix: one Householder QR in the generic case,
    the numpy function (on the CPU) where the span is rank deficient."""
    rows, n = columns.shape
    q = min(rows, n)
    norms = torch.linalg.vector_norm(columns, dim=0)
    basis, R = torch.linalg.qr(columns[:, :q])
    if bool((R.diagonal().abs() > span_rtol * norms[:q]).all()):
        return basis, np.minimum(np.arange(1, n + 1), q)
    nested, counts = nested_orthonormal_basis(_numpy(columns).astype(np.float64), rtol=span_rtol)
    return torch.from_numpy(nested).to(device=columns.device, dtype=columns.dtype), counts


def reference_geometry_torch(
    moments: Moments, *, precision: Precision = "float32", tol: float = REFERENCE_ABS_TOL,
    span_rtol: float = SPAN_RTOL, device: str | torch.device = "cpu",
) -> ReferenceGeometry:
    """`ntps_nb.core.score.reference_geometry` (the released algorithm) solved on ``device``.

    The same steps: moments in ``precision``, A = Sxy Sxy^T and C1 C1^T formed, ascending order,
    absolute tolerance 1e-8, V orthonormalised once (nested, float64). When rank(Sxy Sxy^T) is
    below the retained rank of Sxx, the first columns of U are an arbitrary basis of a null
    eigenspace (the variant is ill-posed, SPEC section 4): torch and LAPACK pick different bases
    there, so the two backends agree only where the problem is well-posed.

    Parameters
    ----------
    moments : the layer's `Moments` (uncentred).
    precision : "float32" (as released) or "float64".
    tol : absolute tolerance on the eigenvalues of Sxx and C0.
    span_rtol : relative residual below which a column of V adds no new direction.
    device : the torch device that solves it.

    Returns
    -------
    `ReferenceGeometry` (numpy arrays) with U (d, r_U) and V (d, r_V) in ascending order.
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    check_labels(moments)
    device = _device(device)
    dtype = torch.float32 if precision == "float32" else torch.float64
    Sxy, C1 = _tensor(moments.Sxy, dtype, device), _tensor(moments.C1, dtype, device)
    U = generalized_eigh_torch(moments.Sxx, A=Sxy @ Sxy.T, order="ascending", tol=tol, dtype=dtype,
                               device=device, name="Sxx").vectors
    V = generalized_eigh_torch(moments.C0, A=C1 @ C1.T, order="ascending", tol=tol, dtype=dtype,
                               device=device, name="C0").vectors
    basis, counts = _nested_basis(V.to(torch.float64), span_rtol)
    U64 = U.to(torch.float64)
    projected = torch.cumsum(torch.cumsum((basis.T @ U64) ** 2, dim=0), dim=1)
    norms = torch.cumsum(torch.sum(U64**2, dim=0), dim=0)
    return ReferenceGeometry(U=_numpy(U), V=_numpy(V), projected=_numpy(projected), norms=_numpy(norms),
                             counts=counts, precision=precision)


def ntps_sweep_torch(
    moments: Moments | Sequence[Moments],
    *,
    variant: Variant = "theory",
    estimator: str = "plugin",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: Precision = "float32",
    fractions: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """`ntps_nb.core.score.ntps_sweep` with the factorisations on ``device``: the same arguments and
    frame, for the plug-in estimator; ``dtype`` is the theory variant's precision (the reference
    variant takes ``precision``).

    Parameters
    ----------
    moments, variant, centred, tol, rtol, precision, fractions : as in `ntps_nb.core.score.ntps_sweep`.
    estimator : must be "plugin" (anything else raises).
    device : the torch device that solves it.
    dtype : torch.float64 (default) or torch.float32, theory variant only.

    Returns
    -------
    DataFrame as `ntps_nb.core.score.ntps_sweep` returns for the plug-in: one row per k (theory)
    or per fraction (reference).
    """
    _check_plugin(estimator)
    if variant == "theory":
        return theory_sweep_torch(moments, centred=centred, tol=tol, rtol=rtol, device=device, dtype=dtype)
    if variant == "reference":
        if centred:
            raise ValueError("the reference variant uses the uncentred moments, as released")
        geometry = reference_geometry_torch(_pooled(moments), precision=precision,
                                            tol=REFERENCE_ABS_TOL if tol is None else tol, device=device)
        return geometry.sweep(REFERENCE_FRACTIONS if fractions is None else np.asarray(fractions)).assign(
            estimator="plugin")
    raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")


# --------------------------------------------------------------------------------------------
# Interval replicates


class TorchShardStack:
    """Shards' moments stacked on the device, (S, size) per moment, so that a block of weighted
    combinations is one matrix product (`ntps_nb.core.intervals.ShardStack` on a torch device)."""

    def __init__(self, moment_shards: Sequence[Moments], *, centred: bool, dtype: torch.dtype,
                 device: torch.device):
        self.shards = check_shards(moment_shards)
        self.centred = centred
        self.n_texts = np.array([s.n_texts for s in self.shards], dtype=np.float64)
        self.n_tokens = np.array([s.n_tokens for s in self.shards], dtype=np.float64)
        names = ["Sxx", "Sxy", "Syy", "C0", "C1"]
        if centred:
            if any(s.x_mean is None for s in self.shards):
                raise ValueError("centred moments need x_mean (the mean pooled vector); extract with it recorded")
            names.append("x_mean")
        self.n_classes = self.shards[0].n_classes
        self.d = self.shards[0].d
        self.shapes = {n: getattr(self.shards[0], n).shape for n in names}
        self.stacked = {}
        for n in names:
            size = int(np.prod(self.shapes[n]))
            out = torch.empty((len(self.shards), size), dtype=dtype, device=device)
            for i, shard in enumerate(self.shards):
                out[i] = _tensor(getattr(shard, n).reshape(-1), dtype, device)
            self.stacked[n] = out

    def __len__(self) -> int:
        return len(self.shards)

    def combined(self, shares: torch.Tensor) -> dict[str, torch.Tensor]:
        """The moments of each row of a (n, S) matrix of text shares (rows summing to 1), centred if asked.

        Parameters
        ----------
        shares : (n, S) tensor on the stack's device and dtype.

        Returns
        -------
        dict of batched tensors: ``Sxx`` (n, d, d), ``Sxy`` (n, d, C), ``Syy`` (n, C, C), ``C0``,
        ``C1`` (n, d, d); with ``centred`` the first three are centred by the combined x_mean.
        """
        arrays = {n: (shares @ a).reshape(shares.shape[0], *self.shapes[n]) for n, a in self.stacked.items()}
        if self.centred:
            x = arrays.pop("x_mean")
            y = torch.diagonal(arrays["Syy"], dim1=-2, dim2=-1)
            arrays["Sxx"] = arrays["Sxx"] - x[:, :, None] * x[:, None, :]
            arrays["Sxy"] = arrays["Sxy"] - x[:, :, None] * y[:, None, :]
            arrays["Syy"] = arrays["Syy"] - y[:, :, None] * y[:, None, :]
        return arrays


def _default_batch(d: int, itemsize: int, device: torch.device) -> int:
    per_replicate = _ARRAYS_PER_REPLICATE * d * d * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = GPU_MEMORY_SHARE * free
    else:
        budget = CPU_BLOCK_BYTES
    return int(max(1, min(MAX_BATCH, budget // per_replicate)))


def _replicate_geometries(stack: TorchShardStack, counts: np.ndarray, *, tol, rtol, span_rtol, batch_size: int,
                          dtype: torch.dtype, device: torch.device):
    """Yield (row, TheoryGeometry or reason) for each row of a (n, S) count matrix, a block at a time."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != len(stack):
        raise ValueError(f"counts must have shape (n, {len(stack)}), got {counts.shape}")
    texts = counts * stack.n_texts
    totals = texts.sum(axis=1)
    if np.any(totals <= 0) or np.any(counts < 0):
        raise ValueError("every combination needs non-negative counts and at least one text")
    shares = texts / totals[:, None]
    tokens = np.rint(counts @ stack.n_tokens)
    for start in range(0, counts.shape[0], batch_size):
        stop = min(start + batch_size, counts.shape[0])
        arrays = stack.combined(_tensor(shares[start:stop], dtype, device))
        if stack.centred:
            labels_ok = np.full(stop - start, stack.n_classes >= 2)
        else:
            present = _numpy((torch.diagonal(arrays["Syy"], dim1=-2, dim2=-1) > 0).sum(dim=-1))
            labels_ok = (present >= 2) & (stack.n_classes >= 2)
        results = _theory_geometries(arrays["Sxx"], arrays["Sxy"], arrays["Syy"], arrays["C0"], arrays["C1"],
                                     tokens[start:stop], labels_ok, tol=tol, rtol=rtol, span_rtol=span_rtol)
        del arrays
        for row, result in enumerate(results, start=start):
            yield row, result


def interval_replicates_torch(
    moment_shards: Sequence[Moments],
    counts,
    ks,
    *,
    statistic: str = "ntps",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    span_rtol: float = SPAN_RTOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
) -> tuple[np.ndarray, int]:
    """The theory statistic at ``ks`` for each weighted combination of the shards.

    Row i of the (n, S) ``counts`` takes shard s counts[i, s] times (a bootstrap draw; a row of
    ones minus the unit vector e_s leaves shard s out). ``batch_size`` replicates are combined by
    one product and solved by one batched eigensolve (default: as many as fit in half the free
    device memory, at most `MAX_BATCH`).

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (at least `MIN_SHARDS`).
    counts : (n, S) non-negative counts, every row covering at least one text.
    ks : (K,) numbers of next-token directions.
    statistic : "ntps" (default) or "excess_loss".
    centred, tol, rtol, span_rtol : as in `theory_geometry_torch`.
    device, dtype : the torch device and precision of the solves.
    batch_size : replicates per batched solve, a positive integer (default: from free memory).

    Returns
    -------
    values : (n, K) float array, NaN where k exceeds the replicate's r_V, and a row of NaN where
        its geometry is undefined (e.g. a resample with a single class).
    failed : int, the number of such undefined replicates.
    """
    dtype, device = _check_dtype(dtype), _device(device)
    stack = TorchShardStack(moment_shards, centred=centred, dtype=dtype, device=device)
    return _replicate_values(stack, counts, np.asarray(ks, dtype=np.int64), statistic=statistic, tol=tol,
                             rtol=rtol, span_rtol=span_rtol, batch_size=batch_size, dtype=dtype, device=device)


def _replicate_values(stack, counts, ks, *, statistic, tol, rtol, span_rtol, batch_size, dtype, device):
    if batch_size is None:
        batch_size = _default_batch(stack.d, torch.finfo(dtype).bits // 8, device)
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    counts = np.asarray(counts, dtype=np.float64)
    values = np.full((counts.shape[0] if counts.ndim == 2 else 0, ks.size), np.nan)
    failed = 0
    for row, result in _replicate_geometries(stack, counts, tol=tol, rtol=rtol, span_rtol=span_rtol,
                                             batch_size=int(batch_size), dtype=dtype, device=device):
        if isinstance(result, str):
            failed += 1
        else:
            values[row] = theory_values(result, ks, statistic)
    return values, failed


def interval_sweep_torch(
    moment_shards: Sequence[Moments],
    *,
    statistic: str = "ntps",
    variant: str = "theory",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "basic",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    estimator: str = "plugin",
) -> pd.DataFrame:
    """The frame of ``ntps_interval_sweep(moment_shards, ...)`` (theory variant), solved on ``device``.

    The same bootstrap count matrix (``bootstrap_counts(S, n_boot, seed)``) and leave-one-shard-out
    replicates as the numpy function, the same summaries; the replicates' moments are formed
    ``batch_size`` at a time as one product and their eigenproblems solved as one batched call
    (see `interval_replicates_torch`).

    Parameters
    ----------
    moment_shards, statistic, n_boot, level, seed, method, centred, tol, rtol : as in
        `ntps_nb.core.intervals.ntps_interval_sweep`.
    variant : must be "theory".
    device, dtype, batch_size : as in `interval_replicates_torch`.
    estimator : must be "plugin" (the other estimators run in numpy:
        `ntps_nb.core.intervals.ntps_interval_sweep`); a ValueError says so.

    Returns
    -------
    DataFrame, one row per k = 1..r_V of the full data, with the columns of
    `ntps_nb.core.intervals.ntps_interval_sweep` (theory variant, estimator "plugin").
    """
    _check_options(n_boot, level, seed, method, variant, statistic)
    _check_plugin(estimator, "ntps_nb.core.intervals.ntps_interval_sweep")
    if variant != "theory":
        raise ValueError("the torch backend computes the theory variant's intervals; use "
                         "ntps_nb.core.intervals.ntps_interval_sweep for variant='reference'")
    dtype, device = _check_dtype(dtype), _device(device)
    stack = TorchShardStack(moment_shards, centred=centred, dtype=dtype, device=device)
    n_shards = len(stack)
    full_n_texts = int(round(stack.n_texts.sum()))
    ((_, full),) = list(_replicate_geometries(stack, np.ones((1, n_shards)), tol=tol, rtol=rtol, span_rtol=SPAN_RTOL,
                                              batch_size=1, dtype=dtype, device=device))
    if isinstance(full, str):
        raise ValueError(full)
    ks = np.arange(1, full.r_V + 1)
    estimate = theory_values(full, ks, statistic)
    counts = np.vstack([bootstrap_counts(n_shards, n_boot, seed), 1.0 - np.eye(n_shards)])
    values, failed = _replicate_values(stack, counts, ks, statistic=statistic, tol=tol, rtol=rtol,
                                       span_rtol=SPAN_RTOL, batch_size=batch_size, dtype=dtype, device=device)
    boot, jack = values[:n_boot], values[n_boot:]
    _warn_failed(failed, n_boot + n_shards)
    deviations, se_jack = _jackknife(jack)
    summary = _summary(estimate, boot, deviations, se_jack, level, method)
    index = {"k": ks, "fraction": ks / full.r_V, "k_U": np.minimum(ks, full.m), "m": full.m, "r_V": full.r_V}
    return pd.DataFrame({
        "statistic": statistic, "variant": variant, "estimator": "plugin", **index, statistic: estimate, **summary,
        "n_shards": n_shards, "n_texts": full_n_texts, "n_boot": int(n_boot), "level": float(level),
        "method": method, "seed": int(seed), "centred": centred,
    })
