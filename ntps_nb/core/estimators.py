"""Estimators of the population NTPS from shard moments, with jackknife intervals.

The moments are sample means, so the NTPS computed from them (``"plugin"``) estimates the NTPS of
the population the texts come from, and it is biased at finite N: sampling noise in the estimated
perception directions u_i adds a component spread over all r whitened dimensions, of which a
fraction of about k / r falls inside the next-token subspace. With c^2 the squared cosine between
an estimated and a true direction, E[plugin] ~ c^2 NTPS + (1 - c^2) k / r: attenuated toward
chance, by an amount that depends on N, d, C and the eigengaps.

Estimators (each returns NTPS_theory at the requested k; `ESTIMATORS` lists them):

- ``"plugin"``: the theory NTPS of the pooled moments (SPEC section 4), unchanged.
- ``"richardson"`` (the default of `ntps_estimate`, `DEFAULT_ESTIMATOR`): the plug-in's 1 / N bias
  removed by Richardson extrapolation from the full sample and its two halves,
  2 plugin(N) - mean(plugin(N / 2)) for equal halves (Quenouille's jackknife with two groups,
  Quenouille 1956; Richardson 1911). Three factorisations per layer. Where the subspaces are in
  their small-noise regime (the ``reliable`` flag) it removed the bias on the estimator map and its
  jackknife intervals covered; outside it nothing here does (docs/estimator.md).
- ``"adjusted"``: the two Gram matrices NTPS is built from are in-sample regression fits of the
  one-hot labels (on all r whitened directions, and on the next-token directions); each is
  corrected like an adjusted R^2, E[fit] = K + (r / N)(Syy - K). This corrects the label noise and
  the noise of the whitening together, from N, r and Syy alone. See `_adjusted`.
- ``"adjusted_v"``: "adjusted" plus a correction of the next-token subspace's attenuation from the
  agreement of its two split-half estimates (two more factorisations of C0: ~3x the plug-in).
- ``"debiased"``: the label-noise terms of the Gram matrices estimated from the shards' spread.
- ``"extrapolate"``: rational extrapolation of the plug-in from N / 2 and N to N = infinity.
- ``"crossfit"``: sample splitting for U. The shards are split in two halves A and B (several
  seeded splits, `CROSSFIT_SPLITS`); the perception subspace is estimated on each half (in
  coordinates whitened by the pooled Sxx), the next-token subspace on the pooled moments, and
  NTPS = sum tr(Ua^T P_k Ub Omega) / sum tr(Ua^T Ub Omega), Omega the rotation that best aligns
  Ub with Ua. The noise of the halves is independent, so numerator and denominator carry the
  same attenuation, which cancels in the ratio (Spearman's correction for attenuation, with
  split halves as the two measurements); nothing is inverted. V's own noise is not corrected. Like
  "crossfit_inverse" it is undefined (NaN) where the pooled texts are no more than the rank of Sxx:
  the pooled whitening then makes the two halves' spans orthogonal.
- ``"crossfit_inverse"``: the first-order correction for both subspaces,
  tr(G^-1 Ua^T Vb H^-1 Va^T Ub) / k_U with G = Ua^T Ub and H = Va^T Vb, U and V from each half.
  Exact to first order, but the inverses make it heavy-tailed wherever the halves disagree.
- ``"wishart"``: the plug-in times (N - k - 1) / (N - r - 1), r the retained rank of Sxx. NTPS is
  a ratio tr((Sxy^T Sxx^-1 Sxy)^-1 Sxy^T V (V^T Sxx V)^-1 V^T Sxy) / k_U (for k >= m); with Sxx
  replaced by a Wishart sample, E[Sxx^-1] = Sigma^-1 N / (N - r - 1) and
  E[(V^T Sxx V)^-1] = (V^T Sigma V)^-1 N / (N - k - 1), which shrink the ratio by the inverse of
  that factor. It removes the whitening's own bias (docs/estimator.md), not the label noise's.
- ``"jackknife"``: leave-one-shard-out bias correction of the plug-in, S theta - (S - 1) mean(theta_-i).
- ``"shrinkage"``: the plug-in on Sxx and C0 shrunk toward a multiple of the identity, with the
  Ledoit-Wolf intensity estimated from the spread of the shard moments.
- ``"pca"``: the plug-in in the top-p principal subspace of Sxx, p = N // `PCA_TEXTS_PER_DIM`.
  (Its estimand is the NTPS of the projected population: equal to NTPS when the signal lies there.)
- ``"chance"``: (plugin - k / r) / (1 - k / r), the expected plug-in under random labels being
  k / r (U uniformly distributed in the r-dimensional whitened range). Like kappa for accuracy,
  it estimates the chance-corrected population NTPS, not NTPS itself.

Intervals (`ntps_estimate`): delete-one-shard jackknife standard error and a Student-t interval
around the estimate, for any estimator; S replicates of the estimator. With ``device=`` a torch
device, `ntps_estimate` (for `DEVICE_ESTIMATORS`) and `subspace_noise` solve every shard
combination they need as batches on that device (`ntps_nb.core.backends.torch`), the same numbers.

Reliability (`ntps_estimate`'s ``reliable``, `subspace_noise`): the estimators' biases come from
the sampling noise of the estimated subspaces U_k and V_k. Their jackknife spread over the shards
(squared sines of the principal angles between leave-one-shard-out and full-sample subspaces, in
one metric) measures that noise from the data; a row is reliable when it is at most `NOISE_MAX` per
direction for both subspaces, i.e. where a second-order expansion in the noise holds and a 1 / N
bias correction is enough. Nearly tied eigenvalues at k make the subspace move with the sample and
the row unreliable; where they are tied far below the sampling noise the shards can all break the
tie the same wrong way, so a row also needs both eigengaps at k to be at least `GAP_MIN` jackknife
standard errors (`eigengap_ratios`). Calibrated on the estimator map (docs/estimator.md). Some estimators also
report their own statistic in ``reliability`` (the crossfit ones: the split-half agreement at k);
it does not decide ``reliable``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from ntps_nb.core.backends import analysis_backend
from ntps_nb.core.intervals import _jackknife, nested_groups, theory_values
from ntps_nb.core.moments import Moments
from ntps_nb.core.progress import progress_bar
from ntps_nb.core.quadratic import (INTERACTION_HALF, MIN_HALF, interaction_halves, numpy_plugins, quadratic_factors,
                                    quadratic_interval)
from ntps_nb.core.rotation import (INTERVALS, WIDENING_LEVEL, _rotation_ranges, rotation_interval,
                                   rotation_stability, rotation_widening)
from ntps_nb.core.score import (SPAN_RTOL, BeyondRankWarning, InterpolationWarning, NextTokenTieWarning,
                                RoundedMomentsWarning, TheoryGeometry, _caught, _theory_geometry_of, interpolates,
                                interpolation_message, moving_next_token_ties, theory_geometry, tied_ks,
                                warn_of_the_sample)
from ntps_nb.core.subspaces import (A_RANK_RTOL, RANGE_RTOL, Subspace, check_labels, nested_orthonormal_basis,
                                    next_token_subspace, perception_subspace, symmetric_eigh)

ESTIMATORS = ("plugin", "richardson", "adjusted", "adjusted_v", "wishart", "debiased", "extrapolate", "crossfit", "crossfit_inverse", "jackknife", "shrinkage", "pca", "chance")
#: The estimators that need at least two shards (the others also accept one `Moments`).
SHARD_ESTIMATORS = ("richardson", "adjusted_v", "debiased", "extrapolate", "crossfit", "crossfit_inverse", "jackknife", "shrinkage")
#: The estimators that read only the two halves of one split of the shards (and the full sample, their
#: union): given the moments of the two halves as two shards they give the value of all the shards,
#: as `split_halves` (2, seed) puts one in each half (`ntps_nb.extract.extract`'s ``half_layers``).
HALF_ESTIMATORS = ("richardson",)
#: The estimators that split the shards into two halves: a delete-one-shard replicate must leave a shard in
#: each half, so their jackknife interval needs `SPLIT_MIN_SHARDS` shards (with 3, one half holds a single
#: shard and every replicate that leaves it out fails).
SPLIT_ESTIMATORS = ("richardson", "extrapolate", "crossfit", "crossfit_inverse")
#: Fewest shards of `ntps_estimate`'s jackknife interval: 3 for most estimators, 4 for `SPLIT_ESTIMATORS`.
MIN_SHARDS = 3
SPLIT_MIN_SHARDS = 4
#: Texts per retained dimension of the "pca" estimator: p = N // PCA_TEXTS_PER_DIM.
PCA_TEXTS_PER_DIM = 4
#: The estimators `ntps_estimate` also computes on a torch device (``device=``); the others run in numpy only.
DEVICE_ESTIMATORS = ("richardson", "plugin")
#: Random splits into halves averaged by the "crossfit" estimator (each costs one SVD of r x C).
CROSSFIT_SPLITS = 8
#: Random splits into halves averaged by "richardson" (one: three factorisations per layer).
RICHARDSON_SPLITS = 1
#: The estimator `ntps_estimate` uses unless told otherwise, chosen on the estimator map
#: (docs/estimator.md): the only candidate whose intervals cover where `NOISE_MAX` accepts.
DEFAULT_ESTIMATOR = "richardson"
#: The estimators whose reliability flag was checked on simulated populations with known NTPS: their rows that
#: `ntps_estimate` calls reliable covered the population value at about their level (docs/estimator.md). Only their
#: rows can be reliable: the plug-in's rows that meet the same conditions under-cover (its bias stays), and the other
#: estimators' were not checked (`FlagNotCalibratedWarning`; ``flag_any_estimator`` marks them anyway).
CALIBRATED_ESTIMATORS = ("richardson",)
#: How the plug-in's rows that met the flag's conditions covered at nominal 0.90, where the truth is known
#: (`benchmarks/plugin_flag_check.py`: the estimator map's populations at N/d 8 and 32, seed 60; with the stationary
#: condition, `benchmarks/results/plugin_flag/d16_stationary.txt` and `d64_stationary.txt`: at a truth of 0.998 the
#: plug-in's own bias keeps its cos^2 away from the bound, so the condition does not take its rows there).
PLUGIN_FLAGGED_COVERAGE = "0.667 of 291 rows at d = 16 and 0.595 of 306 at d = 64 (0.03 and 0.00 at a truth of 0.998)"
#: The interval `ntps_estimate` gives "richardson" unless told otherwise (``interval=None``): the
#: jackknife-t interval without the jackknife's excess on the quadratic part of the error, whose flag
#: has no bound condition (`ntps_nb.core.quadratic`; chosen on the estimator map,
#: docs/estimator.md, "The quadratic interval as the default"); a study's ``estimate_interval`` too unless
#: set (the committed studies set "jackknife", their units' interval).
DEFAULT_INTERVAL = "quadratic"
#: A row is reliable when the jackknife squared sine per direction (`subspace_noise`) of U and of V
#: is at most this. Calibrated on the d = 16 and 64 maps, checked on d = 256 and 576
#: (docs/estimator.md): accepted rows' 90% intervals covered 0.89 / 0.93 / 0.93 / 1.00 (pooled).
NOISE_MAX = 0.05
#: ... and when the eigengap at k of the perception problem (after direction k_U) and of the
#: next-token problem (after direction k) are each at least this many delete-one-shard jackknife
#: standard errors (`eigengap_ratios`). Where the population eigenvalues around k are nearly tied,
#: which direction comes first is not a property the sample can resolve: the subspaces can then
#: agree across shards (small `subspace_noise`) and still be the wrong tie-break. Chosen on the
#: d = 64 map and the d = 64 / 256 held-out runs, checked on fresh d = 16, 64, 256 and 576 draws
#: (docs/estimator.md, "The eigengap condition": accepted rows off by > 0.2, 39 of 2,452 -> 2 of 1,444).
GAP_MIN = 5.0
#: ... and when its estimate lies more than this many jackknife standard errors inside [0, 1]
#: (`flag_at_bound`). Where the population NTPS is 0 or 1 the estimate's error is quadratic in the
#: noise and the jackknife variance about 2 (S - 1) / (S - 2) times too large: accepted rows there
#: covered 0.985-1.00 at nominal 0.90, above the 0.85-0.95 a reliable row promises. Chosen on the
#: v2 map, held-out and fresh draws (seeds 6-19), checked on populations run after the choice
#: (seeds 20-22, d = 16 / 64 / 256): no cell outside the band there (5 above 0.95 without it), the
#: rows kept at a truth of 0 or 1 cover 0.92, the others 0.90; 3-4% of the rows away from the bounds
#: are lost (docs/estimator.md, "Rows at the bounds of [0, 1]").
BOUND_SE = 1.0
#: ... and when the data place NTPS away from its stationary points: some principal angle between U_k and
#: V_k has its cos^2 (extrapolated as the estimator extrapolates NTPS) at least this many delete-one-shard
#: jackknife standard errors from both 0 and 1 (`stationary_distance`). Where every angle is at 0 or 90 degrees
#: NTPS is stationary in every rotation of the two subspaces, its error is quadratic in the noise and the interval
#: is not calibrated: the flag's rows there covered 0.96-1.00 at nominal 0.90, significantly above the 0.85-0.95
#: a reliable row promises in 5 cells of session 59's fresh populations. Chosen on session 33's d = 16 frames (1.5
#: left a cell of rows that strayed from the stationary point, covering 5 of 11), checked on fresh d = 16, 64 and 256
#: populations: it takes 99.3% of the flag's rows at a stationary truth and 6% of the others (15% at d = 64, truths
#: near 0 at k = 1), whose cells cover as before (docs/estimator.md, "Rows at a stationary point are
#: unreliable").
STATIONARY_SE = 2.0
#: An estimate within this of 0 or 1 is at the bound whatever its standard error (an NTPS of exactly
#: 0 or 1, k beyond a subspace's rank, say, has a standard error of rounding size; so it stays at the
#: bound when read back from a table written to 7 significant digits).
BOUND_ATOL = 1e-6
#: Size of the smallest singular value of G or H below which its inverse is not taken, and of the mean
#: cosine below which "crossfit"'s ratio is not formed. Both are cosines of principal angles between two
#: halves' orthonormal bases (at most 1), so the test is absolute (one relative to the largest cosine passes
#: a G whose cosines are all of rounding size). Where the pooled texts are no more than the rank of Sxx every
#: cosine is zero in exact arithmetic and the split-half estimators are NaN before any ratio
#: (`_undefined_split`; the ratios came out at 1e11-1e16).
SPLIT_RCOND = 1e-8
#: `estimate_by_n`'s ``inside_first`` counts an estimate within this of its smallest-N interval as inside. At
#: k = r_V = r_U every estimate and bound is 1 (NTPS's value there) up to float64 rounding, a few 1e-15, which
#: differs between the host's solve and a device's: the comparison was decided by rounding (the torch backend
#: put one of three such rows outside where numpy put it inside). Far below any drift an interval resolves.
INSIDE_ATOL = 1e-12


@dataclass(frozen=True)
class Estimate:
    """NTPS_theory at several k by one estimator, with diagnostics.

    Attributes
    ----------
    estimator : the estimator's name.
    ks : (K,) numbers of next-token directions.
    estimate : (K,) the estimates (NaN where undefined at that k).
    reliability : (K,) the estimator's own reliability statistic (for "crossfit_inverse" the
        smallest split-half agreement min(sigma_min(G), sigma_min(H)); "adjusted", "adjusted_v",
        "debiased", "extrapolate" and "crossfit" report theirs; NaN for the others).
    n_texts, n_shards : what the estimate is over.
    """

    estimator: str
    ks: np.ndarray
    estimate: np.ndarray
    reliability: np.ndarray
    n_texts: int
    n_shards: int


def _as_shards(data: Moments | Sequence[Moments]) -> list[Moments]:
    if isinstance(data, Moments):
        return [data]
    shards = list(data)
    if not shards:
        raise ValueError("no shard moments given")
    for i, s in enumerate(shards):
        if not isinstance(s, Moments):
            raise ValueError(f"shard {i} must be Moments, got {type(s).__name__}")
        if s.is_centred:
            raise ValueError(f"shard {i} is centred; estimators take uncentred shard moments")
    return shards


def _check_ks(ks) -> np.ndarray:
    ks = np.atleast_1d(np.asarray(ks))
    if ks.size == 0:
        raise ValueError("ks is empty: give at least one k (a positive integer)")
    if ks.dtype.kind not in "iu" or ks.ndim != 1 or np.any(ks < 1):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks.astype(np.int64)


def split_halves(n_shards: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the two halves of a seeded random split of ``n_shards`` shards.

    Parameters
    ----------
    n_shards : number of shards S >= 2.
    seed : seed of the permutation.

    Returns
    -------
    (a, b) : two sorted integer arrays of lengths S // 2 and S - S // 2, together a partition of
        0..S-1.
    """
    if n_shards < 2:
        raise ValueError(f"a split into halves needs at least 2 shards, got {n_shards}")
    order = np.random.default_rng([int(seed), 7]).permutation(n_shards)
    return np.sort(order[: n_shards // 2]), np.sort(order[n_shards // 2:])


# --------------------------------------------------------------------------------------------
# Cross-fitting


@dataclass(frozen=True, eq=False)
class _Whitening:
    """The retained range of the pooled Sxx: x -> S_r^{-1/2} Q_r^T x (whitened coordinates)."""

    Q: np.ndarray
    s: np.ndarray

    @classmethod
    def of(cls, Sxx: np.ndarray, rtol: float) -> "_Whitening":
        s, Q = symmetric_eigh(Sxx)
        keep = s > rtol * max(float(s.max()), 0.0)
        if not keep.any():
            raise ValueError("Sxx has no eigenvalue above the tolerance")
        return cls(Q=Q[:, keep], s=s[keep])

    def perception(self, Sxy: np.ndarray, m: int) -> np.ndarray:
        """(r, m) orthonormal top-m left singular vectors of S^{-1/2} Q^T Sxy: U in whitened coordinates."""
        G = (self.Q.T @ Sxy) / np.sqrt(self.s)[:, None]
        left, sing, _ = np.linalg.svd(G, full_matrices=False)  # descending
        return left[:, :m]

    def next_token(self, moments: Moments, rtol: float) -> tuple[np.ndarray, np.ndarray]:
        """Nested orthonormal basis of Sxx^{1/2} V (whitened coordinates) and its counts per k."""
        V = next_token_subspace(moments, order="descending", rtol=rtol)
        coords = np.sqrt(self.s)[:, None] * (self.Q.T @ V.vectors)
        return nested_orthonormal_basis(coords, rtol=SPAN_RTOL)


def _m_of(moments: Moments, white: "_Whitening") -> int:
    """rank(Sxy Sxy^T) on the range of Sxx, as the plug-in counts it (eigenvalues of the reduced
    matrix above A_RANK_RTOL times the largest), from the singular values of S^-1/2 Q^T Sxy."""
    G = (white.Q.T @ moments.Sxy) / np.sqrt(white.s)[:, None]
    lam = np.linalg.svd(G, compute_uv=False) ** 2
    m = int(np.count_nonzero(lam > A_RANK_RTOL * max(float(lam.max(initial=0.0)), np.finfo(np.float64).tiny)))
    if m == 0:
        raise ValueError("Sxy is zero: the pooled states carry no label signal, U is undefined")
    return m


def _safe_solve_trace(G: np.ndarray, X: np.ndarray) -> tuple[float, float]:
    """(tr(G^{-1} X), sigma_min(G)); NaN trace when G is numerically singular (its singular values are
    cosines, at most 1: `SPLIT_RCOND` is absolute)."""
    sing = np.linalg.svd(G, compute_uv=False)
    smin = float(sing.min()) if sing.size else float("nan")
    if sing.size == 0 or smin <= SPLIT_RCOND * max(float(sing.max()), 1.0):
        return float("nan"), smin
    return float(np.trace(np.linalg.solve(G, X))), smin


def _half_members(n_shards: int, seed: int, drop: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shards of each half of the seeded split, less shard ``drop``."""
    a_idx, b_idx = split_halves(n_shards, seed)
    # a jackknife replicate leaves one shard out of its half: the split itself stays fixed
    a_idx, b_idx = tuple(int(i) for i in a_idx if i != drop), tuple(int(i) for i in b_idx if i != drop)
    if not a_idx or not b_idx:
        raise ValueError("a half of the split holds no shard")
    return a_idx, b_idx


def _halves(shards: list[Moments], seed: int, drop: int | None) -> tuple[Moments, Moments]:
    a_idx, b_idx = _half_members(len(shards), seed, drop)
    return Moments.combine([shards[i] for i in a_idx]), Moments.combine([shards[i] for i in b_idx])


def _pooled(shards: list[Moments], drop: int | None) -> Moments:
    kept = [s for i, s in enumerate(shards) if i != drop]
    return Moments.combine(kept) if len(kept) > 1 else kept[0]


def _undefined_split(ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The split-half estimators where the pooled texts are no more than the rank of Sxx: whitened by the
    pooled Sxx the texts are orthogonal, so are the two halves' spans, and every cosine between the halves'
    U is zero (rounding in floating point, which made the ratios 1e11-1e16): NaN, reliability 0."""
    return np.full(ks.shape, np.nan), np.zeros(ks.shape)


def _crossfit(shards: list[Moments], ks: np.ndarray, *, n_splits: int, seed: int, rtol: float,
              drop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split-half ratio estimator: U from each half, V from the pooled moments.

    For each split, Ub is rotated onto Ua (orthogonal Procrustes: the rotation Omega that
    maximises tr(Ua^T Ub Omega)), and NTPS = sum over splits of tr(Ua^T P_k Ub Omega) / sum of
    tr(Ua^T Ub Omega). Both traces carry the same attenuation, which cancels in the ratio; the
    denominator is a sum of cosines of principal angles, so nothing is inverted.
    """
    full = _pooled(shards, drop)
    check_labels(full)
    white = _Whitening.of(full.Sxx, rtol)
    if interpolates(full.n_texts, white.s.size, full.is_centred):
        return _undefined_split(ks)
    m = _m_of(full, white)
    Vf, counts = white.next_token(full, rtol)
    ks_ok = ks <= counts.size
    num = np.zeros(ks.shape)
    den = np.zeros(ks.shape)
    for split in range(n_splits):
        half_a, half_b = _halves(shards, seed + split, drop)
        Ua, Ub = white.perception(half_a.Sxy, m), white.perception(half_b.Sxy, m)
        Za, Zb = Vf.T @ Ua, Vf.T @ Ub
        for i, k in enumerate(ks):
            if not ks_ok[i]:
                continue
            kU = min(int(k), m)
            W, sing, Zt = np.linalg.svd(Ua[:, :kU].T @ Ub[:, :kU])
            omega = Zt.T @ W.T  # tr(Ua^T Ub omega) = sum(sing)
            b = counts[k - 1]
            num[i] += np.trace(Za[:b, :kU].T @ Zb[:b, :kU] @ omega)
            den[i] += sing.sum()
    # split-half reliability: the mean cosine of the principal angles between the halves' U_k
    cosine = np.where(ks_ok, den / (n_splits * np.minimum(ks, m)), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):  # halves' U orthogonal (N <= rank): no ratio
        values = np.where(ks_ok & (cosine > SPLIT_RCOND), num / den, np.nan)
    return values, cosine


def _crossfit_inverse(shards: list[Moments], ks: np.ndarray, *, seed: int, rtol: float,
                      drop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First-order attenuation correction with U and V from each half:
    tr(G^-1 Ua^T Vb H^-1 Va^T Ub) / k_U, G = Ua^T Ub, H = Va^T Vb."""
    half_a, half_b = _halves(shards, seed, drop)
    full = half_a + half_b
    check_labels(full)
    white = _Whitening.of(full.Sxx, rtol)
    if interpolates(full.n_texts, white.s.size, full.is_centred):
        return _undefined_split(ks)
    m = _m_of(full, white)
    Ua, Ub = white.perception(half_a.Sxy, m), white.perception(half_b.Sxy, m)
    Va, ca = white.next_token(half_a, rtol)
    Vb, cb = white.next_token(half_b, rtol)
    values = np.full(ks.shape, np.nan)
    reliability = np.full(ks.shape, np.nan)
    for i, k in enumerate(ks):
        kU = min(int(k), m)
        ua, ub = Ua[:, :kU], Ub[:, :kU]
        if k > ca.size or k > cb.size:
            continue
        va, vb = Va[:, : ca[k - 1]], Vb[:, : cb[k - 1]]
        if va.shape[1] != vb.shape[1]:
            continue  # the halves' spans differ in dimension: no cross-fit at this k
        H = va.T @ vb
        h_sing = np.linalg.svd(H, compute_uv=False)
        h_min = float(h_sing.min())
        if h_min <= SPLIT_RCOND * max(float(h_sing.max()), 1.0):
            reliability[i] = h_min
            continue
        # oblique projector estimate Vb H^{-1} Va^T between the halves
        cross = (ua.T @ vb) @ np.linalg.solve(H, va.T @ ub)
        value, g_min = _safe_solve_trace(ua.T @ ub, cross)
        reliability[i] = min(g_min, h_min)
        values[i] = value / kU
    return values, reliability


def _adjusted(full: Moments, ks: np.ndarray, rtol: float,
              halves: tuple[Moments, Moments] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NTPS from the two in-sample regression Gram matrices, each adjusted like an adjusted R^2.

    In the Sxx-whitened coordinates of the sample, G^T G = Sxy^T Sxx^-1 Sxy is the in-sample fit
    (Y^T H Y / N, H the hat matrix of the N x r design) of the least-squares probe of the one-hot
    labels on all r directions, and A_k = G^T P_k G that of the probe on the b_k next-token
    directions. Writing Y = X B + E with E the population residual, E[Y^T H Y / N] =
    B^T Sigma B + (r / N) E[e e^T] = K + (r / N) (Syy - K), so K = (G^T G - (r/N) Syy) / (1 - r/N),
    and the same with b_k for A_k. NTPS(k) = (1/k_U) sum_i w_i^T K_V w_i / lambda_i over the top k_U
    eigenpairs of the adjusted K. Label noise and the whitening are corrected together, from N,
    r and Syy alone (no shards); the next-token subspace is taken as estimated.

    With ``halves`` ("adjusted_v"), the attenuation of the estimated next-token subspace is
    corrected too: if E[P_hat] = (1 - e) P + e' (I - P) with tr P_hat = b (so e' = e b / (r - b)),
    then E[NTPS_hat] = (1 - e) NTPS + e' (1 - NTPS) and NTPS = (NTPS_hat - e') / (1 - e - e').
    The attenuation e at N comes from the agreement of the halves' subspaces,
    a = tr(P_A P_B) / b ~ (1 - e_half)^2 with e_half = 2 e (noise variance doubles at N / 2).
    """
    check_labels(full)
    white = _Whitening.of(full.Sxx, rtol)
    Vf, counts = white.next_token(full, rtol)
    m = _m_of(full, white)
    N, r = full.n_texts, white.s.size
    values = np.full(ks.shape, np.nan)
    reliability = np.full(ks.shape, np.nan)
    if N <= r:
        return values, reliability
    G = (white.Q.T @ full.Sxy) / np.sqrt(white.s)[:, None]
    Syy = full.Syy
    K = (G.T @ G - (r / N) * Syy) / (1 - r / N)
    lam, W = np.linalg.eigh((K + K.T) / 2)
    order = np.argsort(lam)[::-1]
    lam, W = lam[order], W[:, order]
    Z = Vf.T @ G
    A = np.cumsum(np.einsum("qc,qd->qcd", Z, Z), axis=0)
    if halves is not None:
        (Va, ca), (Vb, cb) = (white.next_token(h, rtol) for h in halves)
        overlap = np.cumsum((Va.T @ Vb) ** 2, axis=1)  # overlap[i, j]: ||P_B a_i||^2 over b's first j+1
    for i, k in enumerate(ks):
        if k > counts.size or counts[k - 1] == 0:
            continue
        kU = min(int(k), m)
        b = int(counts[k - 1])
        if lam[kU - 1] <= 0 or b >= N:
            reliability[i] = 0.0
            continue
        KV = (A[b - 1] - (b / N) * Syy) / (1 - b / N)
        Wk = W[:, :kU]
        value = float(np.mean(np.einsum("ci,cd,di->i", Wk, KV, Wk) / lam[:kU]))
        if halves is not None:
            if k > ca.size or k > cb.size or b >= r:
                continue
            agreement = float(overlap[: ca[k - 1], cb[k - 1] - 1].sum() / b)
            e = min(max((1 - np.sqrt(max(agreement, 0.0))) / 2, 0.0), 0.5)
            e_out = e * b / (r - b)
            value = (value - e_out) / (1 - e - e_out)
        values[i] = value
        # share of the adjusted signal that is signal: small when the labels are barely detectable
        reliability[i] = float(lam[kU - 1] / (lam[kU - 1] + (r / N) * np.trace(Syy) / Syy.shape[0]))
    return values, reliability


def _debiased(shards: list[Moments], ks: np.ndarray, *, rtol: float, drop: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Plug-in with the label-noise terms of its Gram matrices removed (shard-variance debiasing).

    With G = Sxx^{-1/2} Sxy (whitened class centroids, r x C) and P_k the projector onto the
    whitened next-token span, NTPS(k) = (1/k_U) sum_i w_i^T G^T P_k G w_i / lambda_i over the top
    k_U eigenpairs (lambda_i, w_i) of G^T G. The sample G = G + E has E[G^T X G] = G^T X G +
    E[E^T X E] for any fixed X; E[E^T X E] is the variance of the text-weighted mean, estimated
    from the spread of the shards' G_s around G: D(X) = S / (S - 1) sum_s w_s^2 (G_s - G)^T X (G_s - G).
    Both Gram matrices are debiased (X = I and X = P_k) before the eigendecomposition and the
    ratio. Noise of V and of the whitening is not corrected. Reliability: the smallest share of
    signal among the kept eigenvalues, min_i lambda_i(debiased) / lambda_i(raw).

    Undefined (NaN) with no more texts than retained directions (N <= r, as for "adjusted"): the
    labels are then fitted exactly, the shards' spread removes all of G^T G and the debiased
    eigenvalues are rounding; and at any k whose k_U-th debiased eigenvalue is at most `A_RANK_RTOL`
    times the raw Gram's largest (no signal left, reliability 0): dividing by rounding gave values
    orders of magnitude outside [0, 1].
    """
    kept = [s for i, s in enumerate(shards) if i != drop]
    full = Moments.combine(kept)
    check_labels(full)
    white = _Whitening.of(full.Sxx, rtol)
    m = _m_of(full, white)
    if full.n_texts <= white.s.size:
        return np.full(ks.shape, np.nan), np.full(ks.shape, np.nan)
    Vf, counts = white.next_token(full, rtol)
    scale = 1.0 / np.sqrt(white.s)[:, None]
    G = scale * (white.Q.T @ full.Sxy)
    n = np.array([s.n_texts for s in kept], dtype=np.float64)
    w = n / n.sum()
    S = len(kept)
    dev = np.stack([wi * (scale * (white.Q.T @ s.Sxy) - G) for wi, s in zip(w, kept)])  # (S, r, C)
    factor = S / (S - 1)
    D = factor * np.einsum("src,srd->cd", dev, dev)
    raw_lam, _ = np.linalg.eigh(G.T @ G)
    lam, W = np.linalg.eigh(G.T @ G - D)
    order = np.argsort(lam)[::-1]
    lam, W = lam[order], W[:, order]
    raw_lam = np.sort(raw_lam)[::-1]
    Z = Vf.T @ G  # (q, C)
    Zdev = np.einsum("qr,src->sqc", Vf, dev)  # (S, q, C)
    A = np.cumsum(np.einsum("qc,qd->qcd", Z, Z), axis=0)
    DA = factor * np.cumsum(np.einsum("sqc,sqd->qcd", Zdev, Zdev), axis=0)
    values = np.full(ks.shape, np.nan)
    reliability = np.full(ks.shape, np.nan)
    for i, k in enumerate(ks):
        if k > counts.size or counts[k - 1] == 0:
            continue
        kU = min(int(k), m)
        if lam[kU - 1] <= A_RANK_RTOL * raw_lam[0]:
            reliability[i] = 0.0
            continue
        b = counts[k - 1] - 1
        Wk = W[:, :kU]
        projected = np.einsum("ci,cd,di->i", Wk, A[b] - DA[b], Wk) / lam[:kU]
        values[i] = projected.mean()
        reliability[i] = float(np.min(lam[:kU] / raw_lam[:kU]))
    return values, reliability


def _plugin_on_halves(shards: list[Moments], ks: np.ndarray, *, n_splits: int, seed: int, rtol: float,
                      drop: int | None, memo: dict | None = None) -> tuple[list[np.ndarray], list[int]]:
    """The plug-in at ks on both halves of ``n_splits`` seeded splits (NaN for a half with a single
    class), and the halves' text counts.

    ``memo``, where given, keeps each half's plug-in by its shards for the next call on the same shards,
    ks and rtol: a jackknife replicate leaves one shard out of one half, and the other half is the one the
    estimate (or an earlier replicate) solved already, so each replicate costs one half's factorisation,
    not two."""
    values, sizes = [], []
    for split in range(n_splits):
        for members in _half_members(len(shards), seed + split, drop):
            if memo is not None and members in memo:
                value = memo[members].value
            else:
                geometry = _half_geometry(shards, members, rtol)
                value = np.full(ks.shape, np.nan) if geometry is None else theory_values(geometry, ks)
                if memo is not None:
                    memo[members] = _Half(value, geometry)
            values.append(value)
            sizes.append(sum(shards[i].n_texts for i in members))
    return values, sizes


def _half_geometry(shards: list[Moments], members: tuple[int, ...], rtol: float) -> TheoryGeometry | None:
    """The theory geometry of the shards ``members`` pooled (a half of a split), None where it is undefined (a half
    with a single class)."""
    try:
        return theory_geometry(Moments.combine([shards[i] for i in members]), rtol=rtol)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Half:
    """One half's plug-in at the call's ks and its geometry (None where undefined), kept in a memo."""

    value: np.ndarray
    geometry: TheoryGeometry | None


def _extrapolate(shards: list[Moments], ks: np.ndarray, *, n_splits: int, seed: int, rtol: float,
                 drop: int | None = None, pooled: TheoryGeometry | None = None,
                 memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rational extrapolation to N = infinity from the plug-in at N and at N / 2.

    Model: E[plugin at N] = chance + (NTPS - chance) / (1 + b / N), chance = k / r (what random
    subspaces give). With x = plugin(N) - chance and y = mean plugin(N / 2) - chance (the halves of
    ``n_splits`` random splits), b / N = (x - y) / (2 y - x) and
    NTPS = chance + x y / (2 y - x). The estimated attenuation at N, 1 / (1 + b / N) =
    (2 y - x) / y, is returned as the reliability: near 1 the plug-in is barely attenuated and
    the correction small; near 0 (the halves sit at chance) nothing can be recovered. Where k reaches
    r_U (V_k the whole whitened space) every plug-in is 1 = chance and the model reads 0 / 0: the value
    is 1 there and the attenuation 1 (rounding had decided between 1 and NaN). ``pooled`` and ``memo``
    as for `_richardson`.
    """
    geometry = pooled if pooled is not None else theory_geometry(_pooled(shards, drop), rtol=rtol)
    x_full = theory_values(geometry, ks)
    halves, _ = _plugin_on_halves(shards, ks, n_splits=n_splits, seed=seed, rtol=rtol, drop=drop, memo=memo)
    chance = np.minimum(ks, geometry.r_U) / geometry.r_U
    x = x_full - chance
    y = np.mean(halves, axis=0) - chance
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = 2 * y - x
        attenuation = np.where(y != 0, denominator / y, np.nan)
        values = np.where(attenuation > 0, chance + x * y / denominator, np.nan)
    whole = chance >= 1  # k = r_V = r_U: NTPS is 1 by definition, at every N
    return np.where(whole, 1.0, values), np.where(whole, 1.0, attenuation)


def _richardson(shards: list[Moments], ks: np.ndarray, *, n_splits: int, seed: int, rtol: float,
                drop: int | None = None, pooled: TheoryGeometry | None = None,
                memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Richardson extrapolation of the plug-in to N = infinity from N and the two halves.

    The plug-in's bias is a / N + O(1 / N^2) where the expansion of the eigenvectors in the
    sampling noise holds (the regime `subspace_noise` measures). With h the mean of 1 / n over the
    halves' text counts (2 / N for equal halves), w * plugin(N) + (1 - w) * mean(plugin(halves)) with
    w = h / (h - 1 / N) has no 1 / N term (w = 2 for equal halves: 2 plugin(N) - mean of halves).
    This is the half-sample (delete-N/2) jackknife (Quenouille's bias correction with two groups);
    one split costs three factorisations per layer. The value is not clipped to [0, 1].
    ``pooled``: the pooled shards' (less ``drop``) geometry where the caller has it already; ``memo``: the
    halves' plug-ins kept across calls (`_plugin_on_halves`).
    """
    if pooled is None:
        pooled = theory_geometry(_pooled(shards, drop), rtol=rtol)
    halves, sizes = _plugin_on_halves(shards, ks, n_splits=n_splits, seed=seed, rtol=rtol, drop=drop, memo=memo)
    n_texts = sum(s.n_texts for i, s in enumerate(shards) if i != drop)  # the pooled moments' count
    return _richardson_combination(theory_values(pooled, ks), halves, sizes, n_texts), np.full(ks.shape, np.nan)


def _richardson_combination(x_full: np.ndarray, halves: Sequence[np.ndarray], sizes: Sequence[int],
                            n_texts: int) -> np.ndarray:
    """w * plugin(N) + (1 - w) * mean(plugin(halves)), w = h / (h - 1 / N), h the mean 1 / n of the halves."""
    h = float(np.mean(1.0 / np.asarray(sizes, dtype=np.float64)))
    w = h / (h - 1.0 / n_texts)
    return w * x_full + (1 - w) * np.mean(halves, axis=0)


# --------------------------------------------------------------------------------------------
# Other candidates


def _shrunk(shards: list[Moments]) -> Moments:
    """Pooled moments with Sxx and C0 shrunk toward (tr / d) I by a Ledoit-Wolf intensity.

    The intensity is (estimated sampling variance of the moment, summed over entries) /
    ||moment - target||_F^2, clipped to [0, 1]; the variance comes from the spread of the shard
    moments around the pooled one (each shard weighted by its text count).
    """
    full = Moments.combine(shards)
    n = np.array([s.n_texts for s in shards], dtype=np.float64)
    w = n / n.sum()
    out = {}
    for name in ("Sxx", "C0"):
        pooled = getattr(full, name)
        # variance of a text-count-weighted mean: sum_s w_s^2 ||M_s - M||^2 * S / (S - 1)
        spread = sum(wi**2 * np.sum((getattr(s, name) - pooled) ** 2) for wi, s in zip(w, shards))
        variance = spread * len(shards) / (len(shards) - 1)
        d = pooled.shape[0]
        target = np.trace(pooled) / d * np.eye(d)
        distance = float(np.sum((pooled - target) ** 2))
        intensity = float(np.clip(variance / distance, 0.0, 1.0)) if distance > 0 else 1.0
        out[name] = (1 - intensity) * pooled + intensity * target
    return Moments(Sxx=out["Sxx"], Sxy=full.Sxy, Syy=full.Syy, C0=out["C0"], C1=full.C1,
                   n_texts=full.n_texts, n_tokens=full.n_tokens, x_mean=full.x_mean)


def _projected(full: Moments, p: int) -> Moments:
    """The moments of the states projected on the top-p principal directions of Sxx."""
    s, Q = symmetric_eigh(full.Sxx)
    P = Q[:, np.argsort(s)[::-1][:p]]
    return Moments(Sxx=P.T @ full.Sxx @ P, Sxy=P.T @ full.Sxy, Syy=full.Syy, C0=P.T @ full.C0 @ P,
                   C1=P.T @ full.C1 @ P, n_texts=full.n_texts, n_tokens=full.n_tokens)


def _solve(moments: Moments, rtol: float) -> tuple[Subspace, Subspace]:
    """The descending perception and next-token subspaces of ``moments`` (what `theory_geometry`,
    `subspace_noise` and the eigengaps all read: one solve serves the three)."""
    return (perception_subspace(moments, order="descending", rtol=rtol),
            next_token_subspace(moments, order="descending", rtol=rtol))


def _whitened_bases(moments: Moments, white: _Whitening, rtol: float,
                    solved: tuple[Subspace, Subspace] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """U (top m) and V (all r_V) of ``moments`` (``solved``: its `_solve`, where the caller has it),
    in the coordinates whitened by ``white`` (another sample's Sxx, so that subspaces estimated on
    different shards are compared in one metric), each orthonormalised in its own order (QR: the
    first k columns span the first k directions)."""
    U, V = solved if solved is not None else _solve(moments, rtol)
    to_white = np.sqrt(white.s)[:, None] * white.Q.T
    u = np.linalg.qr(to_white @ U.vectors[:, : U.rank_A])[0]
    v = np.linalg.qr(to_white @ V.vectors)[0]
    return u, v


def _nested_overlap(a: np.ndarray, b: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """||A_k^T B_k||_F^2 at each k (A_k, B_k the first k columns; k capped at the columns there are)."""
    n = min(a.shape[1], b.shape[1])
    if n == 0:
        return np.zeros(ks.shape)
    squared = (a[:, :n].T @ b[:, :n]) ** 2
    leading = np.cumsum(np.cumsum(squared, axis=0), axis=1).diagonal()  # sum over the leading k x k block
    return leading[np.minimum(ks, n) - 1]


def subspace_noise(moment_shards: Sequence[Moments], ks, *, rtol: float = RANGE_RTOL, device: Any = None,
                   batch_size: int | None = None) -> pd.DataFrame:
    """How much the estimated perception and next-token subspaces move with the sample, at each k.

    For each leave-one-shard-out replicate g, U_k and V_k are estimated on the other shards and
    compared with the full sample's in the full sample's whitened coordinates; the jackknife
    estimate of the expected squared distance of the full-sample subspace from its mean is

        noise_X(k) = (S - 1) / S * sum_g ||sin Theta(X_k^(-g), X_k)||_F^2 ,

    a sum of squared sines over the k_X directions (k_U = min(k, m) for U, k for V), between 0
    and k_X. The plug-in NTPS is a trace of a product of the two projectors, tr(P_V P_U) / k_U;
    its bias comes from the second-order terms of their noise, which are bounded by the squared
    sines, so ``bias_bound = (noise_U + noise_V) / k_U`` bounds its order of magnitude (the noise of
    the whitening itself is not in it). By the Efron-Stein inequality the jackknife over S
    independent shards overestimates a variance on average, so the bound errs on the safe side.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (disjoint texts), at least 3.
    ks : (K,) positive integers, numbers of next-token directions.
    rtol : relative range tolerance of Sxx and C0.
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...):
        the replicates' factorisations batched on that device
        (`ntps_nb.core.backends.torch.subspace_noise_torch`, the same numbers).
    batch_size : replicates per batched solve on a torch device (default: from free memory);
        ignored by the numpy code.

    Returns
    -------
    DataFrame, one row per k: k, k_U, noise_U, noise_V, bias_bound (NaN where k exceeds the
    rank of V in some replicate).
    """
    backend = analysis_backend(device)
    if backend is not None:
        return backend.subspace_noise_torch(moment_shards, ks, rtol=rtol, device=device, batch_size=batch_size)
    shards = _as_shards(moment_shards)
    if len(shards) < 3:
        raise ValueError(f"subspace noise needs at least 3 shards, got {len(shards)}")
    return _noise_of_solves(shards, _check_ks(ks), rtol)


def _noise_of_solves(shards: list[Moments], ks: np.ndarray, rtol: float,
                     solves: "_Solves | None" = None) -> pd.DataFrame:
    """`subspace_noise` (numpy) of at least 3 shards, from the caller's `_Solves` of them where
    given (else solved here); a replicate whose solve failed raises its error, as solving it here would."""
    S = len(shards)
    full = Moments.combine(shards) if solves is None else solves.pooled
    white = _Whitening.of(full.Sxx, rtol)
    u, v = _whitened_bases(full, white, rtol, None if solves is None else solves.full)

    def replicates():
        for g in range(S):
            if solves is None:
                ug, vg = _whitened_bases(_pooled(shards, g), white, rtol)
            elif isinstance(solves.replicates[g], Exception):
                raise solves.replicates[g]
            else:
                ug, vg = _whitened_bases(solves.pools[g], white, rtol, solves.replicates[g])
            yield (_nested_overlap(ug, u, np.minimum(ks, u.shape[1])), _nested_overlap(vg, v, ks),
                   ug.shape[1], vg.shape[1])

    return _noise_frame(ks, u.shape[1], v.shape[1], S, replicates())


def _noise_frame(ks: np.ndarray, m: int, v_columns: int, n_shards: int, replicates) -> pd.DataFrame:
    """`subspace_noise`'s frame from the full sample's m and V columns and, for each of the
    ``n_shards`` leave-one-shard-out replicates in order, (overlap of U at k_U, overlap of V at k,
    the replicate's U columns, its V columns), the overlaps as `_nested_overlap` gives them."""
    k_u = np.minimum(ks, m)
    noise_u = np.zeros(ks.shape)
    noise_v = np.zeros(ks.shape)
    defined = ks <= v_columns
    for overlap_u, overlap_v, u_columns, vg_columns in replicates:
        noise_u += k_u - overlap_u
        noise_v += np.minimum(ks, v_columns) - overlap_v
        defined &= ks <= vg_columns
        if u_columns < m:  # a replicate lost a label direction: U at k >= its m is not comparable
            defined &= k_u <= u_columns
    S = n_shards
    noise_u *= (S - 1) / S
    noise_v *= (S - 1) / S
    noise_u[~defined] = np.nan
    noise_v[~defined] = np.nan
    return pd.DataFrame({"k": ks, "k_U": k_u, "noise_U": noise_u, "noise_V": noise_v,
                         "bias_bound": (noise_u + noise_v) / k_u})


def stationary_distance(point: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """How far the data place NTPS from its stationary points, at each k: the largest distance of a principal
    angle's cos^2 from 0 or 1, in its delete-one-shard jackknife standard errors.

    NTPS_theory(k) is the mean of the cos^2 of the principal angles between U_k and V_k; it is stationary in
    every rotation of the two subspaces exactly where each angle is 0 or 90 degrees (NTPS at 0 or 1, or inside
    (0, 1) with some angles at each). There its error is quadratic in the noise and the interval is not
    calibrated, so the flag asks for a distance of at least `STATIONARY_SE` (``ntps_estimate``'s
    ``stationary_flag``). An angle within `BOUND_ATOL` of 0 or 1 is at distance 0 whatever its standard error.

    Parameters
    ----------
    point : (K, A) each angle's cos^2 as the estimator combines it on all shards (richardson: extrapolated from
        the pooled shards and the two halves, as NTPS), descending, NaN past the angles there are.
    replicates : (S, K, A) the same with shard i left out (row i), NaN where a replicate failed.

    Returns
    -------
    (K,) the distance (negative where an extrapolated cos^2 lies past 0 or 1); NaN where an angle's standard
    error is undefined (a failed replicate), which the flag reads as not reliable.
    """
    point = np.asarray(point, dtype=float)
    return _distance_of(point, _jackknife(np.asarray(replicates, dtype=float))[1])


def _bound_distances(point: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each angle's cos^2 distance from 0 and from 1 in its standard errors ``se``: 0 within `BOUND_ATOL` of that
    bound whatever its standard error, negative past it, NaN where ``se`` is undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(np.abs(point) <= BOUND_ATOL, 0.0, point / se),
                np.where(np.abs(1.0 - point) <= BOUND_ATOL, 0.0, (1.0 - point) / se))


def _distance_of(point: np.ndarray, se: np.ndarray) -> np.ndarray:
    """`stationary_distance` from the angles' cos^2 and their jackknife standard errors."""
    from_zero, from_one = _bound_distances(point, se)
    z = np.where(np.isnan(point), 0.0, np.fmin(from_zero, from_one))
    return np.max(z, axis=1) if z.shape[1] else np.zeros(z.shape[0])


def stationary_reach_se(level: float, stationary_se: float, n_shards: int) -> float:
    """How many jackknife standard errors from 0 or 1 a principal angle's cos^2 must lie for the stationary widening
    to treat it as away from that bound: the one-sided test of "this angle is at the bound" at size 1 - ``level``,
    conditioned on the flag's stationary condition having passed.

    The stationary condition keeps a row where some angle lies at least ``stationary_se`` standard errors from both
    bounds. Where the population's angles are at a bound (NTPS at 0 or 1, or stationary inside), the rows it keeps
    are the draws whose angles the noise carried furthest from it, and their interval misses the truth
    (docs/estimator.md, "Rows near a bound: the stationary widening"). With the distance t-distributed on S - 1
    degrees of freedom under the bound, a kept row's distance exceeds ``c`` with probability
    P(t > c) / P(t > ``stationary_se``); this returns the ``c`` at which that is 1 - ``level`` (3.42 at
    ``level`` 0.90, 2 standard errors and 10 shards). Near a bound the distance's tail is lighter than the t's
    (the error there is quadratic in the noise), so the test is conservative there.

    Parameters
    ----------
    level : the interval's coverage level, in (0, 1).
    stationary_se : the distance the flag's stationary condition asks for (`STATIONARY_SE`).
    n_shards : the number of shards S (jackknife units), at least 2.

    Returns
    -------
    The distance c, in jackknife standard errors (at least ``stationary_se``).
    """
    t = scipy.stats.t(n_shards - 1)
    return float(max(t.isf((1.0 - level) * t.sf(stationary_se)), stationary_se))


def stationary_reach(point: np.ndarray, replicates: np.ndarray, reach_se: float) -> tuple[np.ndarray, np.ndarray]:
    """How far NTPS moves, at each k, if every principal angle whose cos^2 lies within ``reach_se`` jackknife
    standard errors of 0 (of 1) were at 0 (at 1): the stationary widening's reach down and up.

    NTPS_theory(k) is the mean of the k_U angles' cos^2 (`stationary_distance`), so moving angle j to 1 adds
    (1 - cos^2_j) / k_U and moving it to 0 takes cos^2_j / k_U away. An angle already past its bound (an
    extrapolated cos^2 above 1 or below 0) adds nothing.

    Parameters
    ----------
    point, replicates : as in `stationary_distance`.
    reach_se : the distance within which an angle is moved (`stationary_reach_se`).

    Returns
    -------
    (down, up): two (K,) arrays, each at least 0; NaN where an angle's standard error is undefined (a failed
    replicate) or the row has no angle.
    """
    point = np.asarray(point, dtype=float)
    return _reach_of(point, _jackknife(np.asarray(replicates, dtype=float))[1], reach_se)


def _reach_of(point: np.ndarray, se: np.ndarray, reach_se: float) -> tuple[np.ndarray, np.ndarray]:
    """`stationary_reach` from the angles' cos^2 and their jackknife standard errors."""
    angles = ~np.isnan(point)
    k_u = angles.sum(axis=1)
    from_zero, from_one = _bound_distances(point, se)
    with np.errstate(invalid="ignore", divide="ignore"):
        down = np.sum(np.where(angles & (from_zero < reach_se), np.clip(point, 0.0, None), 0.0), axis=1) / k_u
        up = np.sum(np.where(angles & (from_one < reach_se), np.clip(1.0 - point, 0.0, None), 0.0), axis=1) / k_u
    undefined = (k_u == 0) | np.any(angles & np.isnan(se), axis=1)
    down[undefined], up[undefined] = np.nan, np.nan
    return down, up


def _stationary_columns(point: np.ndarray, replicates: np.ndarray, reach_se: float) -> dict[str, np.ndarray]:
    """The columns `ntps_estimate` reads the principal angles into, on either backend: stationary_distance
    (`stationary_distance`) and stationary_reach_down / stationary_reach_up (`stationary_reach`), which
    `_stationary_condition` turns into the values the stationary widening reaches."""
    point = np.asarray(point, dtype=float)
    se = _jackknife(np.asarray(replicates, dtype=float))[1]  # once for both
    down, up = _reach_of(point, se, reach_se)
    return {"stationary_distance": _distance_of(point, se), "stationary_reach_down": down, "stationary_reach_up": up}


def _angles_of(geometry: TheoryGeometry | str | None, ks: np.ndarray, width: int) -> np.ndarray:
    """(K, ``width``) `TheoryGeometry.principal_cos2` padded with NaN (``width`` at least its k_U: min(max ks, the
    number of classes) serves every sample of the shards); all NaN for an undefined geometry."""
    out = np.full((ks.size, width), np.nan)
    if isinstance(geometry, TheoryGeometry):
        cos2 = geometry.principal_cos2(ks)
        out[:, : cos2.shape[1]] = cos2
    return out


def _stationary_of_solves(shards: list[Moments], ks: np.ndarray, estimator: str, *, seed: int, rtol: float,
                          pooled: TheoryGeometry, left_out: Sequence[TheoryGeometry | None], memo: dict,
                          reach_se: float) -> dict[str, np.ndarray]:
    """`_stationary_columns` (numpy) from the geometries `ntps_estimate` solved: the pooled shards', each
    leave-one-shard-out pool's and, for "richardson", the halves' in ``memo`` (`_plugin_on_halves`; a half
    not there is solved here)."""
    width = min(int(ks.max()), shards[0].Sxy.shape[1])  # k_U <= m <= C

    def half_geometry(members: tuple[int, ...]) -> TheoryGeometry | None:
        return memo[members].geometry if members in memo else _half_geometry(shards, members, rtol)

    def combined(geometry: TheoryGeometry | None, drop: int | None) -> np.ndarray:
        x = _angles_of(geometry, ks, width)
        if estimator != "richardson":
            return x
        halves, sizes = [], []
        for split in range(RICHARDSON_SPLITS):
            try:
                members = _half_members(len(shards), seed + split, drop)
            except ValueError:  # a half without a shard: the replicate failed
                return np.full(x.shape, np.nan)
            for half in members:
                halves.append(_angles_of(half_geometry(half), ks, width))
                sizes.append(sum(shards[i].n_texts for i in half))
        n_texts = sum(s.n_texts for i, s in enumerate(shards) if i != drop)
        return _richardson_combination(x, halves, sizes, n_texts)

    return _stationary_columns(combined(pooled, None), np.array([combined(g, i) for i, g in enumerate(left_out)]),
                               reach_se)


#: The columns `_stationary_columns` adds to a row (NaN where they are not computed).
STATIONARY_COLUMNS = ("stationary_distance", "stationary_reach_down", "stationary_reach_up")


#: The estimators whose rows carry `stationary_distance` (their cos^2 combine as their NTPS does: "plugin" as is,
#: "richardson" extrapolated from the halves); the other estimators' rows have NaN and no stationary condition.
STATIONARY_ESTIMATORS = ("plugin", "richardson")


def _stationary_condition(frame: pd.DataFrame, estimator: str, flag: bool, stationary_se: float) -> pd.DataFrame:
    """`ntps_estimate`'s frame with the flag's stationary condition on the rows of `STATIONARY_ESTIMATORS`
    (``reliable`` also needs ``stationary_distance`` >= ``stationary_se``; NaN fails) and the stationary widening's
    reach as the values it reaches (stationary_lower / stationary_upper: the estimate less the reach down, plus the
    reach up), or without those columns where ``flag`` is off (the frame as before the condition existed)."""
    reach = frame[["stationary_reach_down", "stationary_reach_up"]].to_numpy(dtype=float)
    frame = frame.drop(columns=["stationary_reach_down", "stationary_reach_up"])
    if not flag:
        return frame.drop(columns="stationary_distance")
    estimate = frame["estimate"].to_numpy(dtype=float)
    frame = frame.assign(stationary_lower=estimate - reach[:, 0], stationary_upper=estimate + reach[:, 1])
    if estimator not in STATIONARY_ESTIMATORS:
        return frame
    with np.errstate(invalid="ignore"):
        away = frame["stationary_distance"].to_numpy(dtype=float) >= stationary_se
    return frame.assign(reliable=frame["reliable"].astype(bool).to_numpy() & away)


def stationary_widening(frame: pd.DataFrame) -> pd.DataFrame:
    """`ntps_estimate`'s frame with the interval of each reliable row joined with the values NTPS takes where the
    principal angles the data cannot separate from a bound are at it (``stationary_lower`` / ``stationary_upper``:
    `stationary_reach`; `ntps_estimate`'s ``stationary_widening``).

    The flag's stationary condition keeps a row where some angle lies at least `STATIONARY_SE` jackknife standard
    errors from 0 and 1. In a population whose angles are at a bound (at k = 2 of an LDS whose NTPS is 0.998, say)
    the rows it keeps are the few draws whose noise carried an angle furthest from it, and their interval, on the
    far side of the truth, covered 0.44-0.47 at nominal 0.90 (docs/estimator.md, "The whole map with the default as
    it stands"). An angle within `stationary_reach_se` standard errors of a bound is one a test of "it is at the
    bound", conditioned on the row having passed the condition, cannot reject at size 1 - level: the widened interval
    includes NTPS with every such angle at its bound. Rows the flag refuses keep their interval; the flag does not
    change (docs/estimator.md, "Rows near a bound: the stationary widening").

    Parameters
    ----------
    frame : `ntps_estimate`'s frame with its flag and the stationary condition's columns.

    Returns
    -------
    The frame with ``lower`` / ``upper`` widened on the reliable rows, the interval before any widening as
    ``lower_unwidened`` / ``upper_unwidened`` (kept as they are where the rotation widening set them) and
    ``stationary_widened`` (True where an end moved). A frame without stationary_lower (the stationary flag off, or
    an estimator without it) is returned as it is.
    """
    if "stationary_lower" not in frame.columns:
        return frame
    out = frame.copy()
    if "lower_unwidened" not in out.columns:
        out["lower_unwidened"], out["upper_unwidened"] = out["lower"], out["upper"]
    rows = out["reliable"].astype(bool).to_numpy()
    lower, upper = out["lower"].to_numpy(dtype=float), out["upper"].to_numpy(dtype=float)
    reach_lower = np.where(rows, out["stationary_lower"].to_numpy(dtype=float), np.nan)
    reach_upper = np.where(rows, out["stationary_upper"].to_numpy(dtype=float), np.nan)
    with np.errstate(invalid="ignore"):
        moved_lower, moved_upper = reach_lower < lower, reach_upper > upper
    out["lower"] = np.where(moved_lower, reach_lower, lower)
    out["upper"] = np.where(moved_upper, reach_upper, upper)
    out["stationary_widened"] = moved_lower | moved_upper
    return out


def _with_stationary_widening(frame: pd.DataFrame, widen: bool) -> pd.DataFrame:
    """`stationary_widening` of ``frame`` where ``widen`` (`ntps_estimate`'s option of that name), else the frame."""
    return stationary_widening(frame) if widen else frame


def _gaps_at(geometry: TheoryGeometry | None, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eigengaps at each k of one geometry: perception after direction k_U = min(k, m) (to 0
    after the last label direction), next-token after direction k (to 0 after the last retained
    one); NaN where the geometry is missing or did not keep the next-token eigenvalues."""
    if geometry is None or geometry.next_token_eigenvalues is None:
        return np.full(ks.shape, np.nan), np.full(ks.shape, np.nan)
    lam_u = np.append(np.asarray(geometry.eigenvalues, dtype=np.float64), 0.0)
    lam_v = np.append(np.asarray(geometry.next_token_eigenvalues, dtype=np.float64), 0.0)
    k_u = np.minimum(ks, lam_u.size - 1)
    k_v = np.minimum(ks, lam_v.size - 1)
    gap_v = np.where(ks <= lam_v.size - 1, lam_v[k_v - 1] - lam_v[k_v], np.nan)
    return lam_u[k_u - 1] - lam_u[k_u], gap_v


def _gap_frame(full: TheoryGeometry, replicates: Sequence[TheoryGeometry | None], ks: np.ndarray) -> pd.DataFrame:
    """`eigengap_ratios`'s frame from the full sample's geometry and the S leave-one-shard-out
    replicates' (None where a replicate is undefined: its k get NaN ratios)."""
    S = len(replicates)
    full_u, full_v = _gaps_at(full, ks)
    reps = [_gaps_at(g, ks) for g in replicates]
    out = {"k": ks, "gap_U": full_u, "gap_V": full_v}
    for name, full_gap, column in (("U", full_u, 0), ("V", full_v, 1)):
        values = np.array([r[column] for r in reps]).reshape(S, ks.size)
        se = np.sqrt((S - 1) / S * np.sum((values - values.mean(axis=0)) ** 2, axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"gap_ratio_{name}"] = full_gap / np.maximum(se, np.finfo(np.float64).tiny)
    if full is not None:  # a gap the solve does not resolve, where the choice it leaves moves NTPS, is none
        out["gap_ratio_V"][np.isin(ks, list(moving_next_token_ties(full)))] = 0.0
    out["gap_ratio"] = np.fmin(out["gap_ratio_U"], out["gap_ratio_V"])
    out["gap_ratio"][~(np.isfinite(out["gap_ratio_U"]) & np.isfinite(out["gap_ratio_V"]))] = np.nan
    return pd.DataFrame(out)


def eigengap_ratios(moment_shards: Sequence[Moments], ks, *, rtol: float = RANGE_RTOL) -> pd.DataFrame:
    """How well the sample separates the eigenvalues around k: each eigengap at k over its
    delete-one-shard jackknife standard error.

    The perception gap is lambda_{k_U} - lambda_{k_U + 1} of (Sxy Sxy^T, Sxx) (k_U = min(k, m), the
    gap to 0 after the last label direction), the next-token gap mu_k - mu_{k+1} of (C1 C1^T, C0);
    each replicate's eigenvalues are those of its own moments (S - 1 shards). A small ratio says
    the order of the directions around k is not resolved by the sample: U_k or V_k is then one
    tie-break of nearly tied population eigenvalues, possibly the same in every shard, which
    `subspace_noise` cannot see. `ntps_estimate`'s ``reliable`` asks for ``gap_ratio >= GAP_MIN``.
    Where the full sample's next-token eigenvalues tie at k within the solve's resolution
    (`ntps_nb.core.score.next_token_tied_ks`: a block of zeros, say) and the choice the tie leaves can move
    NTPS by more than `ntps_nb.core.score.NEXT_TOKEN_TIE_SPREAD` (`moving_next_token_ties`), gap_ratio_V is 0:
    the gap and its standard error are both rounding there, and their ratio says nothing.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (disjoint texts), at least 3.
    ks : (K,) positive integers, numbers of next-token directions.
    rtol : relative range tolerance of Sxx and C0.

    Returns
    -------
    DataFrame, one row per k: k, gap_U, gap_V (the full sample's gaps), gap_ratio_U, gap_ratio_V
    and gap_ratio (the smaller of the two; NaN where a replicate is undefined or k exceeds r_V).
    """
    shards = _as_shards(moment_shards)
    if len(shards) < 3:
        raise ValueError(f"eigengap ratios need at least 3 shards, got {len(shards)}")
    solves = _Solves.of(shards, rtol)
    return _gap_frame(solves.full_geometry(), solves.replicate_geometries(), _check_ks(ks))


@dataclass(frozen=True)
class _Solves:
    """The pooled shards (``pooled``, its subspaces ``full``) and each leave-one-shard-out pool
    (``pools``, their subspaces or the error the solve raised in ``replicates``), solved once and read
    by the estimator's plug-ins (their theory geometries), `subspace_noise` and the eigengaps."""

    pooled: Moments
    full: tuple[Subspace, Subspace]
    pools: list
    replicates: list

    @classmethod
    def of(cls, shards: list[Moments], rtol: float, step: Callable[[], Any] | None = None) -> "_Solves":
        """Solved, calling ``step()`` (a progress bar's) after each of the 1 + S solves."""
        step = step or (lambda: None)
        pooled = Moments.combine(shards)
        full = _solve(pooled, rtol)  # first: its error is the caller's
        step()
        pools = [_pooled(shards, i) for i in range(len(shards))]
        replicates: list = []
        for pool in pools:
            try:
                replicates.append(_solve(pool, rtol))
            except (ValueError, np.linalg.LinAlgError) as error:
                replicates.append(error)
            step()
        return cls(pooled, full, pools, replicates)

    def full_geometry(self) -> TheoryGeometry:
        """The pooled shards' theory geometry (ValueError where Sxy is zero, as `theory_geometry`)."""
        return _theory_geometry_of(self.pooled, *self.full)

    def replicate_geometries(self) -> list[TheoryGeometry | None]:
        """Each leave-one-shard-out pool's theory geometry, None where it is undefined."""
        out: list[TheoryGeometry | None] = []
        for pool, solved in zip(self.pools, self.replicates):
            try:
                out.append(None if isinstance(solved, Exception) else _theory_geometry_of(pool, *solved))
            except (ValueError, np.linalg.LinAlgError):
                out.append(None)
        return out


def _plugin(full: Moments, ks: np.ndarray, rtol: float) -> np.ndarray:
    return theory_values(theory_geometry(full, rtol=rtol), ks)


def _values(shards: list[Moments], ks: np.ndarray, estimator: str, *, seed: int, rtol: float,
            drop: int | None = None, n_splits: int = 1, pooled: TheoryGeometry | None = None,
            memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The estimator at ks on the shards, leaving shard ``drop`` out (a jackknife replicate);
    ``pooled``, where given, is the theory geometry of those shards pooled (read by "plugin",
    "richardson" and "extrapolate" instead of factorising again); ``memo``, a dict kept by the caller
    across the calls on the same shards, ks and rtol, spares "richardson" and "extrapolate" the halves
    already solved."""
    none = np.full(ks.shape, np.nan)
    if estimator in SHARD_ESTIMATORS and len(shards) < 2:
        raise ValueError(f"estimator {estimator!r} needs the moments of at least 2 shards of the texts "
                         "(extract with n_shards >= 2); estimator='plugin' needs only the pooled moments")
    if estimator == "debiased":
        return _debiased(shards, ks, rtol=rtol, drop=drop)
    if estimator == "richardson":
        return _richardson(shards, ks, n_splits=RICHARDSON_SPLITS, seed=seed, rtol=rtol, drop=drop, pooled=pooled,
                           memo=memo)
    if estimator == "extrapolate":
        return _extrapolate(shards, ks, n_splits=n_splits, seed=seed, rtol=rtol, drop=drop, pooled=pooled,
                            memo=memo)
    if estimator == "crossfit":
        return _crossfit(shards, ks, n_splits=n_splits, seed=seed, rtol=rtol, drop=drop)
    if estimator == "crossfit_inverse":
        return _crossfit_inverse(shards, ks, seed=seed, rtol=rtol, drop=drop)
    if drop is not None:
        shards = shards[:drop] + shards[drop + 1:]
    full = Moments.combine(shards) if len(shards) > 1 else shards[0]
    if estimator == "plugin":
        return (_plugin(full, ks, rtol) if pooled is None else theory_values(pooled, ks)), none
    if estimator == "adjusted":
        return _adjusted(full, ks, rtol)
    if estimator == "adjusted_v":
        return _adjusted(full, ks, rtol, halves=_halves(shards, seed, None))
    if estimator == "wishart":
        geometry = theory_geometry(full, rtol=rtol)
        r = geometry.r_U
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(full.n_texts - r - 1 > 0, (full.n_texts - np.minimum(ks, r) - 1) / (full.n_texts - r - 1),
                              np.nan)
        return theory_values(geometry, ks) * factor, none
    if estimator == "jackknife":
        S = len(shards)
        loo = np.array([_plugin(Moments.combine(shards[:i] + shards[i + 1:]), ks, rtol) for i in range(S)])
        return S * _plugin(full, ks, rtol) - (S - 1) * loo.mean(axis=0), none
    if estimator == "shrinkage":
        return _plugin(_shrunk(shards), ks, rtol), none
    if estimator == "pca":
        p = min(full.d, full.n_texts // PCA_TEXTS_PER_DIM)
        if p < 1:
            return none.copy(), none
        return _plugin(_projected(full, p), ks, rtol), none
    if estimator == "chance":
        geometry = theory_geometry(full, rtol=rtol)
        chance = np.minimum(ks, geometry.r_U) / geometry.r_U
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(chance < 1, (theory_values(geometry, ks) - chance) / (1 - chance), np.nan), none
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def warn_if_interpolating(shards: list[Moments], estimator: str, *, seed: int = 0, replicates: bool,
                          rank: int | None = None, centred: bool = False, stacklevel: int = 3) -> None:
    """Warn (`InterpolationWarning`) where a plug-in the estimate or its interval needs is computed from
    no more texts than the rank of its Sxx, where the labels are fitted exactly
    (`ntps_nb.core.score.interpolation_message`): the pooled shards, a leave-one-shard-out replicate
    (``replicates``, the jackknife interval's) or, for "richardson", a half of the split (less a shard
    in a replicate). A part of n texts has Sxx of rank min(n, rank), ``rank`` the pooled Sxx's retained
    rank where the caller has it, else min(N, d), the rank of states in general position (the pooled
    part: that rank itself); `ntps_nb.core.score.interpolates` decides. One warning, naming the largest
    part that does and the k at which the classes of any part that does tie (`ntps_nb.core.score.tied_ks`:
    the value, or its interval, at such k is a rounding choice).

    Parameters
    ----------
    shards : the per-shard `Moments` (as a list).
    estimator : the estimator's name (its halves are checked for "richardson").
    seed : seed of the split into halves.
    replicates : whether the caller also computes leave-one-shard-out replicates (an interval).
    rank : the pooled Sxx's retained rank, or None for min(N, d).
    centred : whether the plug-in centres the moments (the plug-in's ``centred``).
    stacklevel : as in `warnings.warn`; the default 3 points at the caller of this function's caller.

    Returns
    -------
    None; warns `ntps_nb.core.score.InterpolationWarning` at most once.
    """
    n = sum(s.n_texts for s in shards)
    rank = min(n, shards[0].d) if rank is None else int(rank)
    halves = split_halves(len(shards), seed) if estimator in HALF_ESTIMATORS and len(shards) >= 2 else ()
    drops = [None] + (list(range(len(shards))) if replicates and len(shards) > 1 else [])
    # (what, its shards) for every part read: the pooled shards and the halves, less each shard in a replicate
    parts = []
    for drop in drops:
        parts.append(("the pooled moments" if drop is None else "a leave-one-shard-out replicate of the interval",
                      [i for i in range(len(shards)) if i != drop]))
        parts += [(f"a half of the {estimator} estimator's split" + ("" if drop is None else " less a shard"),
                   [i for i in side if i != drop]) for side in halves]
    found = []  # (texts, what, rank, shards) of the parts that interpolate
    for what, members in parts:
        size = sum(shards[i].n_texts for i in members)
        part_rank = rank if len(members) == len(shards) else min(size, rank)
        if size > 0 and interpolates(size, part_rank, centred):
            found.append((size, what, part_rank, members))
    if not found:
        return
    tied = set()
    for _, _, _, members in found:  # Syy of each union as `Moments.combine` weighs it (no d x d array is needed)
        counts = np.array([shards[i].n_texts for i in members], dtype=np.float64)
        Syy = sum(c * shards[i].Syy for c, i in zip(counts, members)) / counts.sum()
        tied.update(tied_ks(Syy, centred and not shards[0].is_centred))
    size, what, part_rank, _ = max(found, key=lambda part: part[0])
    warnings.warn(interpolation_message(what, size, part_rank, sorted(tied), parts=len(found)), InterpolationWarning,
                  stacklevel=stacklevel)


def estimate_ntps(data: Moments | Sequence[Moments], ks, *, estimator: str = "plugin", seed: int = 0,
                  rtol: float = RANGE_RTOL, n_splits: int = CROSSFIT_SPLITS,
                  geometry: TheoryGeometry | None = None) -> Estimate:
    """NTPS_theory at each k of ``ks`` by one estimator (no interval).

    The building block of `ntps_nb.core.score.ntps` / `ntps_sweep` and of the shard bootstrap (once a
    replicate): unlike `ntps`, `ntps_sweep` and `ntps_estimate` it warns of nothing (texts no more than
    the rank of Sxx, tied next-token eigenvalues, rounded moments); read values through those, or call
    `ntps_nb.core.score.warn_of_the_sample` beside it.

    Parameters
    ----------
    data : the pooled `Moments`, or a list of per-shard `Moments` (disjoint texts); the shard
        estimators (`SHARD_ESTIMATORS`) need at least 2 shards.
    ks : (K,) positive integers, numbers of next-token directions.
    estimator : one of `ESTIMATORS`.
    seed : seed of the split into halves (crossfit estimators).
    rtol : relative range tolerance of Sxx and C0.
    n_splits : random splits into halves averaged by "crossfit" and "extrapolate".
    geometry : ``theory_geometry(Moments.combine(shards), rtol=rtol)`` where the caller has solved it already
        (`ntps_nb.core.score.ntps` and `ntps_sweep` have): "plugin", "richardson" and "extrapolate" read it
        instead of factorising the pooled moments again; the other estimators do not need it. It is not
        checked: another sample's geometry gives that sample's plug-in.

    Returns
    -------
    `Estimate` with (K,) ``estimate`` and ``reliability`` arrays (NaN where undefined, and
    ``reliability`` NaN for estimators that do not report one).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    shards = _as_shards(data)
    ks = _check_ks(ks)
    values, reliability = _values(shards, ks, estimator, seed=seed, rtol=rtol, n_splits=n_splits, pooled=geometry,
                                  memo={})  # a half two of extrapolate's splits share is solved once
    return Estimate(estimator=estimator, ks=ks, estimate=values, reliability=reliability,
                    n_texts=sum(s.n_texts for s in shards), n_shards=len(shards))


class FlagNotCalibratedWarning(UserWarning):
    """Rows of an estimator outside `CALIBRATED_ESTIMATORS` meet the reliability flag's conditions, and
    `ntps_estimate` did not mark them reliable: the flag's calibration (reliable rows' intervals covering the
    population NTPS at about their level) was shown for the default estimator only, and the plug-in's rows that
    meet the conditions under-cover (`PLUGIN_FLAGGED_COVERAGE`; docs/estimator.md, "The reliability flag is the
    default estimator's")."""


def _calibrated_flag(frame: pd.DataFrame, estimator: str, flag_any_estimator: bool) -> pd.DataFrame:
    """`ntps_estimate`'s frame with ``reliable`` False for an estimator outside `CALIBRATED_ESTIMATORS` (unless
    ``flag_any_estimator``), and a `FlagNotCalibratedWarning` where that takes rows out, said at the caller of
    `ntps_estimate`."""
    accepted = int(frame["reliable"].astype(bool).sum())
    if estimator in CALIBRATED_ESTIMATORS or flag_any_estimator or not accepted:
        return frame
    warnings.warn(
        f"{accepted} of {len(frame)} rows of the {estimator!r} estimator meet the reliability flag's conditions, but "
        f"the flag was calibrated for {', '.join(map(repr, CALIBRATED_ESTIMATORS))} only: on simulated populations "
        f"the plug-in's rows that met them covered {PLUGIN_FLAGGED_COVERAGE} at nominal 0.90 (its bias stays), and "
        "the other estimators' were not checked. Their reliable is False; the conditions are in the rows "
        "(subspace_noise, gap_ratio, rotation_stable, stationary_distance), and flag_any_estimator=True marks them "
        "(docs/estimator.md, 'The reliability flag is the default estimator's').",
        FlagNotCalibratedWarning, stacklevel=3)
    return frame.assign(reliable=False)


def ntps_estimate(
    moment_shards: Sequence[Moments],
    ks,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    level: float = 0.90,
    seed: int = 0,
    rtol: float = RANGE_RTOL,
    n_splits: int = CROSSFIT_SPLITS,
    noise_max: float = NOISE_MAX,
    gap_min: float = GAP_MIN,
    bound_se: float = BOUND_SE,
    device: Any = None,
    batch_size: int | None = None,
    interval: str | None = None,
    rotation_flag: bool = True,
    interaction_half: int | None = INTERACTION_HALF,
    flag_any_estimator: bool = False,
    stationary_flag: bool = True,
    stationary_se: float = STATIONARY_SE,
    rotation_widening: bool = True,
    widening_level: float = WIDENING_LEVEL,
    stationary_widening: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Estimate, standard error, Student-t interval and reliability flag at each k.

    The interval is estimate -/+ t_{S-1, (1+level)/2} * se over the S shards (for "quadratic", t on
    the row's ``df``). By default (``interval`` None) se is, for "richardson" with at least 4 shards,
    the delete-one-shard jackknife standard error less the jackknife's excess on the quadratic part of
    the error ("quadratic", `ntps_nb.core.quadratic`), and for the other estimators (or 3 shards) the jackknife standard
    error itself ("jackknife"; S more evaluations of the estimator; NaN at a k where a replicate
    fails). ``reliable`` says whether the number can be read as an estimate of the population NTPS
    with that interval (for the estimators it was calibrated for, `CALIBRATED_ESTIMATORS`: the default;
    ``flag_any_estimator``): True when the interval is finite and the subspaces are in the regime where
    their sampling noise is small (`subspace_noise`: the jackknife squared sine per direction of U
    and of V at most ``noise_max``), the order of the directions around k is resolved
    (`eigengap_ratios`: both eigengaps at k at least ``gap_min`` jackknife standard errors), the
    interval meets [0, 1], where NTPS lies (one wholly outside it shows a bias beyond the stated
    uncertainty), and NTPS's range over the rotations of the eigenvector pairs at k that the shards
    cannot reject stays inside the interval (``rotation_flag``, `rotation_stability`). The noise and
    eigengap conditions are properties of the data at that k, the same for every estimator; the
    others read the estimator's own interval. Only the default's reliable rows were shown to cover: the
    plug-in's rows that meet the same conditions keep its bias and under-cover, so another estimator's rows
    are not marked reliable (``flag_any_estimator``). The flag accepted nothing at N/d <= 4 on any simulated
    population: there the estimate still moves with N and the intervals are not known to cover.

    Where the population NTPS is stationary (at 0 or 1, or every principal angle between U_k and V_k
    at 0 or 90 degrees) the estimate's error is quadratic in the noise and the jackknife counts that
    part about 2.3-2.7 times over (10-20 shards). The "jackknife" interval is then conservative
    (0.985-1.00 at nominal 0.90 on the maps), and its flag has a sixth condition, the bound condition:
    a row whose estimate lies within ``bound_se`` standard errors of 0 or 1, or past either, is
    ``at_bound`` and not reliable (`flag_at_bound`); the rows it keeps near 0 and 1 are those whose
    estimate fell furthest inside, biased inward by up to a third of the interval's width. The
    "quadratic" interval removes the excess, reads its Student t on the Satterthwaite degrees of
    freedom of the difference (``df``), and its flag has no bound condition (``at_bound`` is still
    reported): on new populations of the estimator map (docs/estimator.md, "The quadratic interval's
    degrees of freedom", d = 16-576) no cell of its reliable rows covered significantly below 0.85 and
    none was biased by a quarter of the width, where the "jackknife" flag left edge cells biased by a
    third; the rows meeting its other conditions stay conservative in part of the stationary cells (e.g.
    every principal angle at 0: 0.96-1.00; mostly the flag's selection, docs/estimator.md, "In short"), so the
    flag has a stationary condition (``stationary_flag``): a row is reliable only where some principal angle's
    cos^2 lies at least ``stationary_se`` jackknife standard errors from both 0 and 1 (`stationary_distance`).
    On fresh populations (d = 16, 64 and 256) it takes 99.3% of the flag's rows at a stationary truth and 6% of the
    others (truths within a few standard errors of 0 or 1 among them); away from stationary points the interval
    covers about as the jackknife does (0.92 pooled); a nearly tied eigengap at k that the flag lets through
    in a few draws can still under-cover (0.76 on one population, 0.72 of 86 rows on another: significantly
    below 0.85; docs/estimator.md, "Rows at a stationary point are unreliable"). The "jackknife" flag's
    calibration: no cell of the maps or of fresh
    populations (d = 16-576) significantly outside [0.85, 0.95] but at the edges and at angle 0; without
    the rotation condition one design was known where reliable rows under-cover (d = 64, an LDS with 2
    classes and moderate eigengaps, k = 1, N/d = 32: the perception eigenvalues at k nearly tied;
    docs/estimator.md, "Why the near-tied design fails"). ``interval="rotation"`` widens the jackknife
    interval over those rotations instead (an option, conservative near the eigengap threshold).

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer, at least 3 shards (4 for the estimators that split
        them into halves, `SPLIT_ESTIMATORS`, the default among them: `min_shards`).
    ks : (K,) positive integers, numbers of next-token directions; a k beyond the pooled C0's retained rank
        r_V gets a NaN row and a `ntps_nb.core.score.BeyondRankWarning`.
    estimator : one of `ESTIMATORS` (default `DEFAULT_ESTIMATOR`, "richardson").
    level : coverage level of the interval, in (0, 1).
    seed, rtol, n_splits : as in `estimate_ntps`.
    noise_max : largest subspace noise per direction of a reliable row (default `NOISE_MAX`).
    gap_min : smallest eigengap ratio (`eigengap_ratios`) of a reliable row (default `GAP_MIN`).
    bound_se : standard errors inside [0, 1] a row's estimate must lie not to be ``at_bound`` (default
        `BOUND_SE`); the bound condition of the "jackknife" and "rotation" intervals' flag.
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...):
        every plug-in the estimate, its replicates and `subspace_noise` need solved as batches on
        that device (`ntps_nb.core.backends.torch.ntps_estimate_torch`, the same frame), for the
        estimators of `DEVICE_ESTIMATORS` (the others raise there).
    batch_size : combinations of shards per batched solve on a torch device (default: from free
        memory); ignored by the numpy code.
    interval : None (default): `DEFAULT_INTERVAL` ("quadratic") for "richardson" with at least 4 shards,
        else "jackknife". "jackknife": the Student-t interval on the jackknife SE, with the bound
        condition in its flag. "rotation": that interval
        widened to NTPS's range over confidence sets of the rotation of the eigenvector pairs at k,
        by test inversion and, where the row passed the eigengap condition, conditioned on it
        (`ntps_nb.core.rotation`; numpy, after either backend). On the estimator map it makes the
        near-tied design's reliable rows cover and leaves the other cells' intervals as they were
        except near the eigengap threshold, where it is conservative (docs/estimator.md, "The
        selective rotation interval"). The flag does not change. "quadratic" (estimator "richardson",
        at least 4 shards): the jackknife-t interval on a variance without the jackknife's excess on the
        quadratic part of the error (`ntps_nb.core.quadratic`; at most 25 more plug-ins, one per pair of
        shards from the two halves of richardson's split, ``interaction_half``; solved on ``device``), on
        the Satterthwaite degrees of freedom of that variance, and a flag without the bound condition
        (``at_bound`` is still reported; above). Adds interval
        ("quadratic"), se_jackknife, lower_jackknife, upper_jackknife, quadratic_excess (the variance
        removed) and df (the t's degrees of freedom).
    rotation_flag : give the flag its rotation condition (default True; False: the flag of the
        estimates stage before it, the committed study units'). Adds rotation_lower, rotation_upper
        (NTPS's range over the Fieller sets, shifted by the estimator's correction; computed on the
        rows the other conditions accept, NaN elsewhere) and rotation_stable; numpy, on the host
        after either backend, from the pooled solve (on a device the pooled subspaces are solved there,
        once, where a row is left to check) and the shards' projections on each pair's plane.
    flag_any_estimator : mark ``reliable`` by the flag's conditions for any estimator (for research on the flag
        itself, as `ntps_nb.core.simulate.estimator_map` does to compare estimators). By default only the rows of
        `CALIBRATED_ESTIMATORS`, whose reliable rows were shown to cover, can be reliable: another estimator's rows
        are not, and where they meet the conditions a `FlagNotCalibratedWarning` says so (the plug-in's such rows
        under-cover: `PLUGIN_FLAGGED_COVERAGE`).
    stationary_flag : give the flag its stationary condition (default True; False: the flag before it, the
        committed study units'). Adds stationary_distance (`stationary_distance`, from the geometries the
        estimate solved: no factorisation is added), and stationary_lower / stationary_upper (the values the
        stationary widening reaches, `stationary_reach`; the estimate where no angle is near a bound); "plugin" and
        "richardson" rows only (NaN for the others, whose reliable the condition leaves as it is).
    stationary_se : the distance the condition asks for (default `STATIONARY_SE`, 2).
    rotation_widening : widen the interval of each row the flag accepts over NTPS's range on the rotations of the
        pairs at k that a test conditioned on the eigengap condition cannot reject (`ntps_nb.core.rotation.
        rotation_widening`; default True since session 63, False: the interval as it is). Where the eigenvalues at k
        are nearly tied, the draws the flag accepts are those the noise rotated furthest, and the interval alone
        under-covers there: where the flag accepts at most 1% of a population's draws its rows covered 0.76 against
        0.93 widened, and a row does not show its population's rate (docs/estimator.md, "Rare acceptance"). The
        price: where the flag accepts more often, the widened interval over-covered (0.97 against the band's 0.95,
        with the sets at the interval's level: ``widening_level``) and a quarter of the reliable rows got wider ("The
        default interval widened over the rotation sets"). Adds lower_unwidened and upper_unwidened (the interval
        before it, on every row), rotation_U, rotation_V and widening_level. Widened are the rows meeting the flag's
        conditions after the rotation condition, before the stationary one; none, and no such columns, for an
        estimator outside `CALIBRATED_ESTIMATORS` unless ``flag_any_estimator``; with ``interval="rotation"`` (every
        row widened already) it changes nothing. No factorisation is added: the sets are the rotation condition's.
    widening_level : the level of the rotation sets ``rotation_widening`` joins with a row's interval (default
        `ntps_nb.core.rotation.WIDENING_LEVEL`, 0.6 since session 64, chosen on the map for ``level`` 0.90; before,
        the interval's level); the interval and the flag's rotation condition stay at ``level``. With the sets at
        0.90 the reliable rows of populations the flag accepts 3-30% of the time covered 0.97-0.98; at 0.6, on
        fresh populations, 0.90-0.96 by acceptance rate above 1% (none significantly above 0.95), and where it
        accepts at most 1% 0.80 (32 of 40; unwidened 0.50, at 0.90 1.00) (docs/estimator.md, "The widening's
        level"). It stays at 0.6 at any ``level``: at 0.80 both sides of that level's band [0.70, 0.90] held on fresh
        populations, at 0.95 the rows accepted above 1% covered 0.980, just above [0.925, 0.975] (p = 0.047), as
        with every other level of the sets tried ("The widening's level at other interval levels", session 65).
    stationary_widening : widen the interval of each row the flag accepts to NTPS with every principal angle that a
        test conditioned on the stationary condition cannot separate from 0 or 1 at that bound (`stationary_widening`,
        `stationary_reach_se`: 3.42 jackknife standard errors at ``level`` 0.90 and 10 shards; default True since
        session 67, False: the interval as it is). Where the population's angles are at a bound, the few rows the
        stationary condition keeps are those whose noise carried an angle furthest from it: at an LDS's NTPS of 0.998
        they covered 0.44-0.57 with the interval alone and 0.96-1.00 widened (0.980 pooled), on fresh populations;
        interior cells covered as before (0.920 and 0.922 pooled at d = 16 and 64), with a sixth of the reliable rows
        moved and their mean width 8% larger; at an edge at 0 (d = 64, NTPS below 0.005) 33 of 33 widened, 14 of 33
        with the interval alone (session 68). The rows it keeps at an edge stay biased by 0.34-0.43 of the widened
        width, their estimate further from the bound than the truth: it moves the interval, not the estimate
        (docs/estimator.md, "Rows near a bound: the stationary widening", "The default at d = 576, the factor
        family at d = 256, an edge at 0"). Needs ``stationary_flag`` (with it off the
        widening is off too); adds stationary_widened, and lower_unwidened / upper_unwidened (the interval before
        any widening) where the rotation widening did not. No factorisation is added: the angles are the stationary
        condition's. Off, and no such columns, for an estimator outside `CALIBRATED_ESTIMATORS` (unless
        ``flag_any_estimator``) or `STATIONARY_ESTIMATORS`.
    interaction_half : with ``interval="quadratic"``, at most this many shards of each half of the split
        enter the estimate of the quadratic part (default `ntps_nb.core.quadratic.INTERACTION_HALF`, 5:
        25 plug-ins; None: every shard, |A| |B| plug-ins, 100 at 20 shards; at least 2).
    progress : a bar over the call's parts, shown once it has run `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds:
        on the numpy code its 3 + 2 S parts (the pooled and S leave-one-shard-out solves, the estimate and its S
        replicates, the quadratic part, the flag's rotation condition); on a torch device, which solves them in
        batches, the combinations of shards it solves, a batch at a time (2 S + 3 for the estimate and its
        replicates, the quadratic part's plug-ins as ``interaction_half`` says, 1 for the rotation step: the
        rotation sets' pooled solve, where a row needs them).

    Returns
    -------
    DataFrame, one row per k: k, estimator, estimate, se, lower, upper, level, reliability (the
    estimator's own statistic, NaN for most), reliable, n_texts, n_shards, bias_jackknife (the
    delete-one-shard jackknife estimate of the estimator's bias), noise_U, noise_V, bias_bound,
    k_U and subspace_noise (the larger per-direction noise of U and V) from `subspace_noise`;
    gap_U, gap_V, gap_ratio_U, gap_ratio_V and gap_ratio from `eigengap_ratios`; at_bound
    (`flag_at_bound`); with ``stationary_flag`` stationary_distance, stationary_lower and stationary_upper (with
    ``stationary_widening`` also stationary_widened, lower_unwidened and upper_unwidened: `stationary_widening`);
    with ``rotation_flag`` rotation_lower, rotation_upper and rotation_stable
    (`ntps_nb.core.rotation.rotation_stability`). With ``interval="rotation"`` also interval ("rotation"),
    lower_jackknife, upper_jackknife, rotation_U and rotation_V (`ntps_nb.core.rotation.rotation_interval`); with
    ``rotation_widening`` and another interval lower_unwidened, upper_unwidened, rotation_U, rotation_V and
    widening_level (`ntps_nb.core.rotation.rotation_widening`).
    """
    shards = _as_shards(moment_shards)
    interval = resolve_interval(interval, estimator, len(shards))
    if not 0.0 < widening_level < 1.0:
        raise ValueError(f"widening_level must be in (0, 1), got {widening_level}")
    if interval == "quadratic":
        _check_quadratic(shards, estimator, seed)
    # the widening is conditioned on the stationary condition (without it, or for an estimator without it, there is
    # nothing to widen after) and is of the rows the flag accepts: none for an estimator it was not calibrated for
    stationary_widening = (stationary_widening and stationary_flag and estimator in STATIONARY_ESTIMATORS
                           and (estimator in CALIBRATED_ESTIMATORS or flag_any_estimator))
    # the widening is of the rows the flag accepts: none for an estimator it was not calibrated for
    rotation_widening = rotation_widening and (estimator in CALIBRATED_ESTIMATORS or flag_any_estimator)
    # how near a bound an angle counts as not told from it (NaN for a bad level or shard count: checked below)
    reach_se = stationary_reach_se(level, stationary_se, len(shards))
    backend = analysis_backend(device)
    if backend is not None:
        _check_estimate_options(shards, level, estimator)  # ntps_estimate_torch's first check, before the count
        # a bar over the combinations of shards solved on the device: the estimate's and its replicates', the
        # quadratic part's contrasts and the rotation sets' pooled solve
        contrasts = (int(np.prod([len(h) for h in interaction_halves(len(shards), seed, interaction_half)]))
                     if interval == "quadratic" else 0)
        rotation = int(rotation_flag or rotation_widening or interval == "rotation")
        solves = backend.estimate_solves(len(shards), estimator, seed) + contrasts + rotation
        with progress_bar(solves, "ntps_estimate", progress, unit="solve") as bar:
            frame, plugins, left_out = backend.ntps_estimate_torch(
                moment_shards, ks, estimator=estimator, level=level, seed=seed, rtol=rtol, noise_max=noise_max,
                gap_min=gap_min, bound_se=bound_se, device=device, batch_size=batch_size, plugins=True, bar=bar,
                stationary=stationary_flag, reach_se=reach_se)
            if interval == "quadratic":
                def solve(counts: np.ndarray) -> np.ndarray:
                    return backend.interval_replicates_torch(shards, counts, frame["k"].to_numpy(), rtol=rtol,
                                                             device=device, batch_size=batch_size, bar=bar)[0]

                # the plug-ins on all shards and without each are the replicates' own: only the contrasts are solved
                frame = quadratic_interval(shards, frame, level=level, seed=seed, noise_max=noise_max,
                                           gap_min=gap_min, solve=solve, pooled=plugins, left_out=left_out,
                                           interaction_half=interaction_half)
            frame = _with_rotation(shards, frame, level=level, gap_min=gap_min, rtol=rtol, interval=interval,
                                   rotation_flag=rotation_flag, plugins=plugins, device=device,
                                   widening=rotation_widening, widening_level=widening_level)
            bar.update(rotation)
        frame = _stationary_condition(frame, estimator, stationary_flag, stationary_se)
        frame = _calibrated_flag(frame, estimator, flag_any_estimator)
        return _with_stationary_widening(frame, stationary_widening)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _check_estimate_options(shards, level, estimator)
    ks = _check_ks(ks)
    steps = 3 + 2 * len(shards) + (interval == "quadratic")
    with progress_bar(steps, "ntps_estimate", progress, unit="part") as bar:
        frame = _estimate_rows(shards, ks, estimator=estimator, level=level, seed=seed, rtol=rtol, n_splits=n_splits,
                               noise_max=noise_max, gap_min=gap_min, bound_se=bound_se, interval=interval,
                               rotation_flag=rotation_flag, interaction_half=interaction_half, step=bar.update,
                               stationary=stationary_flag, widening=rotation_widening,
                               widening_level=widening_level, reach_se=reach_se)
    frame = _stationary_condition(frame, estimator, stationary_flag, stationary_se)
    frame = _calibrated_flag(frame, estimator, flag_any_estimator)
    return _with_stationary_widening(frame, stationary_widening)


def _estimate_rows(shards: list[Moments], ks: np.ndarray, *, estimator: str, level: float, seed: int, rtol: float,
                   n_splits: int, noise_max: float, gap_min: float, bound_se: float, interval: str, rotation_flag: bool,
                   interaction_half: int | None, step: Callable[[], Any], stationary: bool = True,
                   reach_se: float, widening: bool = False, widening_level: float = WIDENING_LEVEL) -> pd.DataFrame:
    """`ntps_estimate`'s rows on the numpy code, before the calibration of the flag; ``step()`` after each of its
    3 + 2 S (+ 1 for the quadratic interval) parts. ``stationary``: compute `_stationary_columns` at ``reach_se``
    (`stationary_reach_se`; else NaN, for the caller to drop); ``widening``, ``widening_level``:
    ``rotation_widening`` and ``widening_level``."""
    # the full sample's and the leave-one-shard-out subspaces, solved once: read by the estimator's
    # plug-ins (their geometries), the eigengaps and the subspace noise
    solves = _Solves.of(shards, rtol, step)
    full = solves.full_geometry()
    # the flag refuses rows at tied next-token eigenvalues (`eigengap_ratios`); the warning says why, at the line
    # that called ntps_estimate
    warn_of_the_sample(solves.pooled, shards, full, ks, estimator=estimator, seed=seed, replicates=True, rtol=rtol,
                       stacklevel=4)
    # each half's plug-in solved once: a replicate leaves one half as the estimate had it
    halves: dict = {}
    estimate, reliability = _values(shards, ks, estimator, seed=seed, rtol=rtol, n_splits=n_splits, pooled=full,
                                    memo=halves)
    step()
    S = len(shards)
    geometries = solves.replicate_geometries()
    loo = np.full((S, ks.size), np.nan)
    for i in range(S):
        try:
            loo[i] = _values(shards, ks, estimator, seed=seed, rtol=rtol, drop=i, n_splits=n_splits,
                             pooled=geometries[i], memo=halves)[0]
        except (ValueError, np.linalg.LinAlgError):
            pass
        step()
    noise = _noise_of_solves(shards, ks, rtol, solves)
    gaps = _gap_frame(full, geometries, ks)
    frame = _estimate_frame(ks, estimator, estimate, reliability, loo, noise, gaps, level=level,
                            noise_max=noise_max, gap_min=gap_min, bound_se=bound_se,
                            n_texts=sum(s.n_texts for s in shards))
    columns = (_stationary_of_solves(shards, ks, estimator, seed=seed, rtol=rtol, pooled=full, left_out=geometries,
                                     memo=halves, reach_se=reach_se)
               if stationary and estimator in STATIONARY_ESTIMATORS else dict.fromkeys(STATIONARY_COLUMNS, np.nan))
    for name, column in columns.items():
        frame[name] = column
    plugins = theory_values(full, ks)
    if interval == "quadratic":
        none = np.full(ks.shape, np.nan)
        left_out = np.array([none if g is None else theory_values(g, ks) for g in geometries])
        frame = quadratic_interval(shards, frame, level=level, seed=seed, noise_max=noise_max, gap_min=gap_min,
                                   solve=numpy_plugins(shards, ks, rtol), pooled=plugins,
                                   left_out=left_out, interaction_half=interaction_half)
        step()
    frame = _with_rotation(shards, frame, level=level, gap_min=gap_min, rtol=rtol, interval=interval,
                           rotation_flag=rotation_flag, plugins=plugins, pooled=solves.pooled, solved=solves.full,
                           widening=widening, widening_level=widening_level)
    step()
    return frame


def estimate_by_n(moment_shards: Sequence[Moments], ks, *, n_groups: int = 5, estimator: str = DEFAULT_ESTIMATOR,
                  progress: bool = True, **options: Any) -> pd.DataFrame:
    """Does the estimate settle as texts are added? `ntps_estimate` on nested subsamples of one extraction.

    The subsamples are `ntps_nb.core.intervals.nested_groups`': the first ``n_groups``, ``2 n_groups``,
    ``4 n_groups``, ... shards, each merged into ``n_groups`` groups, so every row's interval comes from
    the same number of shards and only N changes. An estimate of a fixed population value should move
    from the smallest N to the largest by no more than its interval at the smallest N allows. Item 5 of
    issue 21 asks this of the default estimator on real data (docs/estimator.md, "Item 5 with the default
    on all three datasets"). On populations with known NTPS (`benchmarks/estimate_by_n_check.py`, d = 16,
    5 groups) the check reads only one way: ``inside_first`` False means the estimate had not settled or its
    smallest-N interval was too narrow (rows the flag refuses under-cover often), and True shows little
    where the smallest-N row is not flagged reliable: a plug-in biased by 0.21 at the largest N stayed
    inside in 65% of draws. Where the smallest-N row is reliable, the estimates (unbiased there) stayed
    inside in 0.905-1.000 of the draws, in the cells with 20 or more such rows. More groups give fewer false
    departures, not more caught drifts: the same texts in 40 shards with ``n_groups=10`` (d = 16 and 64) gave
    richardson's smallest-N intervals coverage nearer 0.90 on the rows the flag refuses, so an unbiased
    estimate left its band less often (d = 64: stayed inside in 0.86-0.95 of draws against 0.84-0.92 with 5
    groups; 0.94 is what a calibrated 90% interval gives), while the biased plug-in above stayed inside in 75%
    of draws (docs/estimator.md, "More groups for `estimate_by_n`"). Take ``n_groups=10`` where the
    extraction has 40 shards or more.

    Parameters
    ----------
    moment_shards : sequence of Moments
        Per-shard moments of one layer, at least ``n_groups`` of them; their order decides the nesting
        (shards are random groups of texts, so each prefix is a random subsample).
    ks : int or sequence of int
        Numbers of next-token directions, as in `ntps_estimate`.
    n_groups : int
        Shards of every subsample's estimate, at least `min_shards` of the estimator (default 5).
    estimator : str
        One of `ESTIMATORS` (default `DEFAULT_ESTIMATOR`).
    progress : bool
        Show a bar over the subsamples (one `ntps_estimate` each) once the call has run
        `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds.
    **options
        Passed to `ntps_estimate` (``level``, ``seed``, ``interval``, ``device``, ...).

    Returns
    -------
    DataFrame
        `ntps_estimate`'s rows, one per (subsample, k), smallest N first, with n_shards_used (the
        extraction's shards the subsample holds), n_groups, and, per k, against the smallest N where
        the estimate and its interval are defined: n_first (its texts), drift (the estimate less the
        estimate there) and inside_first (whether the estimate lies in the interval there, to `INSIDE_ATOL`;
        missing where the estimate is undefined or no row of the k has an interval).

    Raises
    ------
    ValueError
        On an unknown estimator, fewer shards than ``n_groups``, or ``n_groups`` below `min_shards`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    subsamples = list(nested_groups(moment_shards, n_groups, min_groups=min_shards(estimator),
                                    caller="estimate_by_n"))
    frames = []
    with progress_bar(len(subsamples), "estimate_by_n", progress, unit="subsample") as bar:
        for used, groups in subsamples:
            with _caught((InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning,
                          BeyondRankWarning)) as caught:
                frames.append(ntps_estimate(groups, ks, estimator=estimator, progress=False, **options).assign(
                    n_shards_used=used, n_groups=n_groups))
            where = f"the first {used} shards ({sum(g.n_texts for g in groups)} texts)"
            for item in caught:  # said at the caller's line, with the subsample they are of
                warnings.warn(f"estimate_by_n, {where}: {item.message}", item.category, stacklevel=2)
            bar.update(1)
    return _with_drift(pd.concat(frames, ignore_index=True))


def _with_drift(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (rows of `estimate_by_n`, smallest N first) with n_first, drift and inside_first per k."""
    frame = frame.assign(n_first=np.nan, drift=np.nan, inside_first=pd.array([pd.NA] * len(frame), dtype="boolean"))
    for _, rows in frame.groupby("k", sort=False):
        defined = rows[np.isfinite(rows[["estimate", "lower", "upper"]].to_numpy(float)).all(axis=1)]
        if defined.empty:
            continue
        first = defined.iloc[0]
        finite = rows.index[np.isfinite(rows["estimate"].to_numpy(float))]
        estimate = frame.loc[finite, "estimate"]
        frame.loc[rows.index, "n_first"] = first["n_texts"]
        frame.loc[finite, "drift"] = estimate - first["estimate"]
        frame.loc[finite, "inside_first"] = ((first["lower"] - INSIDE_ATOL <= estimate)
                                             & (estimate <= first["upper"] + INSIDE_ATOL)).to_numpy()
    return frame


def _with_rotation(shards: list[Moments], frame: pd.DataFrame, *, level: float, gap_min: float, rtol: float,
                   interval: str, rotation_flag: bool, plugins: np.ndarray, pooled: Moments | None = None,
                   solved=None, device=None, widening: bool = False,
                   widening_level: float = WIDENING_LEVEL) -> pd.DataFrame:
    """`ntps_estimate`'s frame with the flag's rotation condition (``rotation_flag``:
    `ntps_nb.core.rotation.rotation_stability`), the rotation interval (``interval="rotation"``:
    `ntps_nb.core.rotation.rotation_interval`) or the reliable rows' interval widened over the rotations
    (``widening``, for the other intervals: `ntps_nb.core.rotation.rotation_widening`, on the rows reliable after
    the rotation condition; its sets at ``widening_level``), all from one computation of the rotation sets' planes,
    in numpy on the host after either backend. ``plugins``: the pooled plug-in at the frame's k; ``pooled`` and
    ``solved``: the shards combined and their (U, V), as the numpy path has them; on a torch ``device`` the shards
    are combined once and solved there (no host sum of the shards), only where a row needs them."""
    widening = widening and interval != "rotation"      # the rotation interval widens every row already
    if not rotation_flag and interval != "rotation" and not widening:
        return frame
    # the condition needs the Fieller ranges of the rows the other conditions accept, the widening the selective
    # ranges of those rows; the rotation interval needs its sets on every row
    if interval == "rotation":
        kinds, rows = ("fieller", "chosen"), None
    else:
        kinds = ("fieller",) * rotation_flag + ("chosen",) * widening
        rows = frame["reliable"].astype(bool)
    if solved is None and device is not None and (rows is None or rows.any()):
        # pooled and solved on the device; the rotation's plane replicates read the pool on the host
        U, V, pooled = analysis_backend(device).pooled_subspaces_torch(
            shards if pooled is None else pooled, rtol=rtol, device=device, with_pooled=True)
        solved = U, V
    ranges = _rotation_ranges(shards, frame, level=level, gap_min=gap_min, rtol=rtol, solved=solved, plugins=plugins,
                              pooled=pooled, kinds=kinds, rows=rows, chosen_level=widening_level if widening else None)
    if rotation_flag:
        frame = rotation_stability(shards, frame, level=level, gap_min=gap_min, rtol=rtol, ranges=ranges)
    if interval == "rotation":
        frame = rotation_interval(shards, frame, level=level, gap_min=gap_min, rtol=rtol, ranges=ranges)
    elif widening:
        frame = rotation_widening(shards, frame, level=level, gap_min=gap_min, rtol=rtol, ranges=ranges,
                                  widening_level=widening_level)
    return frame


def resolve_interval(interval: str | None, estimator: str, n_shards: int) -> str:
    """The interval `ntps_estimate` computes for ``interval``: None means `DEFAULT_INTERVAL` where it is
    derived (estimator "richardson", at least 4 shards), else "jackknife".

    Parameters
    ----------
    interval : None or one of `ntps_nb.core.rotation.INTERVALS`.
    estimator : the estimator's name.
    n_shards : number of shards.

    Returns
    -------
    The interval's name; a ValueError for a name not in INTERVALS.
    """
    if interval is None:
        return DEFAULT_INTERVAL if estimator == "richardson" and n_shards >= 2 * MIN_HALF else "jackknife"
    if interval not in INTERVALS:
        raise ValueError(f"interval must be None or one of {INTERVALS}, got {interval!r}")
    return interval


def _check_quadratic(shards: list[Moments], estimator: str, seed: int) -> None:
    """Raise the errors ``interval="quadratic"`` raises: an estimator other than "richardson", or a
    split with fewer than `ntps_nb.core.quadratic.MIN_HALF` shards in a half."""
    if estimator != "richardson":
        raise ValueError("interval='quadratic' is derived for estimator='richardson' (its error has no "
                         f"diagonal quadratic term), got estimator={estimator!r}")
    quadratic_factors(len(shards), seed)


def min_shards(estimator: str) -> int:
    """Fewest shards `ntps_estimate` gives an interval with for ``estimator``.

    Parameters
    ----------
    estimator : one of `ESTIMATORS`.

    Returns
    -------
    `SPLIT_MIN_SHARDS` (4) for the estimators that split the shards into halves (`SPLIT_ESTIMATORS`: a
    delete-one-shard replicate must leave a shard in each half), `MIN_SHARDS` (3) for the others.
    """
    return SPLIT_MIN_SHARDS if estimator in SPLIT_ESTIMATORS else MIN_SHARDS


def _check_estimate_options(shards: list[Moments], level: float, estimator: str) -> None:
    """Raise the errors `ntps_estimate` raises on too few shards or a level outside (0, 1).

    Parameters
    ----------
    shards : the per-shard `Moments` (as a list).
    level : coverage level of the interval.
    estimator : the estimator (`min_shards`).

    Returns
    -------
    None; a ValueError names the bad value.
    """
    fewest = min_shards(estimator)
    if len(shards) < fewest:
        why = (f" for estimator={estimator!r} (it splits the shards into halves, and a delete-one-shard replicate "
               "must leave a shard in each)" if estimator in SPLIT_ESTIMATORS else "")
        raise ValueError(f"a jackknife interval needs at least {fewest} shards{why}, got {len(shards)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _estimate_frame(ks: np.ndarray, estimator: str, estimate: np.ndarray, reliability: np.ndarray, loo: np.ndarray,
                   noise: pd.DataFrame, gaps: pd.DataFrame, *, level: float, noise_max: float, gap_min: float,
                   n_texts: int, bound_se: float = BOUND_SE) -> pd.DataFrame:
    """`ntps_estimate`'s frame from the point estimate, the S leave-one-shard-out replicates of the
    estimator and the `subspace_noise` frame (shared by the numpy code and the torch backend).

    Parameters
    ----------
    ks : (K,) numbers of next-token directions.
    estimator : the estimator's name.
    estimate, reliability : (K,) the estimate and the estimator's own statistic on all shards.
    loo : (S, K) the estimator with shard i left out (row i), NaN where a replicate failed.
    noise : `subspace_noise` of the same shards at ``ks``.
    gaps : `eigengap_ratios` of the same shards at ``ks``.
    level, noise_max, gap_min, bound_se : as in `ntps_estimate`.
    n_texts : texts in all the shards.

    Returns
    -------
    DataFrame as `ntps_estimate` returns it.
    """
    S = loo.shape[0]
    n_ok = np.sum(np.isfinite(loo), axis=0)
    # the standard error needs every replicate; columns with a failed replicate get NaN
    complete = n_ok == S
    dev = loo[:, complete] - loo[:, complete].mean(axis=0)
    se = np.full(ks.shape, np.nan)
    se[complete] = np.sqrt((S - 1) / S * np.sum(dev**2, axis=0))
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    lower, upper = estimate - t * se, estimate + t * se
    bias_jackknife = np.full(ks.shape, np.nan)
    bias_jackknife[complete] = (S - 1) * (loo[:, complete].mean(axis=0) - estimate[complete])
    k_u = noise["k_U"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_direction = np.maximum(noise["noise_U"].to_numpy() / k_u, noise["noise_V"].to_numpy() / ks)
    gap_ratio = gaps["gap_ratio"].to_numpy()
    reliable = flag_conditions(lower, upper, per_direction, gap_ratio, noise_max=noise_max, gap_min=gap_min)
    frame = pd.DataFrame({
        "k": ks, "estimator": estimator, "estimate": estimate, "se": se, "lower": lower, "upper": upper,
        "level": level, "reliability": reliability, "reliable": reliable,
        "n_texts": n_texts, "n_shards": S, "bias_jackknife": bias_jackknife,
        "noise_U": noise["noise_U"].to_numpy(), "noise_V": noise["noise_V"].to_numpy(),
        "bias_bound": noise["bias_bound"].to_numpy(), "k_U": k_u, "subspace_noise": per_direction,
        **{name: gaps[name].to_numpy() for name in ("gap_U", "gap_V", "gap_ratio_U", "gap_ratio_V", "gap_ratio")},
    })
    return flag_at_bound(frame, bound_se)


def flag_conditions(lower: np.ndarray, upper: np.ndarray, subspace_noise: np.ndarray, gap_ratio: np.ndarray, *,
                    noise_max: float, gap_min: float) -> np.ndarray:
    """The reliability flag's conditions on a row's interval and data, before the bound and rotation
    conditions: a finite interval meeting [0, 1] (NTPS lies there: an interval wholly outside it shows a
    bias beyond the stated uncertainty), subspace noise per direction at most ``noise_max`` and the
    eigengap ratio at least ``gap_min`` (NaN fails every condition).

    Parameters
    ----------
    lower, upper : (K,) the interval's bounds.
    subspace_noise : (K,) the larger per-direction noise of U and V (`subspace_noise`).
    gap_ratio : (K,) the smaller eigengap ratio at k (`eigengap_ratios`).
    noise_max, gap_min : as in `ntps_estimate`.

    Returns
    -------
    (K,) bool array.
    """
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    noise, gaps = np.asarray(subspace_noise, dtype=float), np.asarray(gap_ratio, dtype=float)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(lower) & np.isfinite(upper) & (lower <= 1.0) & (upper >= 0.0)
                & (noise <= noise_max) & (gaps >= gap_min))


def flag_at_bound(frame: pd.DataFrame, bound_se: float = BOUND_SE) -> pd.DataFrame:
    """Mark the rows of an `ntps_estimate` frame whose estimate is at the bounds of [0, 1].

    A row is ``at_bound`` when its estimate lies within ``bound_se`` standard errors of 0 or 1, or
    past either: min(estimate, 1 - estimate) < bound_se * se, or within `BOUND_ATOL` of either. There the population NTPS is most
    likely 0 or 1, where the estimate's error is quadratic in the sampling noise and the
    delete-one-shard jackknife overstates its variance by about 2 (S - 1) / (S - 2): the interval is
    conservative (covered 0.985-1.00 at nominal 0.90 on the maps), so such a row is not
    ``reliable`` (a reliable row's interval is calibrated). A row without a finite standard error is
    not at_bound (nor reliable: its interval is not finite). at_bound reads only the estimate and its
    SE: it is set whether or not the flag's other conditions hold, so an at_bound row need not meet
    them (and-ed with them it is the row the flag would accept but for the bound).

    The result depends only on the frame's estimate, se and reliable columns, so an estimates table
    written before this condition existed is brought up to date from its own values (the study's
    estimates stage, version 2 to 3); from a table's 7 significant digits it differs from the
    computation only where min(estimate, 1 - estimate) lies within about 1e-7 of bound_se * se.

    Parameters
    ----------
    frame : DataFrame with columns estimate, se and reliable (bools, or 1.0 / 0.0).
    bound_se : standard errors inside [0, 1] a reliable row's estimate must lie (default `BOUND_SE`).

    Returns
    -------
    DataFrame: ``frame`` with ``at_bound`` set (added as the last column where it is new) and
    ``reliable`` turned False where at_bound is True.
    """
    if not bound_se >= 0:
        raise ValueError(f"bound_se must be a non-negative number, got {bound_se!r}")
    estimate = frame["estimate"].to_numpy(dtype=float)
    se = frame["se"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        distance = np.minimum(estimate, 1.0 - estimate)
        at_bound = ((distance < bound_se * se) | (distance <= BOUND_ATOL)) & np.isfinite(se) & np.isfinite(estimate)
    reliable = frame["reliable"].fillna(False).astype(bool).to_numpy()
    return frame.assign(reliable=reliable & ~at_bound, at_bound=at_bound)
