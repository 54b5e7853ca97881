"""The excess-loss identity, its bounds, fitted-probe checks and a planted synthetic task.

In Sxx-whitened coordinates with M = Sxx^{-1/2} Sxy Sxy^T Sxx^{-1/2} = sum_i lambda_i u_i u_i^T,
the in-sample least-squares probe (no intercept, one-hot targets) on features E has loss
L(E) = tr(Syy) - sum_i lambda_i ||P_E u_i||^2 (SPEC section 5). For the next-token features
V_k, with k_U = min(k, m) and NTPS = NTPS_theory(k)::

    DeltaL = L(V_k) - L* = sum_{i<=k_U} lambda_i (1 - ||Pt u_i||^2) - sum_{i>k_U} lambda_i ||Pt u_i||^2
    (lambda_{k_U} - lambda_{k+1}) k_U (1 - NTPS) <= DeltaL <= lambda_1 k_U (1 - NTPS)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
from jaxtyping import Float

from ntps_nb.core.moments import Moments, moments_from_sequences, one_hot
from ntps_nb.core.score import RANGE_RTOL, theory_geometry
from ntps_nb.core.subspaces import next_token_subspace, perception_subspace
from ntps_nb.core.validation import check_features, check_labels


def excess_loss(moments: Moments, k: int | None = None, *, fraction: float | None = None,
                centred: bool = False, rtol: float = RANGE_RTOL) -> float:
    """DeltaL = L(V_k) - L*: the in-sample excess MSE of probing the k next-token features
    instead of the best k features, from the moments alone (no probe is fitted).

    Parameters
    ----------
    moments : the layer's `Moments`.
    k, fraction : number of next-token directions, or a fraction of r_V (k = int(fraction * r_V));
        give exactly one.
    centred : use the centred perception moments (probe with intercept).
    rtol : relative tolerance on the eigenvalues of Sxx and C0.

    Returns
    -------
    float, DeltaL >= 0 up to round-off.
    """
    geometry = theory_geometry(moments, centred=centred, rtol=rtol)
    return geometry.excess_loss(geometry.k(k, fraction))


def excess_loss_bounds(moments: Moments, k: int | None = None, *, fraction: float | None = None,
                       centred: bool = False, rtol: float = RANGE_RTOL) -> tuple[float, float]:
    """(lower, upper) bounds on `excess_loss` in terms of 1 - NTPS_theory(k).

    Parameters
    ----------
    moments, k, fraction, centred, rtol : as in `excess_loss`.

    Returns
    -------
    (lower, upper) : tuple of two floats, ``TheoryGeometry.bounds(k)``.
    """
    geometry = theory_geometry(moments, centred=centred, rtol=rtol)
    return geometry.bounds(geometry.k(k, fraction))


def least_squares_loss(features: Float[np.ndarray, "N k"], targets: Float[np.ndarray, "N C"]) -> float:
    """In-sample MSE (1/N) sum_n ||y_n - W^T f_n||^2 of the no-intercept least-squares probe.

    Parameters
    ----------
    features : (N, k) float array, the probe's inputs f_n.
    targets : (N, C) float array, the targets y_n (one-hot labels for the identity).

    Returns
    -------
    float, the mean over N of the squared residual norm.
    """
    F = np.asarray(features, dtype=np.float64)
    Y = np.asarray(targets, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(F, Y, rcond=None)
    residual = Y - F @ coef
    return float(np.sum(residual**2) / F.shape[0])


def fitted_excess_loss(features: Float[np.ndarray, "N d"], labels: np.ndarray, moments: Moments,
                       k: int, *, test_features: Float[np.ndarray, "M d"] | None = None,
                       test_labels: np.ndarray | None = None) -> dict[str, float]:
    """Fit the two in-sample least-squares probes the identity is about and return their losses.

    ``features`` are the pooled states the moments' perception side came from. The probes see
    k features: xbar^T V_k (the next-token directions) and xbar^T U_k (the best directions).
    With ``test_features``/``test_labels`` the same train-fitted probes are also scored on the
    test split (``heldout_*`` keys): the held-out excess loss, which no identity describes.

    Parameters
    ----------
    features : (N, d) float array, pooled states of the training texts.
    labels : (N,) integer labels in [0, C).
    moments : `Moments` of the same texts (they define U and V, and C = ``moments.n_classes``).
    k : number of directions; the best probe uses min(k, rank_B of U) of them.
    test_features : (M, d) float array of held-out pooled states, optional.
    test_labels : (M,) integer labels of the held-out texts; needed with ``test_features``.

    Returns
    -------
    dict of str to float: ``loss_next_token``, ``loss_best``, ``excess_loss`` (their difference)
    and, with test data, ``heldout_loss_next_token``, ``heldout_loss_best``, ``heldout_excess_loss``.
    """
    if (test_features is None) != (test_labels is None):
        raise ValueError("give test_features and test_labels together, or neither")
    X, Y = _probe_data(features, labels, moments, "features")
    if test_features is not None:
        Xt, Yt = _probe_data(test_features, test_labels, moments, "test_features")
    U = perception_subspace(moments, order="descending")
    V = next_token_subspace(moments, order="descending")
    bases = {"next_token": V.top(k), "best": U.top(min(k, U.rank_B))}
    out: dict[str, float] = {}
    for name, basis in bases.items():
        coef, *_ = np.linalg.lstsq(X @ basis, Y, rcond=None)
        out[f"loss_{name}"] = float(np.sum((Y - X @ basis @ coef) ** 2) / X.shape[0])
        if test_features is not None:
            out[f"heldout_loss_{name}"] = float(np.sum((Yt - Xt @ basis @ coef) ** 2) / Xt.shape[0])
    out["excess_loss"] = out["loss_next_token"] - out["loss_best"]
    if test_features is not None:
        out["heldout_excess_loss"] = out["heldout_loss_next_token"] - out["heldout_loss_best"]
    return out


def _probe_data(features: Any, labels: Any, moments: Moments, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite (N, d) float64 features of the moments' d and their one-hot labels, one per row."""
    X = check_features(features, name)
    if X.shape[1] != moments.d:
        raise ValueError(f"{name} have d = {X.shape[1]} columns, the moments d = {moments.d}")
    y = check_labels(labels, n_classes=moments.n_classes, n_rows=X.shape[0],
                     name="labels" if name == "features" else "test_labels")
    return X, one_hot(y, moments.n_classes)


@dataclass(frozen=True, eq=False)
class SyntheticTask:
    """Texts as vectors from a linear model with planted subspaces.

    Attributes
    ----------
    sequences : (N, T, d) token states.
    features : (N, d) mean-pooled states.
    labels : (N,) integer labels.
    moments : the NTPS moments of the sequences (float64, by the definitions).
    next_token_basis : (d, q) orthonormal basis of the planted predictable subspace.
    perception_basis : (d, C) basis of the planted label directions, at ``angle`` to the former.
    angle : planted principal angle (radians) between label directions and predictable subspace.
    """

    sequences: Float[np.ndarray, "N T d"]
    features: Float[np.ndarray, "N d"]
    labels: np.ndarray
    moments: Moments
    next_token_basis: Float[np.ndarray, "d q"]
    perception_basis: Float[np.ndarray, "d C"]
    angle: float
    settings: dict

    @property
    def n_classes(self) -> int:
        return self.perception_basis.shape[1]


def synthetic_linear_task(
    *,
    n_texts: int = 2000,
    n_tokens: int = 16,
    d: int = 32,
    n_classes: int = 4,
    n_predictable: int = 8,
    angle: float = 0.0,
    signal: float = 0.5,
    token_noise: float = 0.1,
    seed: int = 0,
) -> SyntheticTask:
    """Generate a labelled dataset of token-state sequences with a controllable angle between
    the label directions and the next-token (predictable) subspace.

    Each text n has T tokens h_{n,t} = P g_n + signal * U_true mu_{y_n} + R e_{n,t} + noise, with
    P (d x q) the predictable subspace (text-constant content g_n ~ N(0, I), so prefix sums
    predict it), R its orthogonal complement carrying per-token white noise e_{n,t} ~ N(0, T I)
    (as large after pooling as g_n, but unpredictable), and label directions
    U_true = cos(angle) P[:, :C] + sin(angle) R[:, :C]. Hence V's top q directions are close to
    span(P), U's top C close to span(U_true), and NTPS_theory(q) falls from ~1 (angle 0) to ~0
    (angle pi/2), roughly as cos^2(angle). The planted geometry is approximate at finite N and
    signal; the moments (and so NTPS) are exact for the sampled data.

    Parameters
    ----------
    n_texts : number of texts N (labels are balanced: n mod C, shuffled).
    n_tokens : tokens per text T, >= 2.
    d : state dimension.
    n_classes : number of classes C, 2 <= C <= n_predictable.
    n_predictable : dimension q of the predictable subspace P; q + C <= d.
    angle : planted principal angle (radians) between label directions and P.
    signal : scale of the class centroids.
    token_noise : standard deviation of the isotropic per-token noise.
    seed : seed of the generator.

    Returns
    -------
    `SyntheticTask` with (N, T, d) sequences, (N, d) pooled features, (N,) labels, their moments,
    the (d, q) basis P and the (d, C) label directions U_true.
    """
    if n_predictable + n_classes > d:
        raise ValueError(f"need n_predictable + n_classes <= d, got {n_predictable} + {n_classes} > {d}")
    if n_classes < 2 or n_classes > n_predictable:
        raise ValueError(f"need 2 <= n_classes <= n_predictable, got n_classes={n_classes}, n_predictable={n_predictable}")
    if n_tokens < 2 or n_texts < n_classes:
        raise ValueError("need n_tokens >= 2 and at least one text per class")
    rng = np.random.default_rng(seed)
    frame = scipy.stats.special_ortho_group.rvs(d, random_state=rng) if d > 1 else np.eye(1)
    P, R = frame[:, :n_predictable], frame[:, n_predictable:]
    U_true = np.cos(angle) * P[:, :n_classes] + np.sin(angle) * R[:, :n_classes]
    # class centroids with well-separated singular values (1 ... 1/2, times sqrt(C)), so that every
    # label direction stands clear of the sampling noise
    left = scipy.stats.ortho_group.rvs(n_classes, random_state=rng)
    right = scipy.stats.ortho_group.rvs(n_classes, random_state=rng)
    centroids = np.sqrt(n_classes) * left @ np.diag(np.linspace(1.0, 0.5, n_classes)) @ right
    labels = np.arange(n_texts) % n_classes
    rng.shuffle(labels)
    g = rng.standard_normal((n_texts, n_predictable))
    constant = g @ P.T + signal * centroids[labels] @ U_true.T  # (N, d), same for every token
    white = rng.standard_normal((n_texts, n_tokens, d - n_predictable)) * np.sqrt(n_tokens)
    noise = token_noise * rng.standard_normal((n_texts, n_tokens, d))
    sequences = constant[:, None, :] + white @ R.T + noise
    moments = moments_from_sequences(list(sequences), labels, n_classes)
    return SyntheticTask(
        sequences=sequences, features=sequences.mean(axis=1), labels=labels, moments=moments,
        next_token_basis=P, perception_basis=U_true, angle=float(angle),
        settings=dict(n_texts=n_texts, n_tokens=n_tokens, d=d, n_classes=n_classes,
                      n_predictable=n_predictable, angle=float(angle), signal=signal,
                      token_noise=token_noise, seed=seed),
    )


def angle_sweep(angles: np.ndarray, *, k: int | None = None, **task_kwargs) -> pd.DataFrame:
    """NTPS_theory, DeltaL and its bounds on synthetic tasks over planted angles (one row each).

    Parameters
    ----------
    angles : (A,) float array of planted angles in radians.
    k : number of next-token directions (default: the task's ``n_predictable``).
    **task_kwargs : passed to `synthetic_linear_task` (all but ``angle``).

    Returns
    -------
    DataFrame, one row per angle with columns angle, angle_deg, k, ntps, cos2_angle, excess_loss,
    lower_bound, upper_bound and the task's settings as ``task_*``.
    """
    rows = []
    for angle in angles:
        task = synthetic_linear_task(angle=float(angle), **task_kwargs)
        geometry = theory_geometry(task.moments)
        kk = task.settings["n_predictable"] if k is None else k
        lower, upper = geometry.bounds(kk)
        rows.append({"angle": float(angle), "angle_deg": float(np.degrees(angle)), "k": kk,
                     "ntps": geometry.ntps(kk), "cos2_angle": float(np.cos(angle) ** 2),
                     "excess_loss": geometry.excess_loss(kk), "lower_bound": lower, "upper_bound": upper,
                     **{f"task_{key}": value for key, value in task.settings.items() if key != "angle"}})
    return pd.DataFrame(rows)
