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
- `ntps_torch`: ``ntps`` at one k or fraction (either variant; the plug-in and richardson);
- `interval_sweep_torch`: the frame of ``ntps_interval_sweep(shards)`` (theory variant), with
  the bootstrap and jackknife replicate moments formed as one product (shares x stacked shards)
  per block of replicates and each block's eigenproblems solved as one batched call;
- `interval_replicates_torch`: the statistic of every replicate (the batched step alone; either
  variant), which ``ntps_interval``, ``excess_loss_interval``, ``ntps_difference`` and ``width_by_n``
  use with ``device=``;
- the reference variant's intervals (`interval_sweep_torch` with ``variant="reference"``);
- `ntps_diagnostics_torch`: ``ntps_diagnostics`` (perturbations and the label-permutation null,
  each solved a block at a time in one batched call, from the numpy function's own random draws);
- `least_squares_predictions_torch`: the least-squares probe of ``heldout_probe``, batched over
  layers;
- `logistic_probe_torch`: the held-out logistic-regression probe (StandardScaler + sklearn's L2
  multinomial / binomial LogisticRegression objective, solved by batched Newton-CG to a gradient
  tolerance), batched over layers and over a grid of C (the cross-validated probe's folds x C);
- `singular_coordinates_torch`, `singular_values_torch`, `h_score_torch`,
  `h_score_ledoit_wolf_torch`, `principal_root_torch`: the factorisations of LogME, RankMe, the
  H-scores and the PCA-overlap control.

Per-shard moments given to any of these are pooled on the device, with `Moments.combine`'s weights and
operations in its order (the same numbers to the bit), reading a shard's resident copy where extraction kept one
(`keep_resident`): no d x d sum runs on the host.

The core's public functions reach these through ``device=`` (`ntps_nb.core.backends.analysis_backend`):
``ntps``, ``ntps_sweep``, ``ntps_interval``, ``excess_loss_interval``, ``ntps_interval_sweep``,
``ntps_difference``, ``width_by_n``, ``ntps_estimate``, ``estimate_by_n``, ``ntps_diagnostics``,
``heldout_probe``, ``probe_layers``, ``cv_logistic_probe`` and the peers of `ntps_nb.core.peers`.

Where the computation differs in form from the numpy code, the quantity is the same:

- U needs only its m <= C label-carrying directions. When C is below the retained rank of Sxx,
  the reduced problem (W^T Sxy)(W^T Sxy)^T is solved through its C x C Gram form
  G^T G = Z diag(lambda) Z^T, Y = G Z diag(lambda)^{-1/2}: the same nonzero eigenpairs, from an
  eigensolve of size C instead of r_U.
- Interval and estimate replicates of shards with fewer texts than dimensions (the pooled Sxx of
  numerical rank p <= `RANGE_BASIS_MAX_SHARE` d) whiten each replicate's Sxx inside the pooled
  range R (`TorchShardStack.range_basis`): eigh of R^T Sxx R (p x p) instead of Sxx (d x d). Every
  combination of the shards has its Sxx in that range, so the eigenpairs above the rank threshold
  are the same; a block where some Sxx reaches outside R by more than `RANGE_BASIS_SAFETY` times
  its threshold is solved on the whole space.
- The released algorithm's next-token side (C1 C1^T, C0) is whitened by C0's Cholesky factor where
  C0 is certified to keep all d directions (`_certified_cholesky`), instead of by its
  eigendecomposition: the same C0-orthonormal eigenvectors up to sign and rounding (its eigenvalues
  are distinct), one eigendecomposition of size d fewer per solve. Its perception side keeps the
  eigendecomposition: the released order reads Sxy Sxy^T's null space first, whose basis depends on
  the whitening (SPEC section 4).
- The nested orthonormal basis of Sxx^{1/2} V (`nested_orthonormal_basis`) is one batched
  Householder QR of the first min(r_U, r_V) columns when every diagonal of R is above
  ``span_rtol`` times its column's norm (the generic case, where the numpy function also does a
  single QR and the remaining columns add no direction). A replicate where that check fails,
  i.e. the span is rank deficient, is handed to the numpy `nested_orthonormal_basis` on the CPU.
- The logistic probe is iterative on both sides: sklearn's lbfgs and this Newton-CG stop at
  different points within ``tol`` of the same optimum, so the coefficients agree to about tol
  over the objective's smallest curvature, and a test text on the decision boundary may be
  predicted differently (1 of 8000 at d = 896, tol = 1e-6 in benchmarks/bench_logistic_probe.py;
  there sklearn's was the one off the tightly converged optimum).

torch is imported by this module only; nothing else in `ntps_nb.core` imports it.
"""

from __future__ import annotations

import concurrent.futures
import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from ntps_nb.core.diagnostics import (
    FEATURE_MATCH_RTOL,
    PERTURB_SCALE,
    SOLVER_CONFIGS,
    HostSolverProcesses,
    _fractions,
    _label_design,
    _perturb,
    _reference_values,
    _theory_ks,
    _theory_values,
    check_diagnostics_inputs,
    diagnostics_frame,
    solver_deviations,
)
from ntps_nb.core.estimators import (
    BOUND_SE,
    DEFAULT_ESTIMATOR,
    DEVICE_ESTIMATORS,
    ESTIMATORS,
    GAP_MIN,
    NOISE_MAX,
    STATIONARY_COLUMNS,
    STATIONARY_SE,
    _angles_of,
    _as_shards,
    _check_estimate_options,
    _check_ks,
    _estimate_frame,
    _gap_frame,
    _noise_frame,
    _richardson_combination,
    _stationary_columns,
    min_shards,
    split_halves,
    stationary_reach_se,
)
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
from ntps_nb.core.progress import progress_bar
from ntps_nb.core.score import (
    REFERENCE_ABS_TOL,
    REFERENCE_FRACTIONS,
    SPAN_RTOL,
    Precision,
    ReferenceGeometry,
    TheoryGeometry,
    Variant,
    check_reference_counts,
    check_reference_fraction,
    reference_sweep_frame,
    warn_of_the_sample,
)
from ntps_nb.core import validation
from ntps_nb.core.subspaces import (A_RANK_RTOL, RANGE_RTOL, Order, Subspace, check_class_counts, check_labels,
                                    nested_orthonormal_basis, reach_of)

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
#: Shards whose pooled Sxx has a numerical rank p at most this share of d (fewer texts than
#: dimensions, as at N = 2,000 and d = 4,096) have every combination's Sxx whitened inside that
#: p-dimensional range (`TorchShardStack.range_basis`): an eigensolve of size p instead of d.
RANGE_BASIS_MAX_SHARE = 0.6
#: ... provided a combination's Sxx reaches outside the range by at most this share of its own rank
#: threshold (||Sxx R_perp||_F, which bounds the part of Sxx the restriction leaves out); a block
#: where one does not is solved on the whole space instead.
RANGE_BASIS_SAFETY = 1e-2
#: Safety factor on d eps ||B||_F added to the rank threshold before a Cholesky factorisation
#: certifies that B has full rank (`_certified_cholesky`); far above Cholesky's backward error.
CERTIFY_MARGIN = 16.0
#: Device types the backend computes on (both have float64 eigensolvers).
DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, checked to be one this backend can compute on here.

    Parameters
    ----------
    device : "cpu", "cuda", "cuda:<i>" or a ``torch.device`` of those types.

    Returns
    -------
    torch.device; "cuda" without an index is given the index of the current CUDA device (as torch resolves it),
    so that it equals the device of the tensors placed there (a resident copy's, `keep_resident`).

    Raises
    ------
    ValueError for a name that is not a torch device, a device type other than cpu / cuda (the
    backend needs float64 eigensolvers), CUDA where torch sees none, or a CUDA index out of range.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device must be None or 'cpu-numpy' (numpy) or a torch device name ('cpu', 'cuda', "
                         f"'cuda:0', ...), got {device!r}") from error
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r}: the torch backend computes on {' or '.join(DEVICE_TYPES)} devices "
                         f"(float64 eigensolvers), not {parsed.type!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here (torch.cuda.is_available() is "
                             "False); use 'cpu' (torch) or None (numpy)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


_device = check_device


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 (default) or torch.float32, got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------
# Moments that stay on the device between extraction and analysis

#: id(host array) -> (weak reference to it, its copy on a device); an entry goes with its array.
_RESIDENT: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def keep_resident(array: np.ndarray, tensor: torch.Tensor) -> None:
    """Record that ``tensor`` (on a device) holds the same numbers as the host ``array``, so that
    the backend reads it instead of copying ``array`` to that device again (extraction keeps its
    finalised moments this way: `ntps_nb.extract.extract(..., keep_on_device=True)`). The record,
    and with it the device copy, goes when ``array`` is freed. The backend never writes to its
    inputs; the caller promises that ``array`` is not modified (the moments' arrays are read-only).

    Parameters
    ----------
    array : a host numpy array (read-only).
    tensor : a torch tensor of the same shape and values.

    Returns
    -------
    None
    """
    if tuple(tensor.shape) != array.shape:
        raise ValueError(f"a resident copy must have the array's shape {array.shape}, got {tuple(tensor.shape)}")
    key = id(array)
    # the table is bound, not looked up: at interpreter exit the module's globals are gone before the arrays
    _RESIDENT[key] = (weakref.ref(array, lambda _, key=key, table=_RESIDENT: table.pop(key, None)), tensor)


def make_resident(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """``array``'s resident copy on ``device``, made and recorded by `keep_resident` unless it has one there: a
    device copy, or on the CPU a tensor sharing the array's memory (nothing is copied). What
    `ntps_nb.extract.keep_moments_resident` does to each moment of an extraction read from the cache.

    Parameters
    ----------
    array : a host numpy array (read-only; float64 is not copied on the CPU).
    device : the torch device the backend will read it on.

    Returns
    -------
    torch.Tensor
        The resident copy (float64).
    """
    device = check_device(device)
    kept = resident(array)
    if kept is None or kept.device != device:
        kept = _from_host(array).to(device=device)
        keep_resident(array, kept)
    return kept


def _from_host(array) -> torch.Tensor:
    """A float64 CPU tensor of ``array``'s memory (a copy only where it is not contiguous float64). Never written
    here, so the read-only flag of the core's moment arrays, which torch.from_numpy warns of, does not matter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def resident(array: object) -> torch.Tensor | None:
    """The device copy recorded for this very host array by `keep_resident`.

    Parameters
    ----------
    array : any object (a host numpy array, usually a moment of `ntps_nb.core.moments.Moments`).

    Returns
    -------
    torch.Tensor or None
        The tensor `keep_resident` recorded for ``array`` itself (not for a copy or a view of it),
        None if there is none.
    """
    entry = _RESIDENT.get(id(array))
    if entry is None or entry[0]() is not array:
        return None
    return entry[1]


def _tensor(array, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """``array`` (a host array, its resident copy where it has one on ``device``, or a tensor) on ``device`` in
    ``dtype``; a host array is copied, never aliased."""
    device = check_device(device)
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    kept = resident(array)
    if kept is not None and kept.device == device:
        return kept.to(dtype=dtype)
    if device.type == "cpu":
        # np.array copies: the core's moment arrays are read-only views, which torch.from_numpy warns about
        return torch.from_numpy(np.array(array, dtype=np.float64)).to(device=device, dtype=dtype)
    # to another device straight from the host array: the device copy never aliases it (no host copy first)
    return _from_host(array).to(device=device, dtype=dtype)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def negative_reach_torch(B: Float[np.ndarray, "d d"] | torch.Tensor, device: str | torch.device | None = None, *,
                         tol: float | None = None, rtol: float = RANGE_RTOL) -> float:
    """`ntps_nb.core.subspaces.negative_reach` on ``device`` (the same Cholesky test, then the eigenvalues where it
    fails): how far below zero a symmetric B, positive semi-definite in exact arithmetic, reaches over its largest
    eigenvalue, 0 within the range tolerance (-``rtol`` x it, default `RANGE_RTOL`, or -``tol``). The extraction's
    check of float32 token products (`ntps_nb.extract.token_rounding` is this function; why the reach matters:
    `negative_reach`).

    Parameters
    ----------
    B : (d, d) symmetric matrix (numpy array or torch tensor); float64.
    device : where to factorise it (default: where it is; the host for an array).
    tol, rtol : the range tolerance, as in `ntps_nb.core.subspaces.negative_reach`.

    Returns
    -------
    float >= 0: -lambda_min / lambda_max where -lambda_min exceeds the tolerance, else 0.
    """
    B = torch.as_tensor(np.array(B, dtype=np.float64) if isinstance(B, np.ndarray) else B,  # writable
                        dtype=torch.float64, device=device)
    B = (B + B.mT) / 2
    shift = float(tol) if tol is not None else rtol * float(torch.diagonal(B).max().clamp(min=0.0))
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
    if shift > 0 and int(torch.linalg.cholesky_ex(B + shift * eye).info) == 0:
        return 0.0
    return reach_of(_numpy(torch.linalg.eigvalsh(B)), tol=tol, rtol=rtol)


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
    return _perception_whitened(W.mT @ Sxy)


def _perception_whitened(G: torch.Tensor):
    """`_perception_top` from the whitened label moments G = W^T Sxy, (n, r_U, C), for any
    whitening W of Sxx (W^T Sxx W = I on its range)."""
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


def _next_token_vectors(Q_r: torch.Tensor, s_r: torch.Tensor, C1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalized eigenvalues (n, r_V) and C0-orthonormal eigenvectors V (n, d, r_V) of
    (C1 C1^T, C0), both descending."""
    W = Q_r / torch.sqrt(s_r)[:, None, :]
    G = W.mT @ C1
    M = G @ G.mT
    mu, Y = torch.linalg.eigh((M + M.mT) / 2)
    return mu.flip(-1), W @ Y.flip(-1)


def _projected(v_coords: torch.Tensor, u_coords: torch.Tensor,
               span_rtol: float) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``projected[:, k-1, i]`` = ||P_k u_i||^2, P_k the projector onto the span of the first k
    columns of v_coords, for every k = 1..r_V; numpy (n, r_V, w). Also each element's overlap of the nested
    orthonormal basis of v_coords with u_coords, (q, w), and how many basis vectors span the first k columns
    at each k (`ntps_nb.core.score.TheoryGeometry`'s ``overlap`` and ``span_counts``)."""
    n, r_U, r_V = v_coords.shape
    q = min(r_U, r_V)
    norms = torch.linalg.vector_norm(v_coords, dim=1)
    basis, R = torch.linalg.qr(v_coords[..., :q])
    diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
    generic = _numpy((diagonal > span_rtol * norms[:, :q]).all(dim=-1))
    overlap_all = basis.mT @ u_coords  # (n, q, w)
    cum = torch.cumsum(overlap_all**2, dim=1)  # (n, q, w)
    steps = torch.clamp(torch.arange(r_V, device=cum.device), max=q - 1)
    projected = _numpy(cum[:, steps])
    overlap = list(_numpy(overlap_all).astype(np.float64))
    generic_counts = np.minimum(np.arange(1, r_V + 1), q).astype(np.int64)
    counts = [generic_counts] * n
    for j in np.flatnonzero(~generic):  # the span is rank deficient: the numpy function's exact handling
        nested, nested_counts = nested_orthonormal_basis(_numpy(v_coords[j]).astype(np.float64), rtol=span_rtol)
        overlap[j] = nested.T @ _numpy(u_coords[j]).astype(np.float64)
        table = np.cumsum(overlap[j] ** 2, axis=0)
        projected[j] = 0.0
        has_basis = nested_counts > 0
        projected[j][has_basis] = table[nested_counts[has_basis] - 1]
        counts[j] = nested_counts
    return np.clip(projected.astype(np.float64), 0.0, 1.0), overlap, counts


def _theory_geometries(
    Sxx: torch.Tensor, Sxy: torch.Tensor, Syy: torch.Tensor, C0: torch.Tensor, C1: torch.Tensor,
    n_tokens: np.ndarray, labels_ok: np.ndarray, *, tol: float | None, rtol: float, span_rtol: float,
) -> list[TheoryGeometry | str]:
    """`theory_geometry` of each batch element, or the reason (a string) it is undefined, checked
    in the order the numpy code raises."""
    return _grouped_geometries(Sxx, Sxy, Syy, C0, C1, n_tokens, labels_ok, tol=tol, rtol=rtol,
                               span_rtol=span_rtol)[0]


def _certified_cholesky(B: torch.Tensor, tol: float | None, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factors L (B = L L^T) of a (n, d, d) batch, and which elements are certified to
    have every eigenvalue above the range threshold of `_eigh_range` (rank d, as eigh would find).

    The certificate is a Cholesky factorisation of B - tau I with tau = the threshold's upper bound
    (``tol``, or ``rtol`` times the Frobenius norm, which bounds the largest eigenvalue) plus
    `CERTIFY_MARGIN` d eps ||B||_F, more than both factorisations' rounding errors: where it
    succeeds, every eigenvalue lies above the threshold, so the eigh path would keep all d."""
    d = B.shape[-1]
    B = (B + B.mT) / 2
    size = torch.linalg.matrix_norm(B)
    base = torch.full_like(size, float(tol)) if tol is not None else rtol * size
    shift = base + CERTIFY_MARGIN * d * torch.finfo(B.dtype).eps * size
    eye = torch.eye(d, dtype=B.dtype, device=B.device)
    _, shifted = torch.linalg.cholesky_ex(B - shift[:, None, None] * eye)
    L, info = torch.linalg.cholesky_ex(B)
    return L, (shifted == 0) & (info == 0) & torch.isfinite(size)


def _grouped_geometries(
    Sxx: torch.Tensor, Sxy: torch.Tensor, Syy: torch.Tensor, C0: torch.Tensor, C1: torch.Tensor,
    n_tokens: np.ndarray, labels_ok: np.ndarray, *, tol: float | None, rtol: float, span_rtol: float,
    keep: np.ndarray | None = None, whitening: str = "auto",
    range_basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[TheoryGeometry | str], list[tuple]]:
    """`_theory_geometries`, solved per group of elements with equal ranks (r_U, r_V) and whitenings;
    and, for the groups holding an element flagged in ``keep``, their solutions (members, Q_r, s_r,
    Y, m, V): the retained range of Sxx, U's whitened coordinates (descending), the counts m and the
    next-token vectors, for callers that compare the subspaces themselves.

    Whitening: with ``whitening="auto"`` a Sxx (or C0) certified of full rank (`_certified_cholesky`)
    is whitened by its Cholesky factor, W = L^{-T}, and any other by eigh, W = Q_r S_r^{-1/2}, each
    side on its own (at N < d Sxx is rank deficient while C0, from every token, is not);
    ``whitening="eigh"`` uses eigh for all. NTPS is a ratio of projections in the Sxx and C0 inner
    products, the same for any whitening, so both give the same geometry to rounding; a Cholesky
    factor and two triangular solves cost a small part of an eigendecomposition. Elements flagged in
    ``keep`` whiten Sxx by eigh (their Q_r, s_r are part of the result).

    With ``range_basis`` (R, R_perp) from `TorchShardStack.range_basis` (the elements are
    combinations of those shards), Sxx is eigendecomposed inside span(R): eigh of R^T Sxx R (p x p),
    Q = R Z, the same eigenpairs above the rank threshold; where some element's ||Sxx R_perp||_F
    exceeds `RANGE_BASIS_SAFETY` times its threshold, the block's Sxx is eigendecomposed whole."""
    if whitening not in ("auto", "eigh"):
        raise ValueError(f"whitening must be 'auto' or 'eigh', got {whitening!r}")
    n, d = Sxx.shape[0], Sxx.shape[-1]
    device = Sxx.device
    trace = _numpy(torch.diagonal(Syy, dim1=-2, dim2=-1).sum(dim=-1))
    chol_U = chol_V = np.zeros(n, dtype=bool)
    L_U = L_V = None
    if whitening == "auto":
        if range_basis is None:  # inside a range of p < d dimensions Sxx is never of full rank
            L_U, ok = _certified_cholesky(Sxx, tol, rtol)
            chol_U = _numpy(ok) & (np.ones(n, dtype=bool) if keep is None else ~np.asarray(keep, dtype=bool))
        L_V, ok = _certified_cholesky(C0, tol, rtol)
        chol_V = _numpy(ok)

    def eigh_side(B: torch.Tensor, chol: np.ndarray, basis=None):
        """eigh of the elements not whitened by Cholesky (inside span(R) for a ``basis`` (R, R_perp)
        that holds all of them): (positions of each element in that batch, s, Q (d, width), ranks
        and thresholds of all n elements)."""
        rest = np.flatnonzero(~chol)
        rank, threshold = np.full(n, d), np.zeros(n)
        if rest.size == 0:
            return {}, None, None, rank, threshold
        sub = B if rest.size == n else B[torch.as_tensor(rest, device=device)]
        solved = None
        if basis is not None:
            R, R_perp = basis
            s_, Z, thr, r = _eigh_range(R.mT @ sub @ R, tol, rtol)
            outside = torch.linalg.matrix_norm(sub @ R_perp)
            if bool((outside <= RANGE_BASIS_SAFETY * thr).all()):
                solved = s_, R @ Z, thr, r
        s_, Q_, thr, r = solved if solved is not None else _eigh_range(sub, tol, rtol)
        rank[rest], threshold[rest] = _numpy(r), _numpy(thr)
        return {int(i): j for j, i in enumerate(rest)}, s_, Q_, rank, threshold

    pos_U, s_U, Q_U, r_U, threshold_U = eigh_side(Sxx, chol_U, range_basis)
    pos_V, s_V, Q_V, r_V, threshold_V = eigh_side(C0, chol_V)
    width_U = d if Q_U is None else Q_U.shape[-1]
    out: list[TheoryGeometry | str | None] = _undefined_reasons(r_U, r_V, threshold_U, threshold_V, n_tokens,
                                                                labels_ok)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        if out[i] is None:
            groups.setdefault((bool(chol_U[i]), int(r_U[i]), bool(chol_V[i]), int(r_V[i])), []).append(i)
    kept = []
    for (cu, ru, cv, rv), members in groups.items():
        everyone = len(members) == n
        index = None if everyone else torch.as_tensor(members, device=device)

        def take(t):
            return t if index is None else t[index]

        def take_eigh(t, pos):  # rows of an eigh batch that holds only the non-Cholesky elements
            if len(pos) == n and everyone:
                return t
            return t[torch.as_tensor([pos[i] for i in members], device=device)]

        if cu:
            L = take(L_U)
            lam, Y, m = _perception_whitened(torch.linalg.solve_triangular(L, take(Sxy), upper=False))

            def coordinates(X, L=L):  # x -> W_U^{-1} x = L_U^T x
                return L.mT @ X
            Q_r = s_r = None
        else:
            Q_r, s_r = take_eigh(Q_U, pos_U)[..., width_U - ru:], take_eigh(s_U, pos_U)[..., width_U - ru:]
            lam, Y, m = _perception_top(Q_r, s_r, take(Sxy))

            def coordinates(X, Q_r=Q_r, s_r=s_r):  # x -> S_r^{1/2} Q_r^T x
                return torch.sqrt(s_r)[:, :, None] * (Q_r.mT @ X)
        if cv:
            L = take(L_V)
            G = torch.linalg.solve_triangular(L, take(C1), upper=False)
            M = G @ G.mT
            mu, Y_V = torch.linalg.eigh((M + M.mT) / 2)
            mu = mu.flip(-1)
            V = torch.linalg.solve_triangular(L.mT, Y_V.flip(-1), upper=True)
        else:
            mu, V = _next_token_vectors(take_eigh(Q_V, pos_V)[..., d - rv:], take_eigh(s_V, pos_V)[..., d - rv:],
                                        take(C1))
        projected, overlap, span_counts = _projected(coordinates(V), Y, span_rtol)
        lam, m, mu = _numpy(lam).astype(np.float64), _numpy(m), _numpy(mu).astype(np.float64)
        for j, i in enumerate(members):
            out[i] = _geometry_or_reason(lam[j], projected[j], int(m[j]), ru, rv, float(trace[i]), mu[j],
                                         overlap[j], span_counts[j])
        if keep is not None and any(keep[i] for i in members):  # flagged elements are never Cholesky-whitened on U
            kept.append((members, Q_r, s_r, Y, m, V))
        del V
    return out, kept


def _geometry_or_reason(lam: np.ndarray, projected: np.ndarray, m: int, r_U: int, r_V: int,
                        trace_Syy: float, next_token: np.ndarray | None = None, overlap: np.ndarray | None = None,
                        span_counts: np.ndarray | None = None) -> TheoryGeometry | str:
    """One element's `TheoryGeometry` from its descending eigenvalues (perception; next-token
    where given), projections and, where given, overlap and span counts (`_projected`), or why U is undefined."""
    if m == 0:
        return "Sxy is zero: the pooled states carry no label signal, U is undefined"
    return TheoryGeometry(eigenvalues=lam[:m].copy(), projected=projected[:, :m].copy(), r_V=r_V, r_U=r_U,
                          trace_Syy=trace_Syy, next_token_eigenvalues=None if next_token is None else next_token.copy(),
                          overlap=None if overlap is None else overlap[:, :m].copy(),
                          span_counts=None if span_counts is None else span_counts.copy())


def theory_geometry_torch(
    moments: Moments | Sequence[Moments], *, centred: bool = False, tol: float | None = None, rtol: float = RANGE_RTOL,
    span_rtol: float = SPAN_RTOL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
) -> TheoryGeometry:
    """`ntps_nb.core.score.theory_geometry`, solved on ``device``; returns the numpy `TheoryGeometry`.

    Parameters
    ----------
    moments : the layer's `Moments`, or a list of per-shard `Moments` (pooled on ``device``, as
        `Moments.combine` pools them).
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
    dtype, device = _check_dtype(dtype), _device(device)
    return _pooled_geometry(_Pooled.of(moments, device), centred=centred, tol=tol, rtol=rtol, span_rtol=span_rtol,
                            dtype=dtype)


def _pooled_geometry(pooled: "_Pooled", *, centred: bool, tol: float | None, rtol: float, span_rtol: float,
                     dtype: torch.dtype) -> TheoryGeometry:
    """`theory_geometry_torch` of moments pooled on the device."""
    if centred:
        pooled = pooled.centred()
    pooled.check_labels()
    (result,) = _theory_geometries(*pooled.batch(dtype), np.array([pooled.n_tokens]), np.array([True]),
                                   tol=tol, rtol=rtol, span_rtol=span_rtol)
    if isinstance(result, str):
        raise ValueError(result)
    return result


def pooled_subspaces_torch(
    moment_shards: Moments | Sequence[Moments], *, rtol: float = RANGE_RTOL, device: str | torch.device = "cpu",
    with_pooled: bool = False,
) -> tuple[Subspace, Subspace] | tuple[Subspace, Subspace, Moments]:
    """`ntps_nb.core.subspaces.perception_subspace` and `next_token_subspace` (descending) of the pooled
    shards, solved on ``device`` in float64 and returned as numpy `Subspace`: what the rotation sets of
    `ntps_estimate`'s flag and interval read (`ntps_nb.core.rotation`), without solving the pooled
    moments again on the host.

    Parameters
    ----------
    moment_shards : one `Moments` or per-shard `Moments` of one layer (pooled on ``device`` as `ntps_sweep` pools
        them).
    rtol : relative range tolerance of Sxx and C0.
    device : the torch device that solves them.
    with_pooled : also return the pooled moments on the host, `Moments.combine`'s arrays to the bit (without
        ``Shh``) but summed on ``device``: the rotation sets' plane replicates read the pooled Sxy, Sxx, C1 and
        C0, and the host sum of many d x d shards is what the device paths avoid (2.5-5.9 s at d = 4096 and 20
        shards on the device tool's host, benchmarks/results/device_pooling).

    Returns
    -------
    (U, V) : the perception subspace of (Sxy Sxy^T, Sxx) and the next-token subspace of (C1 C1^T, C0); with
        ``with_pooled`` the tuple (U, V, pooled `Moments`).
    """
    pooled = _Pooled.of(moment_shards, _device(device))
    pooled.check_labels()
    if pooled.n_tokens == 0:
        raise ValueError("no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero")
    U, V = (generalized_eigh_torch(B, A_factor=F, rtol=rtol, device=device, name=name).to_numpy()
            for B, F, name in ((pooled.Sxx, pooled.Sxy, "Sxx"), (pooled.C0, pooled.C1, "C0")))
    return (U, V, pooled.on_host()) if with_pooled else (U, V)


@dataclass(frozen=True, eq=False)
class _Pooled:
    """One layer's pooled moments as float64 tensors on a device: one `Moments` as it is, or per-shard `Moments`
    combined there with `Moments.combine`'s checks, weights and operations in its order, so the same numbers to
    the bit without summing d x d shards on the host (a shard's arrays are read where they are resident,
    `keep_resident`)."""

    Sxx: torch.Tensor
    Sxy: torch.Tensor
    Syy: torch.Tensor
    C0: torch.Tensor
    C1: torch.Tensor
    x_mean: torch.Tensor | None
    n_texts: int
    n_tokens: int
    is_centred: bool

    @classmethod
    def of(cls, moments: Moments | Sequence[Moments], device: torch.device) -> "_Pooled":
        """The pooled moments of ``moments`` (one `Moments` or a non-empty list of per-shard `Moments`)."""
        parts = [moments] if isinstance(moments, Moments) else list(moments)
        if not parts or not all(isinstance(s, Moments) for s in parts):
            raise ValueError("moments must be one Moments or a non-empty list of per-shard Moments")
        if len(parts) == 1:
            (part,) = parts
            arrays = {name: _tensor(value, torch.float64, device) for name, value in part.arrays().items()
                      if name != "Shh"}
            return cls(**{"x_mean": None, **arrays}, n_texts=part.n_texts, n_tokens=part.n_tokens,
                       is_centred=part.is_centred)
        counts = Moments.combination_counts(parts)
        arrays = {name: _pooled_array(parts, counts, name, device) for name in ("Sxx", "Sxy", "Syy", "C0", "C1")}
        x_mean = None if any(p.x_mean is None for p in parts) else _pooled_array(parts, counts, "x_mean", device)
        return cls(**arrays, x_mean=x_mean, n_texts=int(round(counts.sum())), n_tokens=sum(p.n_tokens for p in parts),
                   is_centred=False)

    def centred(self) -> "_Pooled":
        """`Moments.centred` on the device (the same products and differences)."""
        if self.is_centred:
            return self
        if self.x_mean is None:
            raise ValueError("centred moments need x_mean (the mean pooled vector); extract with it recorded")
        x, y = self.x_mean, torch.diagonal(self.Syy)
        return _Pooled(Sxx=self.Sxx - torch.outer(x, x), Sxy=self.Sxy - torch.outer(x, y),
                       Syy=self.Syy - torch.outer(y, y), C0=self.C0, C1=self.C1, x_mean=x, n_texts=self.n_texts,
                       n_tokens=self.n_tokens, is_centred=True)

    def check_labels(self) -> None:
        """`ntps_nb.core.subspaces.check_labels` of these moments."""
        check_class_counts(_numpy(self.Syy), is_centred=self.is_centred)

    def on_host(self) -> Moments:
        """These moments as a host `Moments` (float64 numpy arrays; no ``Shh``, which is not pooled here)."""
        arrays = {name: _numpy(getattr(self, name)) for name in ("Sxx", "Sxy", "Syy", "C0", "C1")}
        x_mean = None if self.x_mean is None else _numpy(self.x_mean)
        return Moments(**arrays, x_mean=x_mean, n_texts=self.n_texts, n_tokens=self.n_tokens,
                       is_centred=self.is_centred)

    def batch(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Sxx, Sxy, Syy, C0, C1 in ``dtype``, each with a leading batch dimension of 1."""
        return [getattr(self, name).to(dtype)[None] for name in ("Sxx", "Sxy", "Syy", "C0", "C1")]


def _pooled_array(parts: Sequence[Moments], counts: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    """One moment of `Moments.combine(parts)` formed on ``device``: the same products and sums in the same order."""
    total = counts.sum()
    acc = torch.zeros(getattr(parts[0], name).shape, dtype=torch.float64, device=device)
    for count, part in zip(counts, parts):
        if count:
            acc += float(count / total) * _tensor(getattr(part, name), torch.float64, device)
    return acc


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
    ("plugin"); with the warnings of `ntps_nb.core.score.ntps_sweep` (`ntps_nb.core.score.warn_of_the_sample`).
    """
    return _theory_sweep(moments, centred=centred, tol=tol, rtol=rtol, device=device, dtype=dtype, stacklevel=3)


def _theory_sweep(moments: Moments | Sequence[Moments], *, centred: bool, tol: float | None, rtol: float,
                  device: str | torch.device, dtype: torch.dtype, stacklevel: int) -> pd.DataFrame:
    """`theory_sweep_torch`, its warnings at ``stacklevel`` counted from this function's caller (3: the caller's
    caller), as `warn_of_the_sample` counts it."""
    geometry, reach = _plugin_geometry(moments, centred=centred, tol=tol, rtol=rtol, device=device, dtype=dtype)
    frame = geometry.sweep()
    warn_of_the_sample(None, _as_shards(moments), geometry, frame["k"].to_numpy(), estimator="plugin",
                       centred=centred, tol=tol, rtol=rtol, stacklevel=stacklevel + 1, reach=reach)
    return frame.assign(estimator="plugin")


def _plugin_geometry(moments: Moments | Sequence[Moments], *, centred: bool, tol: float | None, rtol: float,
                     device: str | torch.device, dtype: torch.dtype) -> tuple[TheoryGeometry, float]:
    """The plug-in's theory geometry of the moments pooled on the device, and the negative reach of their C0 (the
    rounding check `warn_of_the_sample` reads): what the plug-in's sweep and one value share."""
    dtype, device = _check_dtype(dtype), _device(device)
    pooled = _Pooled.of(moments, device)
    geometry = _pooled_geometry(pooled, centred=centred, tol=tol, rtol=rtol, span_rtol=SPAN_RTOL, dtype=dtype)
    return geometry, negative_reach_torch(pooled.C0, tol=tol, rtol=rtol)


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


def _reference_solve(moments: Moments | Sequence[Moments], precision: Precision, tol: float, span_rtol: float,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The released algorithm's U and V (ascending) of the moments (pooled on ``device``), and V's nested
    orthonormal basis (float64) with its counts: what `reference_geometry_torch` and the reference sweep share."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    pooled = _Pooled.of(moments, device)
    pooled.check_labels()
    dtype = torch.float32 if precision == "float32" else torch.float64
    Sxy, C1 = pooled.Sxy.to(dtype), pooled.C1.to(dtype)
    U = generalized_eigh_torch(pooled.Sxx, A=Sxy @ Sxy.T, order="ascending", tol=tol, dtype=dtype,
                               device=device, name="Sxx").vectors
    V, basis, counts = _released_next_token(pooled.C0.to(dtype)[None], C1[None], tol, span_rtol)
    return U, V, basis, counts


def _released_next_token(C0: torch.Tensor, C1: torch.Tensor, tol: float,
                         span_rtol: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The released algorithm's V of one (1, d, d) C0 and C1 (ascending; C0 whitened by Cholesky
    where certified) and V's nested orthonormal basis (float64) with its counts."""
    (V,) = _ascending_solutions(C0, C1 @ C1.mT, tol, cholesky=True)
    if V is None:
        raise ValueError(f"C0 has no eigenvalue above the tolerance {tol:.3g}: it is zero or negative definite")
    basis, counts = _nested_basis(V.to(torch.float64), span_rtol)
    return V, basis, counts


def reference_geometry_torch(
    moments: Moments | Sequence[Moments], *, precision: Precision = "float32", tol: float = REFERENCE_ABS_TOL,
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
    moments : the layer's `Moments` (uncentred), or a list of per-shard `Moments` (pooled on ``device``).
    precision : "float32" (as released) or "float64".
    tol : absolute tolerance on the eigenvalues of Sxx and C0.
    span_rtol : relative residual below which a column of V adds no new direction.
    device : the torch device that solves it.

    Returns
    -------
    `ReferenceGeometry` (numpy arrays) with U (d, r_U) and V (d, r_V) in ascending order.
    """
    U, V, basis, counts = _reference_solve(moments, precision, tol, span_rtol, _device(device))
    U64 = U.to(torch.float64)
    projected = torch.cumsum(torch.cumsum((basis.T @ U64) ** 2, dim=0), dim=1)
    norms = torch.cumsum(torch.sum(U64**2, dim=0), dim=0)
    return ReferenceGeometry(U=_numpy(U), V=_numpy(V), projected=_numpy(projected), norms=_numpy(norms),
                             counts=counts, precision=precision)


def richardson_sweep_torch(
    moment_shards: Sequence[Moments], *, seed: int = 0, rtol: float = RANGE_RTOL,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """The frame of ``ntps_sweep(moment_shards, variant="theory", estimator="richardson", seed=seed)``
    with the three factorisations (all shards, and the two halves of the seeded split
    `ntps_nb.core.estimators.split_halves`) solved as one batched call on ``device``.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer, at least 2 (e.g. the two halves a study keeps).
    seed, rtol : as in `ntps_nb.core.score.ntps_sweep`.
    device, dtype : the torch device and precision of the solves.

    Returns
    -------
    DataFrame as `ntps_nb.core.score.ntps_sweep` returns it for "richardson": one row per k = 1..r_V
    of the pooled moments, NaN where a half is undefined (a single class) or has r_V below k; with
    `ntps_nb.core.score.ntps_sweep`'s warnings (`ntps_nb.core.score.warn_of_the_sample`).
    """
    return _richardson_sweep(moment_shards, seed=seed, rtol=rtol, device=device, dtype=dtype, stacklevel=3)


def _richardson_sweep(moment_shards: Sequence[Moments], *, seed: int, rtol: float, device: str | torch.device,
                      dtype: torch.dtype, stacklevel: int, at: tuple[int | None, float | None] | None = None
                      ) -> pd.DataFrame:
    """`richardson_sweep_torch`, its warnings at ``stacklevel`` (as `_theory_sweep`'s); ``at`` = (k, fraction): only
    the row of that k (as `ntps_nb.core.score.ntps` validates it), warned of as `ntps` warns."""
    shards = _as_shards(moment_shards)
    if len(shards) < 2:
        raise ValueError("estimator 'richardson' needs the moments of at least 2 shards of the texts "
                         "(extract with n_shards >= 2); estimator='plugin' needs only the pooled moments")
    dtype, device = _check_dtype(dtype), _device(device)
    stack = TorchShardStack(shards, centred=False, dtype=dtype, device=device)
    S = len(shards)
    counts = np.zeros((3, S))
    counts[0] = 1.0
    for row, half in enumerate(split_halves(S, seed), start=1):
        counts[row, half] = 1.0
    solved = dict(_replicate_geometries(stack, counts, tol=None, rtol=rtol, span_rtol=SPAN_RTOL, batch_size=3,
                                        dtype=dtype, device=device))
    full = solved[0]
    if isinstance(full, str):
        raise ValueError(full)
    frame = full.sweep()
    if at is not None:
        frame = frame[frame["k"] == full.k(*at)].reset_index(drop=True)
    ks = frame["k"].to_numpy()
    # the pooled moments and the halves against the pooled Sxx's retained rank, as ntps_sweep warns; C0's
    # rounding checked on the device
    warn_of_the_sample(None, shards, full, ks, estimator="richardson", seed=seed, rtol=rtol,
                       reach=negative_reach_torch(stack.pooled_C0(), device=device, rtol=rtol),
                       stacklevel=stacklevel + 1)
    halves = [np.full(ks.shape, np.nan) if isinstance(solved[row], str) else theory_values(solved[row], ks)
              for row in (1, 2)]
    sizes = (counts[1:] @ stack.n_texts).astype(np.int64)
    estimate = _richardson_combination(theory_values(full, ks), halves, [int(n) for n in sizes],
                                       int(stack.n_texts.sum()))
    return frame[["variant", "k", "fraction", "k_U", "m", "r_U", "r_V"]].assign(
        ntps=estimate, estimator="richardson", reliability=np.nan, n_shards=S)


def ntps_sweep_torch(
    moments: Moments | Sequence[Moments],
    *,
    variant: Variant = "theory",
    estimator: str = "plugin",
    seed: int = 0,
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: Precision = "float32",
    fractions: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    stacklevel: int = 2,
) -> pd.DataFrame:
    """`ntps_nb.core.score.ntps_sweep` with the factorisations on ``device``: the same arguments and
    frame, for the plug-in estimator and, on the theory variant, "richardson"
    (`richardson_sweep_torch`); ``dtype`` is the theory variant's precision (the reference variant
    takes ``precision``).

    Parameters
    ----------
    moments, variant, seed, centred, tol, rtol, precision, fractions : as in `ntps_nb.core.score.ntps_sweep`.
    estimator : "plugin" or, theory variant only, "richardson" (anything else raises).
    device : the torch device that solves it.
    dtype : torch.float64 (default) or torch.float32, theory variant only.
    stacklevel : where its warnings point, as `warnings.warn` counts from this function: 2 (default) is the line
        that called it; a function that calls it for its own caller (`ntps_nb.core.score.ntps_sweep` with
        ``device``) passes 3.

    Returns
    -------
    DataFrame as `ntps_nb.core.score.ntps_sweep` returns for the plug-in: one row per k (theory)
    or per fraction (reference).
    """
    if estimator == "richardson" and variant == "theory":
        if centred or tol is not None:
            raise ValueError("centred= and tol= are options of the plug-in; the other estimators use rtol only")
        return _richardson_sweep(moments, seed=seed, rtol=rtol, device=device, dtype=dtype, stacklevel=stacklevel + 1)
    if estimator != "plugin":
        raise ValueError(f"ntps_sweep_torch computes the plug-in and, on the theory variant, 'richardson'; got "
                         f"estimator={estimator!r} (variant {variant!r}): use ntps_nb.core.score.ntps_sweep (numpy)")
    if variant == "theory":
        return _theory_sweep(moments, centred=centred, tol=tol, rtol=rtol, device=device, dtype=dtype,
                             stacklevel=stacklevel + 1)
    if variant == "reference":
        if centred:
            raise ValueError("the reference variant uses the uncentred moments, as released")
        # only the NTPS at the fractions leave the device (U, V and the projection table stay there)
        U, V, basis, counts = _reference_solve(moments, precision, REFERENCE_ABS_TOL if tol is None else tol,
                                               SPAN_RTOL, _device(device))
        grid = np.asarray(REFERENCE_FRACTIONS if fractions is None else fractions, dtype=np.float64)
        values = _reference_lookup(basis, counts, U[None], grid)[0]
        return reference_sweep_frame(grid, U.shape[1], V.shape[1], values, precision).assign(estimator="plugin")
    raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")


def ntps_torch(
    moments: Moments | Sequence[Moments],
    k: int | None = None,
    *,
    fraction: float | None = None,
    variant: Variant = "theory",
    estimator: str = "plugin",
    seed: int = 0,
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: Precision = "float32",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    stacklevel: int = 2,
) -> float:
    """`ntps_nb.core.score.ntps` with the factorisations on ``device``: the same arguments, value, errors and
    warnings, for the plug-in and, on the theory variant, "richardson" (its three factorisations batched, as in
    `richardson_sweep_torch`).

    Parameters
    ----------
    moments, k, fraction, variant, seed, centred, tol, rtol, precision : as in `ntps_nb.core.score.ntps`.
    estimator : "plugin" or, theory variant only, "richardson" (anything else raises).
    device : the torch device that solves it.
    dtype : torch.float64 (default) or torch.float32, theory variant only.
    stacklevel : where its warnings point, as in `ntps_sweep_torch` (3 from `ntps_nb.core.score.ntps` with
        ``device``).

    Returns
    -------
    float, as `ntps_nb.core.score.ntps` returns it.
    """
    if variant == "reference":
        check_reference_fraction(k, fraction, centred)
        if estimator != "plugin":
            raise ValueError(f"the reference variant is the released algorithm; estimator={estimator!r} applies to the "
                             "theory variant only")
        frame = ntps_sweep_torch(moments, variant="reference", tol=tol, precision=precision, fractions=[fraction],
                                 device=device)
        check_reference_counts(fraction, *frame.loc[0, ["k_U", "k_V", "r_U", "r_V"]].astype(int))
        return float(frame.loc[0, "ntps"])
    if variant != "theory":
        raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")
    if estimator == "richardson":
        if centred or tol is not None:
            raise ValueError("centred= and tol= are options of the plug-in; the other estimators use rtol only")
        return float(_richardson_sweep(moments, seed=seed, rtol=rtol, device=device, dtype=dtype,
                                       stacklevel=stacklevel + 1, at=(k, fraction))["ntps"].iloc[0])
    _check_plugin(estimator, "ntps_nb.core.score.ntps")
    geometry, reach = _plugin_geometry(moments, centred=centred, tol=tol, rtol=rtol, device=device, dtype=dtype)
    kk = geometry.k(k, fraction)
    warn_of_the_sample(None, _as_shards(moments), geometry, [kk], estimator="plugin", seed=seed, centred=centred,
                       tol=tol, rtol=rtol, stacklevel=stacklevel + 1, reach=reach)
    return geometry.ntps(kk)


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
                out[i] = _tensor(getattr(shard, n), dtype, device).reshape(-1)
            self.stacked[n] = out

    def __len__(self) -> int:
        return len(self.shards)

    def range_basis(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An orthonormal basis R (d, p) of the range of the shards' pooled Sxx and one of its
        complement, R_perp (d, d - p), when p <= `RANGE_BASIS_MAX_SHARE` d; else None. Computed once.

        Every weighted combination of the shards has its Sxx inside the span of the shards' Sxx
        ranges, which is the range of their pooled Sxx (a sum of positive semi-definite matrices):
        with fewer texts than dimensions, each combination can be whitened inside R. p counts the
        pooled eigenvalues above d eps times the largest (rounding level, far below the rank
        threshold of any combination), so R leaves out nothing but rounding; each use still checks
        what it leaves out (`RANGE_BASIS_SAFETY`). None for a float32 stack: there the rounding of
        Sxx lies above the rank threshold (1e-10 of the largest eigenvalue), and the whole-space
        eigendecomposition keeps some of it, which the restriction would not."""
        if not hasattr(self, "_range_basis"):
            self._range_basis = None
            if self.stacked["Sxx"].dtype != torch.float64:
                return None
            pooled = self.combined(self._all_shares())["Sxx"][0]
            s, Q = torch.linalg.eigh((pooled + pooled.mT) / 2)
            floor = self.d * torch.finfo(s.dtype).eps * float(s[-1].clamp(min=0.0))
            p = int((s > floor).sum())
            if 0 < p <= RANGE_BASIS_MAX_SHARE * self.d:
                self._range_basis = (Q[:, self.d - p:].contiguous(), Q[:, :self.d - p].contiguous())
        return self._range_basis

    def pooled_C0(self) -> torch.Tensor:
        """The shards' pooled C0 (never centred), as `Moments.combine` weighs it, for the check of its rounding
        (`negative_reach_torch`), on the device: from the stack for a float64 stack; a float32 stack's own
        rounding would read as the moments', so there it is pooled from the shards' float64 arrays."""
        if self.stacked["C0"].dtype != torch.float64:
            return _pooled_array(self.shards, Moments.combination_counts(self.shards), "C0", self.stacked["C0"].device)
        return (self._all_shares() @ self.stacked["C0"])[0].reshape(self.shapes["C0"])

    def _all_shares(self) -> torch.Tensor:
        """(1, S) text shares of all the shards pooled (`Moments.combine`'s weights), on the stack's device."""
        a = self.stacked["Sxx"]
        return _tensor(self.n_texts[None] / self.n_texts.sum(), a.dtype, a.device)

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


def _replicate_blocks(stack: TorchShardStack, counts: np.ndarray, *, batch_size: int, dtype: torch.dtype,
                      device: torch.device, bar=None):
    """Yield (first row, combined moments, tokens, labels_ok) for each block of ``batch_size`` rows
    of a (n, S) count matrix; ``bar`` (a `progress_bar`) counts a block's rows once its consumer is done
    with it."""
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
        yield start, arrays, tokens[start:stop], labels_ok
        del arrays
        if bar is not None:
            bar.update(stop - start)


def _replicate_geometries(stack: TorchShardStack, counts: np.ndarray, *, tol, rtol, span_rtol, batch_size: int,
                          dtype: torch.dtype, device: torch.device, bar=None):
    """Yield (row, TheoryGeometry or reason) for each row of a (n, S) count matrix, a block at a time."""
    for start, arrays, tokens, labels_ok in _replicate_blocks(stack, counts, batch_size=batch_size, dtype=dtype,
                                                              device=device, bar=bar):
        results = _grouped_geometries(arrays["Sxx"], arrays["Sxy"], arrays["Syy"], arrays["C0"], arrays["C1"],
                                      tokens, labels_ok, tol=tol, rtol=rtol, span_rtol=span_rtol,
                                      range_basis=stack.range_basis())[0]
        del arrays  # before the next block is combined
        for row, result in enumerate(results, start=start):
            yield row, result


def _reference_replicates(stack: TorchShardStack, counts: np.ndarray, fractions: np.ndarray, *, precision: Precision,
                          tol: float, batch_size: int, dtype: torch.dtype, device: torch.device, bar=None
                          ) -> tuple[np.ndarray, int]:
    """The released algorithm's NTPS at ``fractions`` for each row of a count matrix, NaN rows
    where the geometry is undefined, and how many those are."""
    counts = np.asarray(counts, dtype=np.float64)
    values = np.full((counts.shape[0] if counts.ndim == 2 else 0, fractions.size), np.nan)
    failed = 0
    for start, arrays, _, labels_ok in _replicate_blocks(stack, counts, batch_size=batch_size, dtype=dtype,
                                                         device=device, bar=bar):
        block, outcome = _reference_rows(arrays["Sxx"], arrays["Sxy"], arrays["C0"], arrays["C1"], labels_ok,
                                         fractions, precision=precision, tol=tol, span_rtol=SPAN_RTOL)
        del arrays
        values[start:start + block.shape[0]] = block
        failed += sum(isinstance(o, str) for o in outcome)
    return values, failed


def interval_replicates_torch(
    moment_shards: Sequence[Moments],
    counts,
    ks=None,
    *,
    variant: Variant = "theory",
    fractions: np.ndarray | None = None,
    statistic: str = "ntps",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    span_rtol: float = SPAN_RTOL,
    precision: Precision = "float32",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    progress: bool = True,
    bar=None,
) -> tuple[np.ndarray, int]:
    """The statistic at ``ks`` (theory) or ``fractions`` (reference) for each weighted combination of the shards.

    Row i of the (n, S) ``counts`` takes shard s counts[i, s] times (a bootstrap draw; a row of
    ones minus the unit vector e_s leaves shard s out). ``batch_size`` replicates are combined by
    one product and solved by one batched eigensolve (default: as many as fit in half the free
    device memory, at most `MAX_BATCH`).

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (at least `MIN_SHARDS`).
    counts : (n, S) non-negative counts, every row covering at least one text.
    ks : (K,) numbers of next-token directions (theory variant).
    variant : "theory" (default) or "reference" (the released algorithm on each combination, in ``precision``).
    fractions : (K,) fractions of the reference variant (default: `REFERENCE_FRACTIONS`).
    statistic : "ntps" (default) or "excess_loss" (theory variant).
    centred, tol, rtol, span_rtol : as in `theory_geometry_torch` (the reference variant: ``tol`` as in
        `ntps_nb.core.score.reference_geometry`, default `REFERENCE_ABS_TOL`).
    precision : the reference variant's, "float32" (as released) or "float64".
    device, dtype : the torch device and precision of the solves.
    batch_size : replicates per batched solve, a positive integer (default: from free memory).
    progress : a bar over the n combinations, advanced a solved block at a time and shown once the call has run
        `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds (False: none).
    bar : an open `ntps_nb.core.progress.progress_bar` to advance instead (``progress`` is then not read): what
        `ntps_nb.core.intervals.ntps_interval` with ``device`` passes, its bar counting these replicates.

    Returns
    -------
    values : (n, K) float array, NaN where k exceeds the replicate's r_V, and a row of NaN where
        its geometry is undefined (e.g. a resample with a single class).
    failed : int, the number of such undefined replicates.
    """
    dtype, device = _check_dtype(dtype), _device(device)
    if variant == "reference":
        _check_reference(centred, precision)
        if statistic != "ntps":
            raise ValueError("the excess-loss identity is about the theory variant; use variant='theory'")
    elif variant != "theory":
        raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")
    stack = TorchShardStack(moment_shards, centred=centred, dtype=dtype, device=device)
    replicates = _curve_replicates(stack, counts, variant=variant, ks=ks, fractions=fractions, statistic=statistic,
                                   tol=tol, rtol=rtol, span_rtol=span_rtol, precision=precision,
                                   batch_size=batch_size, dtype=dtype, device=device)
    if bar is not None:
        return replicates(bar=bar)
    rows = np.shape(counts)[0] if np.ndim(counts) == 2 else 0
    with progress_bar(rows, "interval_replicates_torch", progress, unit="replicate") as own:
        return replicates(bar=own)


def _check_reference(centred: bool, precision: Precision) -> None:
    """The options the reference variant's replicates take: uncentred moments, a precision it runs in."""
    if centred:
        raise ValueError("the reference variant uses the uncentred moments, as released")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")


def _curve_replicates(stack: TorchShardStack, counts, *, variant: str, ks, fractions, statistic: str,
                      tol: float | None, rtol: float, span_rtol: float, precision: Precision,
                      batch_size: int | None, dtype: torch.dtype, device: torch.device):
    """The replicates' values of either variant, as a function of the bar that counts them: ``(bar=) -> (values,
    failed)``."""
    if variant == "reference":
        fr = REFERENCE_FRACTIONS if fractions is None else np.asarray(fractions, dtype=np.float64)
        return partial(_reference_replicates, stack, counts, fr, precision=precision,
                       tol=REFERENCE_ABS_TOL if tol is None else tol, dtype=dtype, device=device,
                       batch_size=_batch_size(batch_size, stack.d, dtype, device))
    return partial(_replicate_values, stack, counts, np.asarray(ks, dtype=np.int64), statistic=statistic, tol=tol,
                   rtol=rtol, span_rtol=span_rtol, batch_size=batch_size, dtype=dtype, device=device)


def _batch_size(batch_size: int | None, d: int, dtype: torch.dtype, device: torch.device) -> int:
    if batch_size is None:
        return _default_batch(d, torch.finfo(dtype).bits // 8, device)
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _replicate_values(stack, counts, ks, *, statistic, tol, rtol, span_rtol, batch_size, dtype, device, bar=None):
    batch_size = _batch_size(batch_size, stack.d, dtype, device)
    counts = np.asarray(counts, dtype=np.float64)
    values = np.full((counts.shape[0] if counts.ndim == 2 else 0, ks.size), np.nan)
    failed = 0
    for row, result in _replicate_geometries(stack, counts, tol=tol, rtol=rtol, span_rtol=span_rtol,
                                             batch_size=int(batch_size), dtype=dtype, device=device, bar=bar):
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
    precision: Precision = "float32",
    fractions: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    estimator: str = "plugin",
    progress: bool = True,
    stacklevel: int = 2,
) -> pd.DataFrame:
    """The frame of ``ntps_interval_sweep(moment_shards, ...)``, solved on ``device``.

    The same bootstrap count matrix (``bootstrap_counts(S, n_boot, seed)``) and leave-one-shard-out
    replicates as the numpy function, the same summaries; the replicates' moments are formed
    ``batch_size`` at a time as one product and their eigenproblems solved as one batched call
    (see `interval_replicates_torch`). The reference variant runs the released algorithm on each
    replicate in ``precision`` (float32 as released); where it is ill-posed (C below the rank of
    Sxx, SPEC section 4) its U is an arbitrary basis of a null eigenspace and torch and LAPACK pick
    different ones, so it equals numpy only where the problem is well-posed.

    Parameters
    ----------
    moment_shards, statistic, variant, n_boot, level, seed, method, centred, tol, rtol, precision,
        fractions : as in `ntps_nb.core.intervals.ntps_interval_sweep`.
    device, dtype, batch_size : as in `interval_replicates_torch` (``dtype``: the theory variant's
        precision and that of the stacked shard moments).
    estimator : must be "plugin" (the other estimators run in numpy:
        `ntps_nb.core.intervals.ntps_interval_sweep`); a ValueError says so.
    progress : a bar over the n_boot + S replicates, as `ntps_nb.core.intervals.ntps_interval_sweep` shows it,
        advanced a solved block at a time (False: none; a study's intervals stage passes False).
    stacklevel : where its warning of undefined replicates points, as in `ntps_sweep_torch` (3 from
        `ntps_nb.core.intervals.ntps_interval_sweep` with ``device``).

    Returns
    -------
    DataFrame with the columns of `ntps_nb.core.intervals.ntps_interval_sweep`: one row per
    k = 1..r_V of the full data (theory) or per fraction (reference).
    """
    _check_options(n_boot, level, seed, method, variant, statistic)
    _check_plugin(estimator, "ntps_nb.core.intervals.ntps_interval_sweep")
    dtype, device = _check_dtype(dtype), _device(device)
    if variant == "reference":
        _check_reference(centred, precision)
    elif fractions is not None:
        raise ValueError("fractions= is for the reference variant; the theory sweep covers every k")
    stack = TorchShardStack(moment_shards, centred=centred, dtype=dtype, device=device)
    n_shards = len(stack)
    full_n_texts = int(round(stack.n_texts.sum()))
    counts = np.vstack([bootstrap_counts(n_shards, n_boot, seed), 1.0 - np.eye(n_shards)])
    if variant == "reference":
        fr = REFERENCE_FRACTIONS if fractions is None else np.asarray(fractions, dtype=np.float64)
        ref_tol = REFERENCE_ABS_TOL if tol is None else tol
        options = dict(precision=precision, tol=ref_tol, dtype=dtype, device=device)
        (estimate,), failed_full = _reference_replicates(stack, np.ones((1, n_shards)), fr, batch_size=1, **options)
        if failed_full:
            raise ValueError("the reference geometry of the full data is undefined (fewer than 2 classes, or Sxx or "
                             f"C0 without an eigenvalue above {ref_tol:.3g})")
        index = {"fraction": fr}
    else:
        ((_, full),) = list(_replicate_geometries(stack, np.ones((1, n_shards)), tol=tol, rtol=rtol,
                                                  span_rtol=SPAN_RTOL, batch_size=1, dtype=dtype, device=device))
        if isinstance(full, str):
            raise ValueError(full)
        ks = np.arange(1, full.r_V + 1)
        estimate = theory_values(full, ks, statistic)
        fr = None
        index = {"k": ks, "fraction": ks / full.r_V, "k_U": np.minimum(ks, full.m), "m": full.m, "r_V": full.r_V}
    replicates = _curve_replicates(stack, counts, variant=variant, ks=index.get("k"), fractions=fr,
                                   statistic=statistic, tol=tol, rtol=rtol, span_rtol=SPAN_RTOL, precision=precision,
                                   batch_size=batch_size, dtype=dtype, device=device)
    with progress_bar(len(counts), f"{statistic}_interval_sweep", progress, unit="replicate") as bar:
        values, failed = replicates(bar=bar)
    boot, jack = values[:n_boot], values[n_boot:]
    _warn_failed(failed, n_boot + n_shards, stacklevel=stacklevel + 1)
    deviations, se_jack = _jackknife(jack)
    summary = _summary(estimate, boot, deviations, se_jack, level, method)
    return pd.DataFrame({
        "statistic": statistic, "variant": variant, "estimator": "plugin", **index, statistic: estimate, **summary,
        "n_shards": n_shards, "n_texts": full_n_texts, "n_boot": int(n_boot), "level": float(level),
        "method": method, "seed": int(seed), "centred": centred,
    })


# --------------------------------------------------------------------------------------------
# Reference variant, batched (intervals, diagnostics)


def _ascending_solutions(B: torch.Tensor, A: torch.Tensor, tol: float, *, cholesky: bool = False
                         ) -> list[torch.Tensor | None]:
    """X = W Y of (A, B) on the range of each B (eigenvalues above the absolute ``tol``), Y in
    eigh's ascending order as the released code keeps it; None where B retains nothing. B, A: (n, d, d).

    With ``cholesky``, a B certified to keep all d eigenvalues (`_certified_cholesky`) is whitened
    by its Cholesky factor, W = L^{-T}, instead of W = Q S^{-1/2} from its eigendecomposition: on the
    full range any whitening gives the same B-orthonormal eigenvectors X of (A, B) (up to sign,
    where the eigenvalues of A are distinct), so one eigendecomposition of size d is replaced by a
    factorisation of a small part of its cost. Where A has repeated eigenvalues (e.g. a null space,
    as Sxy Sxy^T has) the basis eigh picks inside that eigenspace depends on the whitening, as it
    depends on the LAPACK driver: the released algorithm's next-token side (C1 C1^T, full rank)
    takes ``cholesky``, its perception side does not."""
    n, d = B.shape[0], B.shape[-1]
    out: list[torch.Tensor | None] = [None] * n
    rest = np.arange(n)
    if cholesky:
        L, certified = _certified_cholesky(B, tol, RANGE_RTOL)
        certified = _numpy(certified)
        if certified.any():
            members = np.flatnonzero(certified)
            index = torch.as_tensor(members, device=B.device)
            L = L[index]
            half = torch.linalg.solve_triangular(L, A[index], upper=False)  # L^{-1} A
            M = torch.linalg.solve_triangular(L, half.mT, upper=False)  # L^{-1} A L^{-T} (A symmetric)
            _, Y = torch.linalg.eigh((M + M.mT) / 2)
            X = torch.linalg.solve_triangular(L.mT, Y, upper=True)
            for j, i in enumerate(members):
                out[i] = X[j]
            rest = np.flatnonzero(~certified)
        if rest.size == 0:
            return out
        B, A = (B, A) if rest.size == n else (B[torch.as_tensor(rest, device=B.device)],
                                                A[torch.as_tensor(rest, device=B.device)])
    s, Q, _, rank = _eigh_range(B, tol, RANGE_RTOL)
    ranks = _numpy(rank)
    for r in np.unique(ranks):
        if r == 0:
            continue
        members = np.flatnonzero(ranks == r)
        index = torch.as_tensor(members, device=B.device)
        Q_r, s_r = Q[index][..., d - r:], s[index][..., d - r:]
        W = Q_r / torch.sqrt(s_r)[:, None, :]
        M = W.mT @ A[index] @ W
        _, Y = torch.linalg.eigh((M + M.mT) / 2)
        X = W @ Y
        for j, i in enumerate(members):
            out[int(rest[i])] = X[j]
    return out


def _fraction_cells(fractions: np.ndarray, r_U: int, r_V: int, counts: np.ndarray):
    """For `ReferenceGeometry.ntps` at each fraction: the (row, column) of the doubly cumulated
    projection table, and which fractions are defined (k_U, k_V >= 1) and have a basis column."""
    kU = np.array([int(f * r_U) for f in fractions], dtype=np.int64)
    kV = np.array([int(f * r_V) for f in fractions], dtype=np.int64)
    defined = (kU >= 1) & (kV >= 1)
    b = np.where(defined, counts[np.clip(kV - 1, 0, None)], 0)
    return kU, b, defined


def _reference_lookup(basis: torch.Tensor, counts: np.ndarray, U: torch.Tensor, fractions: np.ndarray) -> np.ndarray:
    """`ReferenceGeometry.ntps` at each fraction for U (n, d, r_U) against one V's nested basis:
    ||P_{V_kV} U_kU||_F^2 / ||U_kU||_F^2; (n, F), NaN where k_U or k_V is 0."""
    U64 = U.to(torch.float64)
    r_U = U.shape[-1]
    kU, b, defined = _fraction_cells(fractions, r_U, counts.size, counts)
    out = np.full((U.shape[0], fractions.size), np.nan)
    if not defined.any():
        return out
    squares = (basis.T.to(torch.float64) @ U64) ** 2  # (n, q, r_U)
    projected = torch.cumsum(torch.cumsum(squares, dim=1), dim=2)
    norms = torch.cumsum(torch.sum(U64**2, dim=1), dim=1)  # (n, r_U)
    rows = torch.as_tensor(np.clip(b - 1, 0, None), device=U.device)
    cols = torch.as_tensor(np.clip(kU - 1, 0, None), device=U.device)
    numerator = torch.where(torch.as_tensor(b > 0, device=U.device), projected[:, rows, cols],
                            torch.zeros((), dtype=torch.float64, device=U.device))
    values = _numpy(numerator / norms[:, cols])
    out[:, defined] = values[:, defined]
    return out


def _reference_rows(Sxx: torch.Tensor, Sxy: torch.Tensor, C0: torch.Tensor, C1: torch.Tensor, labels_ok: np.ndarray,
                    fractions: np.ndarray, *, precision: Precision, tol: float, span_rtol: float):
    """The released algorithm (`reference_geometry`) on each batch element: (n, F) NTPS at the
    fractions and per element (r_U, r_V), or the reason (a string) its geometry is undefined."""
    dtype = torch.float32 if precision == "float32" else torch.float64
    Sxx, Sxy, C0, C1 = (t.to(dtype) for t in (Sxx, Sxy, C0, C1))
    U = _ascending_solutions(Sxx, Sxy @ Sxy.mT, tol)
    V = _ascending_solutions(C0, C1 @ C1.mT, tol, cholesky=True)
    values = np.full((Sxx.shape[0], fractions.size), np.nan)
    outcome: list[tuple[int, int] | str] = []
    for i in range(Sxx.shape[0]):
        if not labels_ok[i]:
            outcome.append("the labels contain fewer than 2 classes with any texts; NTPS needs at least 2 classes")
        elif U[i] is None:
            outcome.append(f"Sxx has no eigenvalue above the tolerance {tol:.3g}: it is zero or negative definite")
        elif V[i] is None:
            outcome.append(f"C0 has no eigenvalue above the tolerance {tol:.3g}: it is zero or negative definite")
        else:
            basis, counts = _nested_basis(V[i].to(torch.float64), span_rtol)
            values[i] = _reference_lookup(basis, counts, U[i][None], fractions)[0]
            outcome.append((int(U[i].shape[1]), int(V[i].shape[1])))
    return values, outcome


# --------------------------------------------------------------------------------------------
# Diagnostics: perturbation stability and the label-permutation null


@dataclass(frozen=True, eq=False)
class _TheoryFactor:
    """`ntps_nb.core.diagnostics.TheoryFactorization` on the device: Sxx's whitening W (d, r_U) and
    the nested orthonormal basis (r_U, q) of Sxx^{1/2} V with its counts."""

    whitening: torch.Tensor
    basis: torch.Tensor
    counts: np.ndarray
    r_U: int
    r_V: int
    trace_Syy: float

    @classmethod
    def of(cls, moments: Moments, *, tol: float | None, rtol: float, span_rtol: float, dtype: torch.dtype,
           device: torch.device) -> "_TheoryFactor":
        if moments.n_tokens == 0:
            raise ValueError("no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero")
        d = moments.d
        Sxx, C0, C1 = (_tensor(getattr(moments, n), dtype, device)[None] for n in ("Sxx", "C0", "C1"))
        s, Q, threshold, rank = _eigh_range(Sxx, tol, rtol)
        s0, Q0, threshold0, rank0 = _eigh_range(C0, tol, rtol)
        r_U, r_V = int(rank[0]), int(rank0[0])
        for r, t in ((r_U, threshold), (r_V, threshold0)):
            if r == 0:
                raise ValueError(f"no eigenvalue above the tolerance {float(t[0]):.3g}: the matrix is zero or "
                                 "negative definite")
        Q_r, s_r = Q[..., d - r_U:], s[..., d - r_U:]
        _, V = _next_token_vectors(Q0[..., d - r_V:], s0[..., d - r_V:], C1)
        v_coords = (torch.sqrt(s_r)[:, :, None] * (Q_r.mT @ V))[0]
        basis, counts = _nested_basis(v_coords, span_rtol)
        return cls(whitening=(Q_r / torch.sqrt(s_r)[:, None, :])[0], basis=basis, counts=counts, r_U=r_U, r_V=r_V,
                   trace_Syy=float(np.trace(moments.Syy)))

    def geometries(self, Sxy: torch.Tensor) -> list[TheoryGeometry]:
        """`TheoryGeometry` for each (d, C) Sxy of a (n, d, C) batch, Sxx, C0, C1 as factorised."""
        left, sigma, _ = torch.linalg.svd(self.whitening.T @ Sxy, full_matrices=False)
        lam = _numpy(sigma).astype(np.float64) ** 2
        cum = torch.cumsum((self.basis.T @ left) ** 2, dim=1)  # (n, q, c)
        has_basis = self.counts > 0
        projected = np.zeros((Sxy.shape[0], self.r_V, left.shape[-1]))
        if has_basis.any():
            rows = torch.as_tensor(self.counts[has_basis] - 1, device=Sxy.device)
            projected[:, has_basis] = _numpy(cum[:, rows]).astype(np.float64)
        out = []
        for b in range(Sxy.shape[0]):
            m = int(np.count_nonzero(lam[b] > A_RANK_RTOL * max(float(lam[b].max()), _TINY)))
            if m == 0:
                raise ValueError("Sxy is zero: the pooled states carry no label signal, U is undefined")
            out.append(TheoryGeometry(eigenvalues=lam[b, :m].copy(), projected=np.clip(projected[b, :, :m], 0.0, 1.0),
                                      r_V=self.r_V, r_U=self.r_U, trace_Syy=self.trace_Syy))
        return out


@dataclass(frozen=True, eq=False)
class _ReferenceFactor:
    """`ntps_nb.core.diagnostics.ReferenceFactorization` (float32 as released) on the device:
    Sxx's whitening and V's nested basis."""

    whitening: torch.Tensor
    basis: torch.Tensor
    counts: np.ndarray
    dtype: torch.dtype

    @classmethod
    def of(cls, moments: Moments, *, precision: Precision, tol: float, span_rtol: float,
           device: torch.device) -> "_ReferenceFactor":
        dtype = torch.float32 if precision == "float32" else torch.float64
        d = moments.d
        Sxx, C0, C1 = (_tensor(getattr(moments, n), dtype, device)[None] for n in ("Sxx", "C0", "C1"))
        s, Q, _, rank = _eigh_range(Sxx, tol, RANGE_RTOL)
        if int(rank[0]) == 0:
            raise ValueError(f"no eigenvalue above the tolerance {tol:.3g}: the matrix is zero or negative definite")
        r = int(rank[0])
        _, basis, counts = _released_next_token(C0, C1, tol, span_rtol)
        return cls(whitening=(Q[..., d - r:] / torch.sqrt(s[..., d - r:])[:, None, :])[0], basis=basis,
                   counts=counts, dtype=dtype)

    def values(self, Sxy: torch.Tensor, fractions: np.ndarray) -> np.ndarray:
        """The released NTPS at ``fractions`` for each Sxy of a (n, d, C) batch; (n, F)."""
        Sxy = Sxy.to(self.dtype)
        W = self.whitening
        M = W.T @ (Sxy @ Sxy.mT) @ W
        _, Y = torch.linalg.eigh((M + M.mT) / 2)
        return _reference_lookup(self.basis, self.counts, W @ Y, fractions)


def _perturbed_stack(copies: list[Moments], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    return {n: torch.stack([_tensor(getattr(c, n), dtype, device) for c in copies])
            for n in ("Sxx", "Sxy", "Syy", "C0", "C1")}


def ntps_diagnostics_torch(
    moments: Moments,
    features: np.ndarray | None = None,
    labels=None,
    *,
    variant: str | Sequence[str] = "theory",
    k=None,
    fraction=None,
    n_perturb: int = 20,
    perturb_scale: float = PERTURB_SCALE,
    n_permutations: int = 100,
    seed: int = 0,
    solvers: bool = True,
    feature_rtol: float = FEATURE_MATCH_RTOL,
    estimator: str = "plugin",
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    **provenance,
) -> pd.DataFrame:
    """`ntps_nb.core.diagnostics.ntps_diagnostics` with the linear algebra on ``device``: the same
    arguments, random draws and frame.

    The perturbed copies and the label permutations are drawn on the host by the same numpy
    generators in the same order as the numpy function (so the same seed gives the same copies
    and permutations); the copies are then solved ``batch_size`` at a time in one batched
    eigensolve per variant, and the permuted Sxy of a block of permutations are formed as one
    product (features^T x stacked permuted one-hot labels) and solved as one batched SVD (theory)
    or eigensolve (reference) against the label-free factorisation computed once. The
    eigensolver comparison (``solver_max_dev``) compares LAPACK front ends, so it runs on the host
    with numpy/scipy as in the numpy function; the device's own solve of the unperturbed moments
    is its first setting (where numpy has its own). The theory rows equal numpy's to 1e-9; the
    reference rows equal them (to float32 precision) where the reference variant is well-posed,
    and elsewhere differ as the two backends' choices of a null-eigenspace basis do (SPEC
    section 4).

    Parameters
    ----------
    moments, features, labels, variant, k, fraction, n_perturb, perturb_scale, n_permutations, seed,
        solvers, feature_rtol, **provenance : as in `ntps_nb.core.diagnostics.ntps_diagnostics`.
    estimator : must be "plugin" (the diagnostics are of the plug-in estimate).
    device : the torch device that solves it.
    batch_size : perturbed copies or permutations per batched solve, a positive integer
        (default: as many as fit in half the free device memory, at most `MAX_BATCH`).
    progress : a bar over the perturbed copies and permutations, as the numpy function shows it, advanced a solved
        block at a time (False: none).

    Returns
    -------
    DataFrame, one row per (variant, k or fraction), the columns of
    `ntps_nb.core.diagnostics.ntps_diagnostics`.
    """
    _check_plugin(estimator)
    device = _device(device)
    # the numpy function's checks, in its order
    variants, n_perturb, n_permutations = check_diagnostics_inputs(moments, features, labels, variant, n_perturb,
                                                                   n_permutations, perturb_scale)
    clash = set(provenance) & {"variant", "estimator", "k", "fraction", "ntps", "seed", "n_perturb", "n_permutations"}
    if clash:
        raise ValueError(f"provenance names {sorted(clash)} clash with result columns")
    if variants == ["reference"] and k is not None:
        raise ValueError("the reference variant takes fraction= (its k_U, k_V are int(fraction * rank)), not k=")
    if variants == ["theory"] and k is not None and fraction is not None:
        raise ValueError("give k or fraction for the theory variant, not both")
    batch = _batch_size(batch_size, moments.d, torch.float64, device)
    if n_permutations:
        X, Y, shift = _label_design(moments, features, labels, feature_rtol)

    grids: dict[str, dict] = {}
    if "theory" in variants:
        geometry = theory_geometry_torch(moments, device=device)
        ks, fracs = _theory_ks(k, fraction if k is None else None, geometry.r_V)
        warn_of_the_sample(moments, [moments], geometry, ks, estimator=estimator, stacklevel=4,  # at its caller's
                           reach=negative_reach_torch(moments.C0, device=device))  # C0's check on the device too
        grids["theory"] = {"ks": ks, "fractions": fracs, "ntps": _theory_values(geometry, ks),
                           "ranks": (geometry.r_U, geometry.r_V), "geometry": geometry}
    if "reference" in variants:
        geometry = reference_geometry_torch(moments, device=device)
        explicit = fraction is not None
        fracs = np.array(_fractions(fraction, upper_inclusive=False) if explicit else REFERENCE_FRACTIONS, float)
        counts = np.array([geometry.counts_at(f) for f in fracs], dtype=np.int64).reshape(-1, 2)
        if explicit and np.any(counts < 1):
            bad = int(np.argmax(np.any(counts < 1, axis=1)))
            raise ValueError(f"fraction {fracs[bad]} selects k_U = {counts[bad, 0]}, k_V = {counts[bad, 1]} directions "
                             f"(r_U = {geometry.r_U}, r_V = {geometry.r_V})")
        grids["reference"] = {"fractions": fracs, "counts": counts, "ntps": _reference_values(geometry, fracs),
                              "ranks": (geometry.r_U, geometry.r_V), "geometry": geometry}

    # The eigensolver comparison is host LAPACK (numpy / scipy): unless the caller computed it
    # (``solvers`` a mapping), each setting runs in a worker process beside the device's work (not a
    # thread: scipy's wrappers keep the GIL, `HostSolverProcesses`), the BLAS bound less one core shared.
    host, host_solves = None, None
    if solvers is True:
        settings = [(name, config) for name in variants for config in SOLVER_CONFIGS[name]]
        host = HostSolverProcesses.beside_device(len(settings))
        futures = [(name, host.submit(moments, name, config, ks=grids[name].get("ks"),
                                      fractions=grids[name]["fractions"])) for name, config in settings]
        host_solves = _HostSolves(futures)
    try:
        with progress_bar(n_perturb + n_permutations, "ntps_diagnostics", progress, unit="copy") as bar:
            return _diagnostics_on_device(moments, variants, grids, solvers, host_solves,
                                          X=X if n_permutations else None, Y=Y if n_permutations else None,
                                          shift=shift if n_permutations else None, n_perturb=n_perturb,
                                          perturb_scale=perturb_scale, n_permutations=n_permutations, seed=seed,
                                          batch=batch, device=device, provenance=provenance, bar=bar)
    finally:
        if host is not None:
            host.close(cancel=True)


class _HostSolves:
    """The worker processes' settings as the one result `_diagnostics_on_device` waits for:
    ``result()`` is {variant: [values of each setting, in SOLVER_CONFIGS order]}."""

    def __init__(self, futures: list[tuple[str, concurrent.futures.Future]]):
        self.futures = futures

    def result(self) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {}
        for name, future in self.futures:
            out.setdefault(name, []).append(future.result())
        return out


def _diagnostics_on_device(moments, variants, grids, solvers, host_solves, *, X, Y, shift, n_perturb, perturb_scale,
                           n_permutations, seed, batch, device, provenance, bar) -> pd.DataFrame:
    """The perturbations and the label null of `ntps_diagnostics_torch` on the device, then its frame; ``bar``
    counts each block of copies or permutations once solved."""
    perturb_seq, perm_seq = np.random.SeedSequence(seed).spawn(2)

    # Perturbations: the numpy function's copies, drawn in its order, solved a block at a time.
    perturbed = {name: np.full((n_perturb, len(grids[name]["ntps"])), np.nan) for name in variants}
    rank_changes = dict.fromkeys(variants, 0)
    rng = np.random.default_rng(perturb_seq)
    for start in range(0, n_perturb, batch):
        copies = [_perturb(moments, perturb_scale, rng) for _ in range(min(batch, n_perturb - start))]
        for copy in copies:
            check_labels(copy)  # raises as theory_geometry / reference_geometry would
        arrays = _perturbed_stack(copies, torch.float64, device)
        if "theory" in variants:
            results = _theory_geometries(arrays["Sxx"], arrays["Sxy"], arrays["Syy"], arrays["C0"], arrays["C1"],
                                         np.array([c.n_tokens for c in copies]), np.ones(len(copies), bool),
                                         tol=None, rtol=RANGE_RTOL, span_rtol=SPAN_RTOL)
            for i, result in enumerate(results, start=start):
                if isinstance(result, str):
                    raise ValueError(result)
                perturbed["theory"][i] = _theory_values(result, grids["theory"]["ks"])
                rank_changes["theory"] += int((result.r_U, result.r_V) != grids["theory"]["ranks"])
        if "reference" in variants:
            values, outcome = _reference_rows(arrays["Sxx"], arrays["Sxy"], arrays["C0"], arrays["C1"],
                                              np.ones(len(copies), bool), grids["reference"]["fractions"],
                                              precision="float32", tol=REFERENCE_ABS_TOL, span_rtol=SPAN_RTOL)
            for i, result in enumerate(outcome, start=start):
                if isinstance(result, str):
                    raise ValueError(result)
                rank_changes["reference"] += int(result != grids["reference"]["ranks"])
            perturbed["reference"][start:start + len(copies)] = values
        bar.update(len(copies))
        del arrays, copies

    # Label-permutation null: the numpy function's permutations, a block at a time, against the
    # label-free factorisation.
    null = {name: np.full((n_permutations, len(grids[name]["ntps"])), np.nan) for name in variants}
    if n_permutations:
        check_labels(moments)
        theory_factor = (_TheoryFactor.of(moments, tol=None, rtol=RANGE_RTOL, span_rtol=SPAN_RTOL,
                                          dtype=torch.float64, device=device) if "theory" in variants else None)
        reference_factor = (_ReferenceFactor.of(moments, precision="float32", tol=REFERENCE_ABS_TOL,
                                                span_rtol=SPAN_RTOL, device=device) if "reference" in variants else None)
        rng = np.random.default_rng(perm_seq)
        XT = _tensor(X.T / X.shape[0], torch.float64, device)
        shift_t = _tensor(shift, torch.float64, device)
        for start in range(0, n_permutations, batch):
            stop = min(start + batch, n_permutations)
            permuted = np.stack([Y[rng.permutation(Y.shape[0])] for _ in range(start, stop)])
            Sxy = XT @ _tensor(permuted, torch.float64, device) - shift_t
            if theory_factor is not None:
                for b, geometry in enumerate(theory_factor.geometries(Sxy), start=start):
                    null["theory"][b] = _theory_values(geometry, grids["theory"]["ks"])
            if reference_factor is not None:
                null["reference"][start:stop] = reference_factor.values(Sxy, grids["reference"]["fractions"])
            bar.update(stop - start)
            del Sxy

    # Eigensolver settings: LAPACK front ends on the host (started above, beside the device's work,
    # or given), against the device's own solve.
    solver_dev = solver_deviations(variants, grids, solvers, lambda name: host_solves.result()[name])

    return diagnostics_frame(variants, grids, perturbed, null, rank_changes, solver_dev, n_perturb=n_perturb,
                             n_permutations=n_permutations, perturb_scale=perturb_scale, seed=seed,
                             estimator="plugin", provenance=provenance)


# --------------------------------------------------------------------------------------------
# Probes: the closed-form least-squares probe, batched over layers

#: float64 machine epsilon (scikit-learn's accumulators are float64 whatever the input).
_EPS = float(np.finfo(np.float64).eps)


def _linear_regression_cond() -> float | None:
    """The ``cond`` scikit-learn's LinearRegression passes to scipy.linalg.lstsq on dense data:
    its ``tol`` from version 1.9 on, None (scipy's default) before."""
    import sklearn
    from sklearn.linear_model import LinearRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return float(LinearRegression().tol) if (major, minor) >= (1, 9) else None


def _scaler(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """StandardScaler's mean_ and scale_ of each (N, d) slice of X (L, N, d): the corrected two-pass
    variance, and scale 1 where a feature is constant within rounding (sklearn's rules)."""
    n = X.shape[1]
    mean = X.sum(dim=1) / n
    temp = X - mean[:, None, :]
    correction = temp.sum(dim=1)
    var = ((temp**2).sum(dim=1) - correction**2 / n) / n
    constant = var <= n * _EPS * var + (n * mean * _EPS) ** 2
    return mean, torch.where(constant, torch.ones_like(var), torch.sqrt(var))


def _least_squares_block(Xtr: torch.Tensor, Ytr: torch.Tensor, Xev: torch.Tensor, ridge: float,
                         cond: float | None) -> torch.Tensor:
    """Predictions on Xev (L, M, d) of StandardScaler + Ridge(alpha=ridge) (ridge > 0) or
    + LinearRegression (ridge = 0), fitted on Xtr (L, N, d), Ytr (N, C), with intercept."""
    mean, scale = _scaler(Xtr)
    Z = (Xtr - mean[:, None, :]) / scale[:, None, :]
    Zev = (Xev - mean[:, None, :]) / scale[:, None, :]
    n, d = Z.shape[1], Z.shape[2]
    x_offset = Z.sum(dim=1) / n  # the intercept's centring (_preprocess_data)
    y_offset = Ytr.sum(dim=0) / n
    Zc = Z - x_offset[:, None, :]
    yc = (Ytr - y_offset)[None].expand(Z.shape[0], -1, -1)
    if ridge > 0:  # the cholesky solver: the kernel (dual) form when d > N, as sklearn picks it
        if d > n:
            K = Zc @ Zc.mT
            K.diagonal(dim1=-2, dim2=-1).add_(ridge)
            coef = Zc.mT @ torch.cholesky_solve(yc, torch.linalg.cholesky(K))
        else:
            A = Zc.mT @ Zc
            A.diagonal(dim1=-2, dim2=-1).add_(ridge)
            coef = torch.cholesky_solve(Zc.mT @ yc, torch.linalg.cholesky(A))
    else:  # minimum-norm least squares, singular values below cond * largest dropped (lstsq / gelsd)
        U, s, Vh = torch.linalg.svd(Zc, full_matrices=False)
        cut = (cond if cond is not None else _EPS) * s[:, :1]
        inverse = torch.where(s > cut, 1.0 / torch.where(s > cut, s, torch.ones_like(s)), torch.zeros_like(s))
        coef = Vh.mT @ (inverse[:, :, None] * (U.mT @ yc))
    intercept = y_offset[None, :] - (x_offset[:, None, :] @ coef)[:, 0, :]
    return Zev @ coef + intercept[:, None, :]


def least_squares_predictions_torch(
    train_X: Sequence[np.ndarray],
    train_Y: np.ndarray,
    eval_X: Sequence[np.ndarray],
    *,
    ridge: float,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
) -> list[np.ndarray]:
    """The least-squares probe of `ntps_nb.core.probes.heldout_probe` for several layers at once:
    StandardScaler fitted on the train split, then Ridge(alpha=ridge) (ridge > 0; the Cholesky
    solve sklearn uses, in its kernel form when d > N) or LinearRegression (ridge = 0; the
    minimum-norm solution with singular values below LinearRegression's ``cond`` dropped), with
    intercept, in float64, ``batch_size`` layers per batched solve.

    Parameters
    ----------
    train_X : L arrays (N, d) of train features, one per layer (same N and d).
    train_Y : (N, C) one-hot train targets.
    eval_X : L arrays (M, d) on which to predict (the test split, or the train split in sample).
    ridge : L2 strength, >= 0.
    device : the torch device that solves it.
    batch_size : layers per batched solve (default: as many as fit in half the free device memory).

    Returns
    -------
    list of L (M, C) float64 arrays of predicted targets.
    """
    device = _device(device)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if len(train_X) != len(eval_X):
        raise ValueError(f"{len(train_X)} train arrays but {len(eval_X)} evaluation arrays")
    if not len(train_X):
        return []
    n, d = np.shape(train_X[0])
    if batch_size is None:
        per_layer = 8 * (6 * n * d + 2 * np.shape(eval_X[0])[0] * d + 2 * min(n, d) ** 2)
        budget = GPU_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else CPU_BLOCK_BYTES
        batch_size = int(max(1, budget // per_layer))
    batch_size = _batch_size(batch_size, d, torch.float64, device)
    cond = None if ridge > 0 else _linear_regression_cond()
    Ytr = _tensor(train_Y, torch.float64, device)
    out: list[np.ndarray] = []
    for start in range(0, len(train_X), batch_size):
        block = range(start, min(start + batch_size, len(train_X)))
        Xtr = torch.stack([_tensor(train_X[i], torch.float64, device) for i in block])
        Xev = torch.stack([_tensor(eval_X[i], torch.float64, device) for i in block])
        predicted = _numpy(_least_squares_block(Xtr, Ytr, Xev, float(ridge), cond))
        out += [predicted[j] for j in range(predicted.shape[0])]
        del Xtr, Xev
    return out


# --------------------------------------------------------------------------------------------
# Probes: the held-out logistic-regression probe, batched over layers and over a grid of C

#: Name of this solver in the probes' ``solver`` column.
LOGISTIC_SOLVER = "torch-newton-cg"
#: Newton iterations of `logistic_probe_torch` when no cap is given (probe-sized problems take 5-15).
LOGISTIC_NEWTON_MAX_ITER = 100
#: Conjugate-gradient iterations (Hessian-vector products) per Newton step, at most.
LOGISTIC_MAX_CG = 1000
#: Armijo's sufficient-decrease constant of the line search.
_ARMIJO = 1e-4
#: Halvings of the step the line search tries before it calls a problem stalled.
_MAX_HALVINGS = 40
#: The line search tolerates a rise of the objective of this many eps * |f|: close to the optimum
#: the decrease a Newton step brings is below the rounding of f, and the step is still right.
_ROUNDING_SLACK = 16
#: Newton iterations in a row that neither lower the objective by more than 64 eps relative (the
#: ftol of sklearn's lbfgs) nor reach a new smallest gradient, after which a problem is stalled
#: (its tolerance is below what rounding allows): it stops, not converged.
_STALL_ITERATIONS = 5


@dataclass(frozen=True)
class LogisticProbeFit:
    """One problem's logistic probes (one layer, or one fold), one per C of a grid.

    ``classes`` (K,): the labels present in the train split, sorted (sklearn's ``classes_``);
    ``C`` (G,); ``coef`` (G, K', d) and ``intercept`` (G, K'): sklearn's ``coef_`` /
    ``intercept_`` on the standardised features (K' = 1 for a binary problem, else K; the
    multinomial intercepts sum to zero, the gauge lbfgs keeps from its zero start);
    ``eval_probabilities`` (G, M, K); ``eval_predictions`` (G, M) and ``train_predictions``
    (G, N) or None: predicted labels (values of ``classes``); ``converged`` (G,) bool: the
    gradient reached ``tol``; ``n_iter`` (G,) Newton iterations; ``n_hessian_products`` (G,)
    conjugate-gradient iterations over all of them; ``solver``: `LOGISTIC_SOLVER`.
    """

    classes: np.ndarray
    C: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    eval_probabilities: np.ndarray
    eval_predictions: np.ndarray
    train_predictions: np.ndarray | None
    converged: np.ndarray
    n_iter: np.ndarray
    n_hessian_products: np.ndarray
    solver: str = LOGISTIC_SOLVER


def _logistic_newton(Z: torch.Tensor, T: torch.Tensor, s: torch.Tensor, Cs: torch.Tensor, *, binary: bool,
                     tol: float, max_iter: int, max_cg: int):
    """Minimise C * sum_i s_i loss_i + 0.5 ||W||^2 for every (slot, C) at once by Newton-CG.

    Z (S, N, d) standardised train features (zero rows where padded), T (S, N, K) targets (one-hot;
    (S, N, 1) 0/1 for the binomial loss), s (S, N) sample weights (0 on padding), Cs (G,).
    Returns W (S, G, K, d), b (S, G, K), converged, n_iter, n_products (S, G).
    """
    S, N, d = Z.shape
    G, K = Cs.shape[0], T.shape[2]
    weight = Cs[None, None, :, None] * s[:, :, None, None]  # C s_i, (S, N, G, 1)
    target = T[:, :, None, :]
    scale = Cs[None, :] * s.sum(dim=1)[:, None]  # f / scale is sklearn's (mean) objective, (S, G)
    slack = _ROUNDING_SLACK * torch.finfo(Z.dtype).eps

    def logits(W, b):
        return (Z @ W.reshape(S, G * K, d).mT).reshape(S, N, G, K) + b[:, None]

    def back(R):  # Z^T R of every problem, (S, N, G, K) -> (S, G, K, d); R^T Z is the fast product on a CPU
        return (R.reshape(S, N, G * K).mT.contiguous() @ Z).reshape(S, G, K, d)

    def objective(W, A):
        if binary:
            pointwise = torch.nn.functional.softplus(A) - target * A
        else:
            pointwise = torch.logsumexp(A, dim=3, keepdim=True) - (target * A).sum(dim=3, keepdim=True)
        return (weight * pointwise).sum(dim=(1, 3)) + 0.5 * (W**2).sum(dim=(2, 3))

    def dot(W1, b1, W2, b2):
        return (W1 * W2).sum(dim=(2, 3)) + (b1 * b2).sum(dim=2)

    def gauge(c):  # multinomial intercepts: the loss is blind to a shift of all K; keep their sum 0
        return c if binary else c - c.mean(dim=2, keepdim=True)

    W = Z.new_zeros((S, G, K, d))
    b = Z.new_zeros((S, G, K))
    A = logits(W, b)
    f = objective(W, A)
    active = torch.ones((S, G), dtype=torch.bool, device=Z.device)
    converged = torch.zeros_like(active)
    n_iter = torch.zeros((S, G), dtype=torch.int64, device=Z.device)
    n_products = torch.zeros_like(n_iter)
    best = torch.full((S, G), float("inf"), dtype=Z.dtype, device=Z.device)
    decrease = torch.full_like(best, float("inf"))
    flat_steps = torch.zeros_like(n_iter)
    while True:
        P = torch.sigmoid(A) if binary else torch.softmax(A, dim=3)
        R = weight * (P - target)
        gW, gb = back(R) + W, R.sum(dim=1)
        gmax = torch.maximum(gW.abs().amax(dim=(2, 3)), gb.abs().amax(dim=2)) / scale
        converged |= active & (gmax <= tol)
        flat = (gmax >= best) & (decrease <= 64 * torch.finfo(Z.dtype).eps * f.abs())
        flat_steps = torch.where(flat, flat_steps + 1, 0)
        best = torch.minimum(best, gmax)
        active &= ~converged & (n_iter < max_iter) & (flat_steps < _STALL_ITERATIONS)
        if not bool(active.any()):
            break
        curvature = weight * P * (1 - P) if binary else None

        def hessian(V, c):
            Rv = logits(V, c)
            if binary:
                H = curvature * Rv
            else:
                PR = P * Rv
                H = weight * (PR - P * PR.sum(dim=3, keepdim=True))
            return back(H) + V, H.sum(dim=1)

        # truncated conjugate gradients on H p = -g, to a residual of eta ||g||, eta = min(0.5, gmax^(1/4)):
        # loose far from the optimum, tightening as it nears (superlinear); fewer products in all than
        # sklearn newton-cg's sqrt(gmax) on ill-conditioned features
        on = active.to(Z.dtype)
        rW, rb = -gW * on[..., None, None], gauge(-gb) * on[..., None]
        pW, pb = torch.zeros_like(rW), torch.zeros_like(rb)
        dW, db = rW.clone(), rb.clone()
        rr = dot(rW, rb, rW, rb)
        goal = torch.clamp(gmax**0.25, max=0.5) ** 2 * rr
        solving = active.clone()
        for _ in range(max_cg):
            HW, Hb = hessian(dW, db)
            n_products += solving
            curv = dot(dW, db, HW, Hb)
            step = torch.where(solving & (curv > 0), rr / torch.where(curv > 0, curv, 1.0), 0.0)
            pW, pb = pW + step[..., None, None] * dW, pb + step[..., None] * db
            rW, rb = rW - step[..., None, None] * HW, gauge(rb - step[..., None] * Hb)
            rr_next = dot(rW, rb, rW, rb)
            solving &= (rr_next > goal) & (curv > 0)
            if not bool(solving.any()):
                break
            beta = torch.where(solving, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)
            dW, db = rW + beta[..., None, None] * dW, rb + beta[..., None] * db
            rr = rr_next
        # Armijo backtracking, per problem, from the full Newton step
        slope = dot(gW, gb, pW, pb)
        t = on.clone()
        searching = active.clone()
        for _ in range(_MAX_HALVINGS):
            W_next, b_next = W + t[..., None, None] * pW, b + t[..., None] * pb
            A_next = logits(W_next, b_next)
            f_next = objective(W_next, A_next)
            searching &= ~(f_next <= f + _ARMIJO * t * slope + slack * f.abs())
            if not bool(searching.any()):
                break
            t = torch.where(searching, 0.5 * t, t)
        stalled = searching  # no step decreases f beyond rounding: the tolerance is out of reach
        W = torch.where(stalled[..., None, None], W, W_next)
        b = torch.where(stalled[..., None], b, b_next)
        A = torch.where(stalled[:, None, :, None], A, A_next)
        decrease = torch.where(stalled, 0.0, f - f_next)
        f = torch.where(stalled, f, f_next)
        n_iter += active & ~stalled
        active &= ~stalled
    return W, b, converged, n_iter, n_products


def _logistic_batch(n: int, m: int, d: int, G: int, K: int, itemsize: int, device: torch.device) -> int:
    per_slot = itemsize * (2 * (n + m) * d + 12 * n * G * K + 12 * G * K * d)
    budget = GPU_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else CPU_BLOCK_BYTES
    return int(max(1, min(MAX_BATCH, budget // per_slot)))


def logistic_probe_torch(
    train_X: Sequence[np.ndarray],
    train_y: Sequence[int] | Sequence[Sequence[int]],
    eval_X: Sequence[np.ndarray],
    *,
    Cs: float | Sequence[float] = 1.0,
    class_weight: str | None = None,
    tol: float = 1e-6,
    max_iter: int = LOGISTIC_NEWTON_MAX_ITER,
    max_cg: int = LOGISTIC_MAX_CG,
    train_predictions: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
) -> list[LogisticProbeFit]:
    """The held-out logistic-regression probe of `ntps_nb.core.probes.heldout_probe` for several
    problems (layers, folds) at once, each at every C of ``Cs``: StandardScaler fitted on the
    problem's train split, then scikit-learn's LogisticRegression(solver="lbfgs") objective,

        minimise over W (K' x d), b (K')   C * sum_i s_i loss_i + 0.5 ||W||_F^2,

    the intercept b unpenalised, s_i = 1 (or sklearn's "balanced" class weights), loss_i the
    multinomial cross-entropy over the K classes present in the train split when K > 2, and the
    binomial log-loss of the second class (K' = 1) when K = 2, as scikit-learn fits two classes
    (its ``coef_`` has one row; checked against scikit-learn 1.9). The objective is strictly
    convex (up to a common shift of the multinomial intercepts, which changes no probability), so
    its optimum, every probability and prediction, is the one sklearn's lbfgs converges to.

    The solver is Newton's method with the Newton step from truncated conjugate gradients on
    Hessian-vector products (no dK x dK Hessian is formed; each product is two batched matrix
    products with the features and a few elementwise kernels) and an Armijo backtracking line
    search, all problems of a block advancing together, each stopping on its own. Why Newton-CG
    rather than L-BFGS: the local convergence is quadratic, so a tight tolerance costs a few more
    Newton steps, not a long linear tail (and no 64-eps ftol stop short of it, as lbfgs has); a
    CG step has no history recursion: the whole batch advances with one Hessian product and a
    handful of vector kernels per step; on probe features (d = 896, N = 2000, C = 6) it takes about as
    many Hessian products as lbfgs takes iterations (each one gradient). Every problem of a block
    advances in the same batched products, so 33 layers or 5 folds x 7 C take about as many
    sequential steps as the slowest of them (on a GPU about the time of one; on a CPU, which is
    bound by memory traffic, the sum of their times or a little more). A problem stops, converged,
    when the largest |gradient| of sklearn's mean objective (the one above divided by C sum_i s_i),
    intercept included, is <= ``tol``: the same test as lbfgs's ``gtol``, so ``tol`` means what it
    means for sklearn. It stops not converged after ``max_iter`` Newton iterations, or when
    `_STALL_ITERATIONS` iterations in a row bring neither a new smallest gradient nor a decrease of
    f beyond rounding (a ``tol`` below what float arithmetic reaches).

    Parameters
    ----------
    train_X : S arrays (N_s, d) of train features, one per problem (N_s may differ: shorter
        problems are padded with rows of zero weight).
    train_y : one (N,) array of integer labels shared by every problem (then all N_s = N), or S
        arrays (N_s,).
    eval_X : S arrays (M_s, d) on which to predict (the test split, or a held-out fold).
    Cs : the inverse L2 strengths (sklearn's ``C``) every problem is fitted at.
    class_weight : None or "balanced" (sklearn's n / (K count(y_i)) sample weights).
    tol : gradient tolerance (max-abs, on sklearn's mean objective).
    max_iter : Newton iterations per problem, at most.
    max_cg : conjugate-gradient iterations per Newton step, at most.
    train_predictions : also predict the train split.
    device : the torch device that solves it.
    dtype : torch.float64 (default) or torch.float32.
    batch_size : problems per batched solve (default: as many as fit in half the free device memory).

    Returns
    -------
    list of S `LogisticProbeFit`, in input order.
    """
    device, dtype = _device(device), _check_dtype(dtype)
    if len(train_X) != len(eval_X):
        raise ValueError(f"{len(train_X)} train arrays but {len(eval_X)} evaluation arrays")
    if not len(train_X):
        return []
    grid = np.atleast_1d(np.asarray(Cs, dtype=np.float64))
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError(f"Cs must be positive finite inverse strengths, got {Cs!r}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite gradient tolerance, got {tol!r}")
    max_iter = validation.check_count(max_iter, "max_iter")
    max_cg = validation.check_count(max_cg, "max_cg")
    n_problems = len(train_X)
    shared = np.ndim(train_y[0]) == 0 if len(train_y) else True
    labels = [train_y] * n_problems if shared else list(train_y)
    if len(labels) != n_problems:
        raise ValueError(f"{n_problems} train arrays but {len(labels)} label arrays")
    problems = []
    for i in range(n_problems):
        X = validation.check_finite(train_X[i], f"train features of problem {i}", ndim=2)
        E = validation.check_finite(eval_X[i], f"evaluation features of problem {i}", ndim=2)
        y = validation.check_labels(labels[i], n_rows=X.shape[0], min_classes=2, name=f"train labels of problem {i}")
        if problems and X.shape[1] != problems[0][0].shape[1]:
            raise ValueError(f"problem {i} has d={X.shape[1]} features, problem 0 d={problems[0][0].shape[1]}")
        if E.shape[1] != X.shape[1]:
            raise ValueError(f"problem {i}: train features have d={X.shape[1]} columns, evaluation features "
                             f"d={E.shape[1]}")
        problems.append((X, y, E))

    Cs_t = _tensor(grid, dtype, device)
    fits: list[LogisticProbeFit | None] = [None] * n_problems
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, y, _) in enumerate(problems):
        groups.setdefault(tuple(np.unique(y).tolist()), []).append(i)
    for key, members in groups.items():
        classes = np.asarray(key, dtype=np.int64)
        K, binary = classes.size, classes.size == 2
        width = 1 if binary else K
        n = max(problems[i][0].shape[0] for i in members)
        m = max(problems[i][2].shape[0] for i in members)
        d = problems[members[0]][0].shape[1]
        size = (_batch_size(batch_size, d, dtype, device) if batch_size is not None
                else _logistic_batch(n, m, d, grid.size, width, torch.finfo(dtype).bits // 8, device))
        for start in range(0, len(members), size):
            block = members[start:start + size]
            S = len(block)
            Z = torch.zeros((S, n, d), dtype=dtype, device=device)
            Zev = torch.zeros((S, m, d), dtype=dtype, device=device)
            T = torch.zeros((S, n, width), dtype=dtype, device=device)
            s = torch.zeros((S, n), dtype=dtype, device=device)
            for j, i in enumerate(block):
                X, y, E = problems[i]
                Xt = _tensor(X, torch.float64, device)
                mean, spread = _scaler(Xt[None])
                Z[j, :X.shape[0]] = ((Xt - mean) / spread).to(dtype)
                Zev[j, :E.shape[0]] = ((_tensor(E, torch.float64, device) - mean) / spread).to(dtype)
                column = np.searchsorted(classes, y)
                if binary:
                    T[j, :y.size, 0] = _tensor(column == 1, dtype, device)
                else:
                    T[j, torch.arange(y.size, device=device), torch.as_tensor(column, device=device)] = 1.0
                counts = np.bincount(column, minlength=K)
                weights = y.size / (K * counts[column]) if class_weight == "balanced" else np.ones(y.size)
                s[j, :y.size] = _tensor(weights, dtype, device)
            W, b, converged, n_iter, n_products = _logistic_newton(Z, T, s, Cs_t, binary=binary, tol=float(tol),
                                                                   max_iter=max_iter, max_cg=max_cg)

            def predict(F):  # (S, R, d) -> probabilities (S, G, R, K), predicted column (S, G, R)
                decision = torch.einsum("srd,sgkd->sgrk", F, W) + b[:, :, None, :]
                if binary:
                    p = torch.sigmoid(decision)
                    return torch.cat([1 - p, p], dim=3), (decision[..., 0] > 0).long()
                return torch.softmax(decision, dim=3), decision.argmax(dim=3)

            probabilities, predicted = predict(Zev)
            train_predicted = _numpy(predict(Z)[1]) if train_predictions else None
            probabilities, predicted = _numpy(probabilities), _numpy(predicted)
            W, b = _numpy(W), _numpy(b)
            converged, n_iter, n_products = _numpy(converged), _numpy(n_iter), _numpy(n_products)
            for j, i in enumerate(block):
                rows, evals = problems[i][0].shape[0], problems[i][2].shape[0]
                fits[i] = LogisticProbeFit(
                    classes=classes, C=grid.copy(), coef=W[j].astype(np.float64), intercept=b[j].astype(np.float64),
                    eval_probabilities=probabilities[j, :, :evals].astype(np.float64),
                    eval_predictions=classes[predicted[j, :, :evals]],
                    train_predictions=None if train_predicted is None else classes[train_predicted[j, :, :rows]],
                    converged=converged[j].astype(bool), n_iter=n_iter[j], n_hessian_products=n_products[j])
            del Z, Zev, T, s
    return fits


# --------------------------------------------------------------------------------------------
# Peers: the factorisations of LogME, the H-scores and RankMe


def singular_coordinates_torch(features: np.ndarray, targets: np.ndarray, *, rtol: float,
                               device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The singular values s of the features above ``rtol`` times the largest, and the targets'
    coordinates Z = U^T Y on the matching left singular vectors (what LogME's fixed point reads).

    Parameters
    ----------
    features : (N, d) float array.
    targets : (N, C) float array.
    rtol : relative cutoff on the singular values.
    device : the torch device of the SVD.

    Returns
    -------
    s : (r,) float64 array, descending; Z : (r, C) float64 array (its rows' signs follow U's).
    """
    X = _tensor(features, torch.float64, _device(device))
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    keep = s > rtol * s[0]
    return _numpy(s[keep]), _numpy(U[:, keep].T @ _tensor(targets, torch.float64, X.device))


def singular_values_torch(features: np.ndarray, *, device: str | torch.device = "cpu") -> np.ndarray:
    """The singular values of the (uncentred) features, descending (RankMe's input).

    Parameters
    ----------
    features : (N, d) float array.
    device : the torch device of the SVD.

    Returns
    -------
    (min(N, d),) float64 array.
    """
    return _numpy(torch.linalg.svdvals(_tensor(features, torch.float64, _device(device))))


def _centred_and_class_means(features: np.ndarray, labels: np.ndarray, device: torch.device):
    """Centred features (N, d), the present classes' means of them (C', d) and their shares (C',)."""
    X = _tensor(features, torch.float64, device)
    Xc = X - X.mean(dim=0)
    counts = np.bincount(labels)
    present = np.flatnonzero(counts > 0)
    Y = torch.zeros((X.shape[0], present.size), dtype=torch.float64, device=device)
    column = np.searchsorted(present, labels)
    Y[torch.arange(X.shape[0], device=device), torch.as_tensor(column, device=device)] = 1.0
    means = (Y.T @ Xc) / _tensor(counts[present], torch.float64, device)[:, None]
    return Xc, means, _tensor(counts[present] / X.shape[0], torch.float64, device)


def h_score_torch(features: np.ndarray, labels: np.ndarray, *, rtol: float,
                  device: str | torch.device = "cpu") -> float:
    """`ntps_nb.core.peers.h_score` on ``device``: tr(cov(f)^+ cov(E[f | y])), eigenvalues of cov(f)
    below ``rtol`` times the largest dropped.

    Parameters
    ----------
    features : (N, d) float array (checked by the caller).
    labels : (N,) integer labels in 0..C-1.
    rtol : relative eigenvalue cutoff of the pseudo-inverse.
    device : the torch device of the eigensolve.

    Returns
    -------
    float >= 0.
    """
    Xc, means, shares = _centred_and_class_means(features, labels, _device(device))
    cov = Xc.T @ Xc / Xc.shape[0]
    s, Q = torch.linalg.eigh(cov)
    if float(s[-1]) <= 0:
        raise ValueError("features are constant: cov(f) is zero")
    keep = s > rtol * s[-1]
    projections = means @ Q[:, keep]  # (C', r): class means on the kept eigenvectors
    return float(torch.sum((shares[:, None] * projections**2).sum(dim=0) / s[keep]))


def h_score_ledoit_wolf_torch(features: np.ndarray, labels: np.ndarray, *, scale_between: bool = True,
                              device: str | torch.device = "cpu") -> float:
    """`ntps_nb.core.peers.h_score_ledoit_wolf` on ``device``: sklearn's Ledoit-Wolf shrinkage
    (the same formula, summed whole instead of in blocks) and tr(shrunk^-1 cov(E[f | y])) by a
    Cholesky solve against the class means.

    Parameters
    ----------
    features : (N, d) float array (checked by the caller).
    labels : (N,) integer labels in 0..C-1.
    scale_between : multiply by (1 - delta) (default) or not.
    device : the torch device of the solve.

    Returns
    -------
    float >= 0.
    """
    Xc, means, shares = _centred_and_class_means(features, labels, _device(device))
    n, p = Xc.shape
    if p == 1:
        delta = 0.0
        shrunk = (Xc**2).mean().reshape(1, 1)
    else:
        squares = Xc**2
        trace_terms = squares.sum(dim=0) / n
        mu = trace_terms.sum() / p
        gram = Xc.T @ Xc
        beta_ = torch.sum(squares.sum(dim=1) ** 2)  # the sum of every entry of X2^T X2
        delta_ = torch.sum(gram**2) / n**2
        beta = 1.0 / (p * n) * (beta_ / n - delta_)
        delta_sum = (delta_ - 2.0 * mu * trace_terms.sum() + p * mu**2) / p
        beta = torch.minimum(beta, delta_sum)
        delta = 0.0 if float(beta) == 0 else float(beta / delta_sum)
        empirical = gram / n
        shrunk = (1.0 - delta) * empirical
        shrunk.diagonal().add_(delta * torch.trace(empirical) / p)
    if not bool(torch.any(torch.diagonal(shrunk) > 0)):
        raise ValueError("features are constant: cov(f) is zero")
    factor, info = torch.linalg.cholesky_ex(shrunk)
    if int(info) != 0:
        raise ValueError("the shrunk covariance is not positive definite (Cholesky failed)")
    solved = torch.cholesky_solve(means.T.contiguous(), factor)  # shrunk^-1 m_c, (d, C')
    trace = torch.sum(shares * torch.sum(means.T * solved, dim=0))
    return float((1.0 - delta if scale_between else 1.0) * trace)


def principal_root_torch(Shh: np.ndarray, *, rtol: float, device: str | torch.device = "cpu") -> tuple[np.ndarray, int]:
    """Shh^{1/2} (negative eigenvalues clipped to 0) and rank(Shh) at ``rtol`` times the largest
    eigenvalue, as `ntps_nb.core.peers.pca_overlap_ntps` builds its control.

    Parameters
    ----------
    Shh : (d, d) symmetric second moment of the token states.
    rtol : relative eigenvalue tolerance of the rank.
    device : the torch device of the eigensolve.

    Returns
    -------
    root : (d, d) float64 array; rank : int.
    """
    S = _tensor(Shh, torch.float64, _device(device))
    s, Q = torch.linalg.eigh(S)
    if float(s[-1]) <= 0:
        raise ValueError("Shh is zero: the token states carry no variance")
    rank = int((s > rtol * s[-1]).sum())
    return _numpy((Q * torch.sqrt(torch.clamp(s, min=0.0))) @ Q.T), rank


# --------------------------------------------------------------------------------------------
# Estimators: the default estimator and the plug-in with their jackknife intervals, and the
# subspace noise behind the reliability flag (`ntps_nb.core.estimators.ntps_estimate`)

#: Why a combination's subspaces are undefined, as `_whitened_bases` raises it (every reason
#: `_theory_geometries` gives except "Sxy is zero", where U is empty but V is defined).
_NO_SIGNAL = "Sxy is zero"


@dataclass(frozen=True, eq=False)
class _NoiseReference:
    """The full sample's whitening x -> S_r^{1/2} Q_r^T x ((r, d), `estimators._Whitening`) and its
    U (top m) and V, orthonormalised in those coordinates ((r, m), (r, q)): what every
    leave-one-shard-out replicate is compared with."""

    to_white: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def _nested_overlaps(a: torch.Tensor, b: torch.Tensor, columns: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """`estimators._nested_overlap` of each a[g] (n, r, w) against b (r, w'), where a[g] has
    ``columns[g]`` columns (its later ones are not read); (n, K)."""
    n = min(a.shape[-1], b.shape[-1])
    out = np.zeros((a.shape[0], ks.size))
    if n == 0:
        return out
    squared = (a[..., :n].mT @ b[:, :n]) ** 2
    leading = _numpy(torch.cumsum(torch.cumsum(squared, dim=1), dim=2).diagonal(dim1=-2, dim2=-1))
    for g in range(a.shape[0]):
        cap = min(int(columns[g]), b.shape[-1])
        if cap > 0:
            out[g] = leading[g, np.minimum(ks, cap) - 1]
    return out


def _estimate_block(arrays: dict[str, torch.Tensor], tokens: np.ndarray, labels_ok: np.ndarray, noise: np.ndarray,
                    reference: _NoiseReference | None, ks: np.ndarray, *, rtol: float, span_rtol: float,
                    range_basis: tuple[torch.Tensor, torch.Tensor] | None = None):
    """For each combination of a block: its `TheoryGeometry` (or the reason it is undefined), and
    for those flagged in ``noise`` its subspaces in the reference's whitened coordinates, compared
    with the reference's: (overlap of U at k_U, overlap of V at k, U columns, V columns), or the
    reason they are undefined (a string). Without a reference (the full sample itself) a flagged
    combination gets its own `_NoiseReference` instead. ``range_basis``: as `_grouped_geometries` takes it."""
    geometries, solved = _grouped_geometries(*(arrays[name] for name in ("Sxx", "Sxy", "Syy", "C0", "C1")), tokens,
                                             labels_ok, tol=None, rtol=rtol, span_rtol=span_rtol, keep=noise,
                                             range_basis=range_basis)
    compared: list = [geometries[i] if noise[i] else None for i in range(len(geometries))]
    for members, Q_r, s_r, Y, m, V in solved:
        flagged = [j for j, i in enumerate(members) if noise[i]]
        if not flagged:
            continue
        pick = torch.as_tensor(flagged, device=Q_r.device)
        Q_f, s_f = Q_r[pick], s_r[pick]
        X = (Q_f / torch.sqrt(s_f)[:, None, :]) @ Y[pick]  # U's vectors in the states' coordinates, descending
        to_white = reference.to_white if reference is not None else torch.sqrt(s_f)[:, :, None] * Q_f.mT
        u = torch.linalg.qr(to_white @ X).Q
        v = torch.linalg.qr(to_white @ V[pick]).Q
        m_f = m[flagged]
        if reference is None:
            for g, j in enumerate(flagged):
                compared[members[j]] = _NoiseReference(to_white=to_white[g], u=u[g, :, :min(int(m_f[g]), u.shape[-1])],
                                                       v=v[g])
            continue
        u_columns = np.minimum(m_f, u.shape[-1])
        over_u = _nested_overlaps(u, reference.u, u_columns, np.minimum(ks, reference.u.shape[-1]))
        over_v = _nested_overlaps(v, reference.v, np.full(len(flagged), v.shape[-1]), ks)
        for g, j in enumerate(flagged):
            compared[members[j]] = (over_u[g], over_v[g], int(u_columns[g]), int(v.shape[-1]))
    return geometries, compared


def _undefined_reasons(r_U: np.ndarray, r_V: np.ndarray, threshold_U: np.ndarray, threshold_V: np.ndarray,
                       tokens: np.ndarray, labels_ok: np.ndarray) -> list:
    """Why each combination's geometry is undefined before anything is solved (None: it is not),
    in the order the numpy code checks (as `_theory_geometries` does)."""
    out: list = [None] * r_U.size
    for i in range(r_U.size):
        if not labels_ok[i]:
            out[i] = "the labels contain fewer than 2 classes with any texts; NTPS needs at least 2 classes"
        elif r_U[i] == 0:
            out[i] = f"Sxx has no eigenvalue above the tolerance {float(threshold_U[i]):.3g}: it is zero or negative definite"
        elif tokens[i] == 0:
            out[i] = "no (prefix, next state) pairs: every text had at most one token, so C0 and C1 are zero"
        elif r_V[i] == 0:
            out[i] = f"C0 has no eigenvalue above the tolerance {float(threshold_V[i]):.3g}: it is zero or negative definite"
    return out


def _solve_combinations(stack: TorchShardStack, counts: np.ndarray, noise: np.ndarray, reference, ks: np.ndarray, *,
                        rtol: float, batch_size: int, dtype: torch.dtype, device: torch.device, bar=None):
    """`_estimate_block` over the rows of a (n, S) count matrix, ``batch_size`` rows per batched
    solve: the lists of geometries (or reasons) and of comparisons (None where not flagged); ``bar`` counts
    the rows of each block solved."""
    geometries: list = []
    compared: list = []
    for start, arrays, tokens, labels_ok in _replicate_blocks(stack, counts, batch_size=batch_size, dtype=dtype,
                                                              device=device, bar=bar):
        block = _estimate_block(arrays, tokens, labels_ok, noise[start:start + tokens.size], reference, ks,
                                rtol=rtol, span_rtol=SPAN_RTOL, range_basis=stack.range_basis())
        del arrays
        geometries += block[0]
        compared += block[1]
    return geometries, compared


def _noise_solutions(stack: TorchShardStack, rows: np.ndarray, noise: np.ndarray, ks: np.ndarray, *, rtol: float,
                     batch_size: int, dtype: torch.dtype, device: torch.device, bar=None):
    """The full sample (all shards once) and the rows of a count matrix solved: the full sample's
    geometry (or reason), its `_NoiseReference`, and each row's geometry and comparison; ``bar`` counts
    the 1 + n solved combinations."""
    (full,), (reference,) = _solve_combinations(stack, np.ones((1, len(stack))), np.array([True]), None, ks,
                                                rtol=rtol, batch_size=1, dtype=dtype, device=device, bar=bar)
    if isinstance(reference, str):
        raise ValueError(reference)
    geometries, compared = _solve_combinations(stack, rows, noise, reference, ks, rtol=rtol, batch_size=batch_size,
                                               dtype=dtype, device=device, bar=bar)
    return full, reference, geometries, compared


def _noise_of(ks: np.ndarray, reference: _NoiseReference, compared: list) -> pd.DataFrame:
    """`subspace_noise`'s frame from the leave-one-shard-out comparisons, in shard order."""
    for outcome in compared:
        if isinstance(outcome, str):  # the numpy function raises where a replicate's subspaces are undefined
            raise ValueError(outcome)
    return _noise_frame(ks, reference.u.shape[-1], reference.v.shape[-1], len(compared), compared)


def _prepare(moment_shards: Sequence[Moments], ks, dtype: torch.dtype, device, batch_size: int | None):
    shards = _as_shards(moment_shards)
    ks = _check_ks(ks)
    dtype, device = _check_dtype(dtype), _device(device)
    stack = TorchShardStack(shards, centred=False, dtype=dtype, device=device)
    return shards, ks, stack, dtype, device, _batch_size(batch_size, stack.d, dtype, device)


def pooled_geometry_torch(
    moment_shards: Sequence[Moments],
    *,
    rtol: float = RANGE_RTOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> TheoryGeometry:
    """The theory geometry of all the shards pooled, combined on ``device`` as `ntps_estimate_torch` combines its
    full row (the shards stacked there, read where they are resident, `keep_resident`) and with the same solve of
    C0, so the same r_V; no host combination of the shards (4.6-5.9 s at d = 4096 and 20 shards on the device
    tool's host, benchmarks/results/device_pooling). What a study's estimates stage reads r_V from before it asks
    the row.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer.
    rtol : relative range tolerance of Sxx and C0.
    device, dtype : the torch device and precision of the solve.

    Returns
    -------
    `TheoryGeometry` (numpy arrays); a ValueError where it is undefined (as `theory_geometry`).
    """
    dtype, device = _check_dtype(dtype), _device(device)
    stack = TorchShardStack(_as_shards(moment_shards), centred=False, dtype=dtype, device=device)
    ((_, geometry),) = _replicate_geometries(stack, np.ones((1, len(stack))), tol=None, rtol=rtol,
                                             span_rtol=SPAN_RTOL, batch_size=1, dtype=dtype, device=device)
    if isinstance(geometry, str):
        raise ValueError(geometry)
    return geometry


def subspace_noise_torch(
    moment_shards: Sequence[Moments],
    ks,
    *,
    rtol: float = RANGE_RTOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """`ntps_nb.core.estimators.subspace_noise` on ``device``: the S leave-one-shard-out
    replicates formed as one product per block and factorised in one batched call, each one's U
    (top m) and V taken into the full sample's whitened coordinates, orthonormalised by QR in their
    own order and compared with the full sample's by the nested overlaps.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (disjoint texts), at least 3.
    ks : (K,) positive integers, numbers of next-token directions.
    rtol : relative range tolerance of Sxx and C0.
    device, dtype : the torch device and precision of the solves.
    batch_size : replicates per batched solve (default: from free memory).

    Returns
    -------
    DataFrame as `ntps_nb.core.estimators.subspace_noise` returns it.
    """
    shards, ks, stack, dtype, device, batch_size = _prepare(moment_shards, ks, dtype, device, batch_size)
    S = len(shards)
    if S < 3:
        raise ValueError(f"subspace noise needs at least 3 shards, got {S}")
    _, reference, _, compared = _noise_solutions(stack, 1.0 - np.eye(S), np.ones(S, dtype=bool), ks, rtol=rtol,
                                                 batch_size=batch_size, dtype=dtype, device=device)
    return _noise_of(ks, reference, compared)


def _estimate_combinations(S: int, estimator: str, seed: int):
    """The combinations of S shards `ntps_estimate_torch` solves, each once: the (n, S) 0/1 count matrix (row 0 all
    shards, solved first: the noise's reference), the row of all shards, the S leave-one-out rows and, for
    "richardson", the two halves' rows and each left-out shard's pair of half rows (None for an empty half)."""
    rows: dict[tuple[int, ...], int] = {}

    def row(members) -> int | None:
        key = tuple(int(i in members) for i in range(S))
        return rows.setdefault(key, len(rows)) if any(key) else None

    full = row(range(S))
    loo = [row([j for j in range(S) if j != i]) for i in range(S)]
    halves = loo_halves = None
    if estimator == "richardson":
        a, b = split_halves(S, seed)
        halves = (row(a), row(b))
        loo_halves = [(row([j for j in a if j != i]), row([j for j in b if j != i])) for i in range(S)]
    return np.array(list(rows), dtype=np.float64), full, loo, halves, loo_halves


def estimate_solves(n_shards: int, estimator: str = DEFAULT_ESTIMATOR, seed: int = 0) -> int:
    """How many combinations of the shards `ntps_estimate_torch` solves for its estimate and replicates: all
    shards and each leave-one-out pool, and for "richardson" the two halves of the seeded split and each
    left-out shard's half (2 S + 3, fewer where a half has one shard).

    Parameters
    ----------
    n_shards : the number of shards S.
    estimator : "richardson" or "plugin".
    seed : the seed of richardson's split.

    Returns
    -------
    The number of combinations (what its ``bar`` counts); a ValueError for an estimator it does not compute or
    fewer shards than `ntps_estimate` takes (`ntps_nb.core.estimators.min_shards`).
    """
    _check_device_estimator(estimator)
    S = validation.check_count(n_shards, "n_shards", minimum=min_shards(estimator))
    return len(_estimate_combinations(S, estimator, seed)[0])


def _check_device_estimator(estimator: str) -> None:
    """The estimators `ntps_estimate_torch` computes; a ValueError names the others."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator not in DEVICE_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} runs on device=None (numpy) only; on a torch device "
                         f"ntps_estimate computes {' and '.join(map(repr, DEVICE_ESTIMATORS))}")


def ntps_estimate_torch(
    moment_shards: Sequence[Moments],
    ks,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    level: float = 0.90,
    seed: int = 0,
    rtol: float = RANGE_RTOL,
    noise_max: float = NOISE_MAX,
    gap_min: float = GAP_MIN,
    bound_se: float = BOUND_SE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    plugins: bool = False,
    bar=None,
    stationary: bool = True,
    reach_se: float | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """`ntps_nb.core.estimators.ntps_estimate` on ``device``, for the "richardson" (default) and
    "plugin" estimators: the same frame.

    Every plug-in the estimate and its S delete-one-shard replicates need is one row of a count
    matrix over the shards: all shards; for "richardson" also the two halves of the seeded split
    (`ntps_nb.core.estimators.split_halves`) and, for each left-out shard, the rest and its own
    half without it (the other half is unchanged, so it is one row, solved once). The rows are
    combined as one product and solved as one batched call per block; the leave-one-shard-out rows
    also give `subspace_noise` (their subspaces against the full sample's). The Richardson
    combination, the jackknife standard error, the Student-t interval and the flag are then the
    numpy code's own (`estimators._estimate_frame`); the eigengaps of the flag come from the full
    and leave-one-shard-out rows' own eigenvalues, as `ntps_nb.core.estimators.eigengap_ratios`.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer, at least 3 shards.
    ks : (K,) positive integers, numbers of next-token directions.
    estimator : "richardson" (default) or "plugin"; the other estimators of
        `ntps_nb.core.estimators.ESTIMATORS` run in numpy only (a ValueError says so).
    level, seed, rtol, noise_max, gap_min, bound_se : as in `ntps_nb.core.estimators.ntps_estimate`.
    device, dtype : the torch device and precision of the solves.
    batch_size : combinations per batched solve (default: from free memory).
    plugins : also return the plug-in at ``ks`` on all shards and without each, solved here for the
        replicates (what `ntps_nb.core.quadratic.quadratic_interval` reads as ``pooled`` and ``left_out``).
    bar : an open `ntps_nb.core.progress.progress_bar` to advance by each combination once solved
        (`estimate_solves` of them): what `ntps_nb.core.estimators.ntps_estimate` with ``device`` passes.
    stationary : compute stationary_distance and the stationary widening's reach from the same geometries
        (`ntps_nb.core.estimators._stationary_columns`; default; False: NaN, as
        `ntps_nb.core.estimators.ntps_estimate` with ``stationary_flag=False`` drops them).
    reach_se : the distance of `ntps_nb.core.estimators.stationary_reach` (None: `stationary_reach_se` at
        ``level``, `STATIONARY_SE` and the number of shards).

    Returns
    -------
    DataFrame as `ntps_nb.core.estimators.ntps_estimate` returns it before its rotation and stationary conditions
    (stationary_distance, stationary_reach_down and stationary_reach_up included: the principal angles of the same
    geometries); with ``plugins``, the tuple (frame,
    (K,) plug-in on all shards, (S, K) plug-in without shard i in row i, NaN where that pool is undefined).
    """
    _check_device_estimator(estimator)
    _check_estimate_options(_as_shards(moment_shards), level, estimator)
    shards, ks, stack, dtype, device, batch_size = _prepare(moment_shards, ks, dtype, device, batch_size)
    S = len(shards)
    n_texts = np.array([s.n_texts for s in shards], dtype=np.int64)
    counts, full, loo, halves, loo_halves = _estimate_combinations(S, estimator, seed)
    noise = np.zeros(len(counts), dtype=bool)
    noise[loo] = True
    full_geometry, reference, solved, compared = _noise_solutions(
        stack, counts[1:], noise[1:], ks, rtol=rtol, batch_size=batch_size, dtype=dtype, device=device, bar=bar)
    if isinstance(full_geometry, str):
        raise ValueError(full_geometry)
    # C0's rounding checked on the device: no host combination of the shards (4.6-5.9 s at d = 4096 and 20
    # shards on the device tool's host, benchmarks/results/device_pooling)
    warn_of_the_sample(None, shards, full_geometry, ks, estimator=estimator, seed=seed, replicates=True, rtol=rtol,
                       reach=negative_reach_torch(stack.pooled_C0(), device=device, rtol=rtol),
                       stacklevel=4)  # at the caller of `ntps_estimate`, as its numpy path
    geometries = [full_geometry] + solved
    values = np.array([np.full(ks.shape, np.nan) if isinstance(g, str) else theory_values(g, ks) for g in geometries])
    sizes = counts.astype(np.int64) @ n_texts

    def combine(table: list | np.ndarray, whole: int, parts: tuple[int | None, int | None] | None) -> np.ndarray:
        """The estimator on one combination from a per-combination ``table`` (the plug-in, or the principal
        angles' cos^2): as is, or richardson's combination with its halves."""
        if isinstance(geometries[whole], str) or (parts is not None and None in parts):
            return np.full(np.shape(table[whole]), np.nan)  # numpy raises there: the replicate counts as failed
        if parts is None:
            return table[whole]
        return _richardson_combination(table[whole], [table[p] for p in parts], [int(sizes[p]) for p in parts],
                                       int(sizes[whole]))

    # the estimate and each replicate: all shards (and richardson's halves), each pool without a shard (and its halves)
    rows = [(full, halves)] + [(loo[i], None if halves is None else loo_halves[i]) for i in range(S)]
    point, *rest = [combine(values, whole, parts) for whole, parts in rows]
    replicates = np.array(rest)
    noise_frame = _noise_of(ks, reference, [compared[i - 1] for i in loo])
    gaps = _gap_frame(full_geometry, [None if isinstance(geometries[i], str) else geometries[i] for i in loo], ks)
    frame = _estimate_frame(ks, estimator, point, np.full(ks.shape, np.nan), replicates, noise_frame, gaps,
                            level=level, noise_max=noise_max, gap_min=gap_min, bound_se=bound_se,
                            n_texts=sum(s.n_texts for s in shards))
    # each principal angle's cos^2 combined as the estimate combines NTPS, from the same geometries
    columns = dict.fromkeys(STATIONARY_COLUMNS, np.nan)
    if stationary:
        width = min(int(ks.max()), shards[0].Sxy.shape[1])  # k_U <= m <= C
        angles = [_angles_of(g, ks, width) for g in geometries]
        point_angles, *replicate_angles = [combine(angles, whole, parts) for whole, parts in rows]
        columns = _stationary_columns(point_angles, np.array(replicate_angles),
                                     stationary_reach_se(level, STATIONARY_SE, S) if reach_se is None else reach_se)
    for name, column in columns.items():
        frame[name] = column
    return (frame, values[full], values[loo]) if plugins else frame
