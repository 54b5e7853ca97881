"""Peer transferability scores: what NTPS must beat to be worth its theory.

Every label-based peer has the call shape ``(features (N, d), labels (N,)) -> float`` and works
in float64 on the same pooled features the probes see. ``device=`` (None or "cpu-numpy": numpy,
the default; a torch device such as "cuda") puts the factorisations of LogME, the H-scores,
RankMe and the PCA-overlap control on that device (`ntps_nb.core.backends.torch`, the same
numbers to 1e-9); the k-NN accuracy stays on scikit-learn.

- `logme` (You et al. 2021): the maximised log evidence of Bayesian linear regression of each
  one-hot target on the features, per text, averaged over classes;
- `h_score` (Bao et al. 2019): tr(cov(f)^+ cov(E[f | y])), and `h_score_ledoit_wolf`, the same
  with a Ledoit-Wolf shrunk covariance (for d comparable to N);
- `knn_accuracy`: k-nearest-neighbour accuracy, leave-one-out (default) or on a seeded
  stratified held-out split;
- `rankme` (Garrido et al. 2023): the effective rank of the features, label-free (labels ignored).

`pca_overlap_ntps` is a control for NTPS itself: the same score with the next-token subspace
V_k replaced by the top-k principal directions of the token states. If it predicts as well as
NTPS, the next-token structure adds nothing beyond the variance structure.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from ntps_nb.core.backends import analysis_backend
from ntps_nb.core.moments import Moments, one_hot
from ntps_nb.core.score import RANGE_RTOL, InterpolationWarning, theory_geometry
from ntps_nb.core.subspaces import symmetric_eigh
from ntps_nb.core.validation import check_features, check_k, check_labels

#: Relative change of alpha and beta below which the LogME fixed-point iteration stops.
LOGME_RTOL = 1e-10
#: Iteration cap of the LogME fixed point (it typically converges in tens of steps).
LOGME_MAX_ITER = 10_000
#: LogME's weight precision alpha past this multiple of the largest beta s_i^2: the prior holds the weights at zero
#: to double precision. The fixed point runs there when a target carries nothing the features fit better than
#: noise (alpha grows without end); the evidence is then its limit alpha -> inf, the noise model's.
LOGME_ALPHA_LIMIT = 1e16
#: ||F m - y||^2 at most this share of ||y||^2 is an exact fit to rounding (the residual comes from ||y||^2 - ||z||^2,
#: exact to about 1e-15 of ||y||^2): with fewer singular values than texts the evidence then grows without bound.
LOGME_EXACT_FIT = 1e-12
#: Relative cutoff of the pseudo-inverse of cov(f) in the H-score (eigenvalues below it are dropped).
HSCORE_RTOL = 1e-10
#: An H-score within this share of C - 1 from no more texts than d + 1 is C - 1 by construction (`h_score`).
HSCORE_SATURATED_RTOL = 1e-6
#: The epsilon RankMe adds to each normalised singular value (Garrido et al. 2023).
RANKME_EPS = 1e-7
#: Fraction held out by ``knn_accuracy(mode="heldout")``.
KNN_TEST_SIZE = 0.3


class PeerUndefinedWarning(UserWarning):
    """A peer score is undefined on the given features; `peer_scores` records NaN and the reason."""


class PeerConvergenceWarning(UserWarning):
    """An iterative peer score stopped at its iteration cap."""


def _check(features, labels, *, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    X = check_features(features, min_rows=2)
    if not need_labels:
        return X, None
    if labels is None:
        raise ValueError("this score needs labels")
    return X, check_labels(labels, n_rows=X.shape[0], min_classes=2)


# -- LogME -----------------------------------------------------------------------------------------

def _logme_one_target(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int, rtol: float,
                      max_iter: int) -> dict[str, float]:
    """Maximise the evidence of y = F w + noise, w ~ N(0, I / alpha), noise ~ N(0, 1 / beta), given
    F's singular values s (r of them) and the coordinates z = U^T y of y on F's left singular vectors.

    Where alpha runs away (past `LOGME_ALPHA_LIMIT` times beta s_max^2, or ||m|| underflows: y has nothing the
    features fit better than noise) the evidence is its limit alpha -> inf, w = 0, beta = N / ||y||^2, returned with
    alpha = inf (with no more texts than dimensions the fixed point mostly goes there too). Where ||F m - y|| falls to
    rounding (`LOGME_EXACT_FIT`: y in the span of fewer singular vectors than texts, e.g. a feature that is the label)
    the evidence grows without bound with beta: an error."""
    sigma = s**2
    residual_out = max(y_norm2 - float(z @ z), 0.0)  # the part of y outside the span of F
    alpha, beta = 1.0, 1.0
    converged = False
    for iteration in range(1, max_iter + 1):
        shrink = alpha + beta * sigma
        gamma = float(np.sum(beta * sigma / shrink))  # effective number of parameters
        m2 = float(np.sum((beta * s * z / shrink) ** 2))  # ||m||^2
        res2 = float(np.sum((alpha * z / shrink) ** 2)) + residual_out  # ||F m - y||^2
        if res2 <= LOGME_EXACT_FIT * y_norm2:
            raise ValueError("LogME is unbounded: the features fit the target exactly (to rounding), so the evidence "
                             "grows without bound as the noise precision does")
        if m2 <= 0 or alpha > LOGME_ALPHA_LIMIT * beta * sigma.max():  # the prior holds w at 0: the noise model
            beta = n / y_norm2
            evidence = (np.log(beta) - np.log(2 * np.pi) - 1) / 2  # (n log beta - n log 2 pi - beta ||y||^2) / 2n
            return {"evidence": float(evidence), "alpha": float("inf"), "beta": float(beta), "n_iter": iteration,
                    "converged": True}
        new_alpha, new_beta = gamma / m2, (n - gamma) / res2
        change = max(abs(new_alpha - alpha) / alpha, abs(new_beta - beta) / beta)
        alpha, beta = new_alpha, new_beta
        if change < rtol:
            converged = True
            break
    shrink = alpha + beta * sigma
    m2 = float(np.sum((beta * s * z / shrink) ** 2))
    res2 = float(np.sum((alpha * z / shrink) ** 2)) + residual_out
    log_det = float(np.sum(np.log(shrink))) + (d - s.size) * np.log(alpha)
    evidence = (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi) - beta * res2 - alpha * m2 - log_det) / 2
    return {"evidence": float(evidence / n), "alpha": float(alpha), "beta": float(beta), "n_iter": iteration,
            "converged": converged}


def logme_per_class(
    features: Float[np.ndarray, "N d"], labels: Sequence[int], *, rtol: float = LOGME_RTOL,
    max_iter: int = LOGME_MAX_ITER, device: Any = None,
) -> pd.DataFrame:
    """LogME of each one-hot target: one row per class with ``evidence`` (log evidence / N at the
    optimum), the optimal ``alpha`` (weight precision) and ``beta`` (noise precision), ``n_iter``
    and ``converged``. Features are used as given (no centring, no intercept), as in the paper.

    Parameters
    ----------
    features : (N, d) float array, N >= 2.
    labels : (N,) integer labels, at least two classes.
    rtol : relative change of alpha and beta below which the fixed point stops.
    max_iter : iteration cap; reaching it warns with `PeerConvergenceWarning`.
    device : None or "cpu-numpy" (numpy, default) or a torch device for the SVD of the features.

    Returns
    -------
    DataFrame, one row per class present in ``labels`` (a value no text carries has no target) with columns class,
    evidence, alpha, beta, n_iter, converged.
    """
    X, y = _check(features, labels)
    n, d = X.shape
    Y = one_hot(y)
    backend = analysis_backend(device)
    if backend is None:
        U, s, _ = np.linalg.svd(X, full_matrices=False)
        keep = s > RANGE_RTOL * s[0]
        U, s = U[:, keep], s[keep]
        Z = U.T @ Y
    else:
        s, Z = backend.singular_coordinates_torch(X, Y, rtol=RANGE_RTOL, device=device)
    rows = []
    for c in np.unique(y):  # a label value no text carries has no target to fit
        row = _logme_one_target(s, Z[:, c], float(Y[:, c] @ Y[:, c]), n, d, rtol, max_iter)
        if not row["converged"]:
            warnings.warn(f"LogME for class {c} stopped at max_iter={max_iter} before the relative change fell "
                          f"below {rtol:g}", PeerConvergenceWarning, stacklevel=2)
        rows.append({"class": int(c), **row})
    return pd.DataFrame(rows)


def logme(features: Float[np.ndarray, "N d"], labels: Sequence[int], *, rtol: float = LOGME_RTOL,
          max_iter: int = LOGME_MAX_ITER, device: Any = None) -> float:
    """LogME (You et al. 2021): the maximum over (alpha, beta) of the per-text log evidence of the
    Bayesian linear regression of each one-hot target on the features, averaged over classes.

    The maximum is found by MacKay's fixed point, with gamma = sum_i beta s_i^2 / (alpha + beta s_i^2):
    alpha <- gamma / ||m||^2, beta <- (N - gamma) / ||F m - y||^2, from alpha = beta = 1, all
    terms evaluated on F's singular values (one SVD for every class). A class whose target the features fit no
    better than noise has its maximum in the limit alpha -> inf (w = 0): its evidence is the noise model's and its
    ``alpha`` inf (`logme_per_class`). A target the features fit exactly (to rounding) has no maximum: ValueError.

    Parameters
    ----------
    features, labels, rtol, max_iter, device : as in `logme_per_class`.

    Returns
    -------
    float, the mean over classes of ``logme_per_class(...)["evidence"]``.
    """
    return float(logme_per_class(features, labels, rtol=rtol, max_iter=max_iter, device=device)["evidence"].mean())


# -- H-score ---------------------------------------------------------------------------------------

def _between_class_covariance(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cov(E[f | y]): the covariance of each text's class-mean feature vector."""
    centred = X - X.mean(axis=0)
    counts = np.bincount(y)
    present = counts > 0
    sums = np.zeros((counts.size, X.shape[1]))
    np.add.at(sums, y, centred)
    means = sums[present] / counts[present, None]
    return (means * (counts[present, None] / X.shape[0])).T @ means


def h_score(features: Float[np.ndarray, "N d"], labels: Sequence[int], *, rtol: float = HSCORE_RTOL,
            device: Any = None) -> float:
    """H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f | y])), covariances with 1/N.

    The pseudo-inverse drops eigenvalues of cov(f) below ``rtol`` times the largest (the class
    means lie in the range of cov(f), so nothing label-related is lost). Invariant to any
    invertible affine map of the features; at most C - 1.

    With no more texts than d + 1 the centred features of general position span every direction the texts
    can, the class indicators are fitted exactly, and the H-score is C - 1 whatever the features: it then
    counts the classes, and says so with an `ntps_nb.core.score.InterpolationWarning` (as NTPS does below the
    rank of Sxx). `h_score_ledoit_wolf` does not saturate so.

    Parameters
    ----------
    features : (N, d) float array, N >= 2.
    labels : (N,) integer labels, at least two classes.
    rtol : relative eigenvalue cutoff of the pseudo-inverse.
    device : None or "cpu-numpy" (numpy, default) or a torch device for the eigensolve.

    Returns
    -------
    float >= 0.
    """
    X, y = _check(features, labels)
    backend = analysis_backend(device)
    if backend is not None:
        value = backend.h_score_torch(X, y, rtol=rtol, device=device)
    else:
        cov = np.cov(X, rowvar=False, bias=True).reshape(X.shape[1], X.shape[1])
        between = _between_class_covariance(X, y)
        s, Q = symmetric_eigh(cov)
        if s[-1] <= 0:
            raise ValueError("features are constant: cov(f) is zero")
        keep = s > rtol * s[-1]
        Q, s = Q[:, keep], s[keep]
        value = float(np.sum(np.einsum("ij,jk,ki->i", Q.T, between, Q) / s))
    n, d = X.shape
    n_classes = np.unique(y).size
    if n - 1 <= d and h_score_saturated(value, n_classes):
        warnings.warn(InterpolationWarning(
            f"h_score of {n} texts in {d} dimensions is C - 1 = {n_classes - 1} whatever the features: the centred "
            "features span every direction the texts can, so the class indicators are fitted exactly and the score "
            "counts the classes (h_score_ledoit_wolf does not saturate so)"), stacklevel=2)
    return value


def h_score_saturated(values: Any, n_classes: Any) -> bool:
    """Whether H-scores are all C - 1 (within `HSCORE_SATURATED_RTOL`), the value they take whatever the features
    with no more texts than d + 1 (`h_score`).

    Parameters
    ----------
    values : float or array of H-scores.
    n_classes : int or array of the matching class counts C.

    Returns
    -------
    bool
    """
    top = np.asarray(n_classes, dtype=np.float64) - 1
    return bool(np.all(np.abs(np.asarray(values, dtype=np.float64) - top) <= HSCORE_SATURATED_RTOL * top))


def h_score_ledoit_wolf(features: Float[np.ndarray, "N d"], labels: Sequence[int], *,
                        scale_between: bool = True, device: Any = None) -> float:
    """H-score with cov(f) replaced by its Ledoit-Wolf shrinkage estimate (shrinkage delta toward
    mu I, mu = tr(cov) / d), and cov(E[f | y]) scaled by (1 - delta) to match:
    tr(((1 - delta) cov + delta mu I)^-1 (1 - delta) cov(E[f | y])).

    The shrunk covariance is invertible, so no pseudo-inverse cutoff is needed; with delta = 0 it
    is `h_score`. This is our reading of the shrinkage-based H-score of Ibrahim et al. (2022);
    ``scale_between=False`` leaves out the (1 - delta) factor (plain plug-in of the shrunk
    covariance). For nearly isotropic features delta is large and the two differ by that factor.

    Parameters
    ----------
    features : (N, d) float array, N >= 2.
    labels : (N,) integer labels, at least two classes.
    scale_between : multiply by (1 - delta) (default) or not.
    device : None or "cpu-numpy" (numpy, default) or a torch device for the covariance and the solve.

    Returns
    -------
    float >= 0.
    """
    X, y = _check(features, labels)
    backend = analysis_backend(device)
    if backend is not None:
        return backend.h_score_ledoit_wolf_torch(X, y, scale_between=scale_between, device=device)
    estimator = LedoitWolf(assume_centered=False, store_precision=False).fit(X)
    shrunk, delta = estimator.covariance_, float(estimator.shrinkage_)
    between = _between_class_covariance(X, y)
    if not np.any(np.diag(shrunk) > 0):
        raise ValueError("features are constant: cov(f) is zero")
    solved = np.linalg.solve(shrunk, between)
    return float((1.0 - delta if scale_between else 1.0) * np.trace(solved))


# -- k-NN accuracy ---------------------------------------------------------------------------------

def _vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority vote per row; ties go to the tied class of the nearest neighbour (label-order free)."""
    counts = np.zeros((neighbour_labels.shape[0], n_classes), dtype=np.int64)
    rows = np.arange(neighbour_labels.shape[0])[:, None]
    np.add.at(counts, (np.broadcast_to(rows, neighbour_labels.shape), neighbour_labels), 1)
    best = counts.max(axis=1, keepdims=True)
    is_winner = np.take_along_axis(counts, neighbour_labels, axis=1) == best
    first = np.argmax(is_winner, axis=1)  # neighbours are sorted nearest first
    return neighbour_labels[np.arange(neighbour_labels.shape[0]), first]


def knn_accuracy(
    features: Float[np.ndarray, "N d"], labels: Sequence[int], *, k: int = 5,
    metric: Literal["euclidean", "cosine"] = "euclidean", mode: Literal["loo", "heldout"] = "loo",
    seed: int = 0, test_size: float = KNN_TEST_SIZE,
) -> float:
    """Accuracy of a k-nearest-neighbour majority vote on the features.

    ``mode="loo"`` (default, deterministic): every text is classified by its k nearest OTHER
    texts. ``mode="heldout"``: a stratified split (``test_size``, ``seed``); test texts vote with
    their k nearest training texts. Ties in the vote go to the tied class whose member is nearest.
    Euclidean distances make the score invariant to rotations; "cosine" also to scaling.

    Parameters
    ----------
    features : (N, d) float array, N >= 2.
    labels : (N,) integer labels, at least two classes.
    k : number of neighbours (at most N - 1 for "loo", the training size for "heldout").
    metric : "euclidean" (default) or "cosine".
    mode : "loo" (default) or "heldout".
    seed, test_size : seed and held-out fraction of the stratified split (``mode="heldout"`` only).

    Returns
    -------
    float in [0, 1], the fraction of (left-out or test) texts classified correctly.
    """
    X, y = _check(features, labels)
    k = check_k(k)
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    n_classes = int(y.max()) + 1
    if mode == "loo":
        if k > X.shape[0] - 1:
            raise ValueError(f"k = {k} neighbours need at least {k + 1} texts, got {X.shape[0]}")
        index = NearestNeighbors(n_neighbors=int(k), metric=metric, algorithm="brute").fit(X)
        _, neighbours = index.kneighbors()  # X=None: a point is not its own neighbour
        predicted, truth = _vote(y[neighbours], n_classes), y
    elif mode == "heldout":
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
        if k > Xtr.shape[0]:
            raise ValueError(f"k = {k} neighbours but only {Xtr.shape[0]} training texts")
        index = NearestNeighbors(n_neighbors=int(k), metric=metric, algorithm="brute").fit(Xtr)
        _, neighbours = index.kneighbors(Xte)
        predicted, truth = _vote(ytr[neighbours], n_classes), yte
    else:
        raise ValueError(f"mode must be 'loo' or 'heldout', got {mode!r}")
    return float(np.mean(predicted == truth))


# -- RankMe ----------------------------------------------------------------------------------------

def rankme(features: Float[np.ndarray, "N d"], labels: Sequence[int] | None = None, *,
           eps: float = RANKME_EPS, device: Any = None) -> float:
    """RankMe (Garrido et al. 2023): exp(-sum_k p_k log p_k), p_k = s_k / ||s||_1 + eps, over the
    singular values s of the (uncentred) feature matrix. Label-free: ``labels`` is accepted for
    the common call shape and ignored. Between 1 and min(N, d); d for an orthogonal matrix.

    Parameters
    ----------
    features : (N, d) float array, N >= 2, not all zero.
    labels : ignored.
    eps : added to each normalised singular value.
    device : None or "cpu-numpy" (numpy, default) or a torch device for the singular values.

    Returns
    -------
    float, the effective rank.
    """
    X, _ = _check(features, labels, need_labels=False)
    backend = analysis_backend(device)
    s = np.linalg.svd(X, compute_uv=False) if backend is None else backend.singular_values_torch(X, device=device)
    if s.sum() <= 0:
        raise ValueError("features are all zero: RankMe is undefined")
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


# -- PCA-overlap control for NTPS ------------------------------------------------------------------

def _principal_moments(moments: Moments, rtol: float, backend=None, device: Any = None) -> tuple[Moments, int]:
    """Moments whose next-token problem (A = C1 C1^T, B = C0) is PCA of Shh: C0 = I, C1 = Shh^{1/2},
    so V's directions are Shh's eigenvectors in descending order. Returns them and rank(Shh)."""
    if moments.Shh is None:
        raise ValueError("pca_overlap_ntps needs moments.Shh (the second moment of the token states); "
                         "these moments were extracted without it")
    if backend is not None:
        root, rank = backend.principal_root_torch(moments.Shh, rtol=rtol, device=device)
    else:
        s, Q = symmetric_eigh(moments.Shh)
        if s[-1] <= 0:
            raise ValueError("Shh is zero: the token states carry no variance")
        rank = int(np.count_nonzero(s > rtol * s[-1]))
        root = (Q * np.sqrt(np.clip(s, 0.0, None))) @ Q.T
    # n_tokens only guards next_token_subspace against empty C0/C1; Shh exists even for 1-token texts
    pca = replace(moments, C0=np.eye(moments.d), C1=root, n_tokens=max(moments.n_tokens, 1))
    return pca, rank


def _pca_geometry(pca: Moments, centred: bool, rtol: float, backend, device: Any):
    """The theory geometry of the principal-direction control's moments, on ``device``."""
    if backend is None:
        return theory_geometry(pca, centred=centred, rtol=rtol)
    return backend.theory_geometry_torch(pca, centred=centred, rtol=rtol, device=device)


def pca_overlap_ntps(moments: Moments, k: int, *, centred: bool = False, rtol: float = RANGE_RTOL,
                     device: Any = None) -> float:
    """NTPS_theory(k) with V_k replaced by the top-k principal directions of the token states
    (eigenvectors of the uncentred Shh, descending): a control that has the variance structure
    of the hidden states but no next-token prediction.

    Uses the core's `theory_geometry` (same whitening by Sxx, same k_U = min(k, m)). ``k`` must
    not exceed rank(Shh): further principal directions are arbitrary.

    Parameters
    ----------
    moments : the layer's `Moments`, with ``Shh``.
    k : number of principal directions, 1 <= k <= rank(Shh).
    centred : use the centred perception moments.
    rtol : relative tolerance on the eigenvalues of Shh and Sxx.
    device : None or "cpu-numpy" (numpy, default) or a torch device for the eigensolves.

    Returns
    -------
    float in [0, 1].
    """
    backend = analysis_backend(device)
    pca, rank = _principal_moments(moments, rtol, backend, device)
    k = check_k(k, limit=rank, limit_name="rank(Shh)")
    return _pca_geometry(pca, centred, rtol, backend, device).ntps(k)


def pca_overlap_sweep(moments: Moments, *, centred: bool = False, rtol: float = RANGE_RTOL,
                      device: Any = None) -> pd.DataFrame:
    """`pca_overlap_ntps` at every k = 1..rank(Shh), as ``ntps_sweep`` rows with variant "pca_overlap"
    (the excess-loss columns are those of the probe on the principal directions).

    Parameters
    ----------
    moments, centred, rtol, device : as in `pca_overlap_ntps`.

    Returns
    -------
    DataFrame, one row per k = 1..rank(Shh) with the columns of `TheoryGeometry.sweep`; r_V is
    rank(Shh) and fraction is k / rank(Shh).
    """
    backend = analysis_backend(device)
    pca, rank = _principal_moments(moments, rtol, backend, device)
    sweep = _pca_geometry(pca, centred, rtol, backend, device).sweep()
    sweep = sweep[sweep["k"] <= rank].copy()
    sweep["variant"] = "pca_overlap"
    sweep["r_V"] = rank
    sweep["fraction"] = sweep["k"] / rank
    return sweep.reset_index(drop=True)


# -- all peers at once -----------------------------------------------------------------------------

#: name -> score with the common call shape (features, labels) -> float
PEERS: dict[str, Callable[..., float]] = {
    "logme": logme,
    "h_score": h_score,
    "h_score_lw": h_score_ledoit_wolf,
    "knn_accuracy": knn_accuracy,
    "rankme": rankme,
}


#: Peers whose factorisations run on a torch device when `peer_scores` is given one.
DEVICE_PEERS = ("logme", "h_score", "h_score_lw", "rankme")


def peer_scores(features: Float[np.ndarray, "N d"], labels: Sequence[int], *, knn_k: int = 5,
                peers: Sequence[str] | None = None, device: Any = None, **provenance: Any) -> dict[str, Any]:
    """Every peer (or those named) on one layer's features, as one tidy row with provenance
    columns (``peer_scores(X, y, model=..., dataset=..., layer=...)``).

    Input errors (wrong labels, one class) raise. A score that is undefined on these features
    (e.g. LogME when the features fit every one-hot target exactly, as with fewer texts than
    dimensions) is NaN, with the reason in ``<name>_error`` and a `PeerUndefinedWarning`, so
    that one undefined score does not lose the others (or a study unit).

    Parameters
    ----------
    features : (N, d) float array, N >= 2.
    labels : (N,) integer labels, at least two classes.
    knn_k : neighbours of ``knn_accuracy`` (leave-one-out).
    peers : names from `PEERS` to compute (default: all).
    device : None or "cpu-numpy" (numpy, default) or a torch device for the peers of
        `DEVICE_PEERS` (k-NN stays on scikit-learn).
    **provenance : extra key/value pairs copied into the row first.

    Returns
    -------
    dict: the provenance, one float per peer name, ``<name>_error`` for undefined ones, and
    ``knn_k``, ``knn_mode`` ("loo").
    """
    names = list(PEERS) if peers is None else list(peers)
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; available: {sorted(PEERS)}")
    _check(features, labels)
    on_device = {"device": device} if analysis_backend(device) is not None else {}
    row: dict[str, Any] = dict(provenance)
    for name in names:
        try:
            row[name] = (PEERS[name](features, labels, k=knn_k) if name == "knn_accuracy"
                         else PEERS[name](features, labels, **(on_device if name in DEVICE_PEERS else {})))
        except (ValueError, np.linalg.LinAlgError) as error:
            row[name], row[f"{name}_error"] = float("nan"), str(error)
            warnings.warn(f"{name} is undefined on these features ({error}); recorded as NaN",
                          PeerUndefinedWarning, stacklevel=2)
    row["knn_k"] = knn_k
    row["knn_mode"] = "loo"
    return row
