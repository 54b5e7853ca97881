"""Intervals that allow for the rotation of a nearly tied pair of eigenvectors (`ntps_estimate`'s
``interval="rotation"``).

The jackknife-t interval of `ntps_estimate` is a linearisation: the shards' spread of the estimate
around its own value. Where two eigenvalues at k are separated by only a few standard errors, the
estimated eigenvector is rotated within their plane by an angle that is not linear in the noise
(atan of a ratio whose denominator, the gap, is itself noisy), and the eigengap condition of the
reliability flag passes the draws whose sample gap the rotating noise has inflated. There the
interval under-covers (docs/estimator.md, "Why the near-tied design fails").

``interval="rotation"`` widens the interval to NTPS's range over a confidence set of the rotation,
built by test inversion rather than by linearisation. For the pair (w_1, w_2) at k (the perception
pair k_U, k_U + 1 in the Sxx inner product when k_U < m, the next-token pair k, k + 1 in the C0
inner product when k < r_V), a candidate rotation phi of the sample's w_1 towards w_2 is tested by
the off-diagonal entry h(phi) of the pair's matrix in the rotated basis, which is 0 in the
population's basis (Fieller's construction for a ratio, Fieller 1954): h(phi) against its
delete-one-shard jackknife SE at that phi. Where the row passed the eigengap condition the test is
conditioned on having passed it (selective inference: Lee, Sun, Sun and Taylor 2016; Fithian, Sun
and Taylor 2014): given the part of the diagonal difference g(phi) uncorrelated with h(phi), which
carries the unknown population gap, the condition sqrt(g^2 + 4 h^2) >= gap_min * se(gap) keeps
h(phi) outside an interval, and the test uses h(phi)'s Student-t distribution truncated to that
set. NTPS is evaluated in closed form on every pair of kept rotations (U's and V's), shifted by the
estimator's correction (estimate minus the pooled plug-in), and joined with the jackknife-t interval.

Validated on the estimator map's accepted rows (docs/estimator.md, "The selective rotation interval"):
it is what makes the flag's accepted rows of the near-tied design cover; elsewhere it is the
jackknife-t interval except near the eigengap threshold, where it is conservative.

The same sets give the reliability flag its rotation condition (`rotation_stability`, on by default in
`ntps_estimate`): a row is reliable only where NTPS's range over the Fieller sets (unconditional, valid
over all draws) lies inside its jackknife-t interval, that is where the data do not contradict the
interval's linearisation in the rotation. On the maps and on fresh populations it takes the near-tied
design's accepted rows out of the flag and leaves no cell covering significantly outside [0.85, 0.95]
(docs/estimator.md, "The flag's rotation condition").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from ntps_nb.core.intervals import _jackknife
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import SPAN_RTOL, _theory_geometry_of
from ntps_nb.core.subspaces import Subspace, nested_orthonormal_basis, next_token_subspace, perception_subspace

#: Candidate rotations tested per pair, evenly over [-pi/2, pi/2) (0.5 degree apart).
SET_ANGLES = 360
#: The values of `ntps_estimate`'s ``interval`` ("quadratic": `ntps_nb.core.quadratic`).
INTERVALS = ("jackknife", "rotation", "quadratic")
#: How the study's report and the notebooks' layer profiles name each interval (after its level, e.g. "90% ...").
INTERVAL_DESCRIPTIONS = {
    "jackknife": "delete-one-shard jackknife interval (Student t)",
    "rotation": "delete-one-shard jackknife interval (Student t) widened over the rotations of nearly tied "
                "eigenvector pairs",
    "quadratic": "delete-one-shard jackknife interval less the jackknife's excess on the error's quadratic part "
                 "(Student t on its Satterthwaite degrees of freedom)",
}
#: What `interval_description` adds to a row `rotation_widening` widened (with the sets' level after it, where known).
WIDENED_DESCRIPTION = "widened over the rotations of the eigenvector pairs at k the data cannot reject"
#: ... and where `ntps_nb.core.estimators.stationary_widening` moved an end.
STATIONARY_DESCRIPTION = "reaching NTPS with the principal angles the data cannot tell from 0 or 90 degrees there"
#: The level of the rotation sets `rotation_widening` joins with a reliable row's interval (`ntps_estimate`'s
#: ``widening_level``), for an interval at level 0.90. The union of two sets at 0.90 each (sessions 60-63) over-covered
#: where the flag accepts 1-30% of a population's draws (0.97-0.98); at 0.6 neither side of item 4's band was
#: significantly missed on the frames it was chosen on nor on fresh populations (docs/estimator.md, "The widening's
#: level", session 64). At any other interval level it stays 0.6 (checked at 0.80 and 0.95 in session 65: "The
#: widening's level at other interval levels").
WIDENING_LEVEL = 0.6
#: How far NTPS's range over the Fieller sets may reach past a row's jackknife-t interval and the row
#: still be `rotation_stable` (rounding of the closed form; NTPS lives in [0, 1]).
STABLE_ATOL = 1e-9
#: Largest off-diagonal entry of a pooled pair's plane matrices (relative to its leading
#: eigenvalue, and of the metric against the identity) before the pair is taken as not the pooled
#: eigenvectors (a programming error, not a data condition), where the metric is well conditioned: the
#: eigenvectors come through the whitening, so they diagonalise the metric only to about machine epsilon
#: times its condition number on the retained range (up to 1 / RANGE_RTOL = 1e10), and the check allows
#: that much (`plane_replicates`' ``condition``).
PLANE_RTOL = 1e-8


@dataclass(frozen=True)
class RotationSets:
    """Confidence sets for the rotation of a pair's leading eigenvector (`rotation_sets`).

    phis : (SET_ANGLES,) the candidate rotations, radians in [-pi/2, pi/2).
    fieller : (..., SET_ANGLES) bool, the rotations the plain t test keeps.
    selective : (..., SET_ANGLES) bool, those the test conditioned on the eigengap condition keeps.
    """

    phis: np.ndarray
    fieller: np.ndarray
    selective: np.ndarray


def rotation_sets(gap, se_gap, local: np.ndarray, *, level: float = 0.90, gap_min: float) -> RotationSets:
    """Confidence sets, by test inversion, for the population eigenvector of a pair's leading eigenvalue.

    A candidate rotation phi of the sample's leading eigenvector w_1 towards the second w_2 is the
    basis (w_1(phi), w_2(phi)) = (cos phi w_1 + sin phi w_2, -sin phi w_1 + cos phi w_2). In the
    population's eigenbasis the pair's mean matrix is diagonal, so phi is tested by the t statistic
    of the off-diagonal entry h(phi) against 0, with h(phi)'s jackknife SE at that phi (the
    replicates' matrices in the same basis). A phi is also kept only where the diagonal difference
    g(phi) = w_1(phi)' M w_1(phi) - w_2(phi)' M w_2(phi) is not significantly negative (h is 0 at the
    second eigenvector as well).

    ``fieller``: the plain t test (Student t, S - 1 degrees of freedom), a set covering the population
    rotation with probability ``level`` over all draws. ``selective``: the test conditioned on the
    eigengap condition having passed, sample gap sqrt(g(phi)^2 + 4 h(phi)^2) (the same in every
    basis) at least ``gap_min`` * ``se_gap``: with z = g(phi) - beta h(phi) the part of g
    uncorrelated with h (which carries the nuisance population gap), the condition is a quadratic
    in h(phi) and keeps it outside an interval (r_1, r_2); phi is kept where both tails of h(phi)'s
    Student-t distribution truncated to that set are at least (1 - level) / 2. Meaningful only for a
    draw that passed the condition.

    Parameters
    ----------
    gap : (...,) the pair's pooled eigengap, leading minus second (> 0).
    se_gap : (...,) its jackknife SE as the eigengap condition computes it (`eigengap_ratios`).
    local : (..., S, 2, 2) each delete-one-shard replicate's matrix of the pair in the pooled
        eigenbasis, leading direction first (the pooled matrix there is diag(lambda_1, lambda_2)).
    level : coverage level, in (0, 1).
    gap_min : the eigengap condition's threshold (`ntps_nb.core.estimators.GAP_MIN`).

    Returns
    -------
    `RotationSets`.
    """
    local = np.asarray(local, dtype=np.float64)
    if local.ndim < 3 or local.shape[-2:] != (2, 2) or local.shape[-3] < 3:
        raise ValueError(f"local must be (..., S, 2, 2) with S >= 3 replicates, got shape {local.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    S = local.shape[-3]
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    student = scipy.stats.t(S - 1)
    diff, off = local[..., 0, 0] - local[..., 1, 1], local[..., 0, 1]

    def jackknife_cov(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # the delete-one jackknife's covariance of two statistics, from `intervals._jackknife`'s deviations
        dx, dy = _jackknife(np.moveaxis(x, -1, 0))[0], _jackknife(np.moveaxis(y, -1, 0))[0]
        return ((S - 1) / S * np.sum(dx * dy, axis=0))[..., None]

    v_diff, v_off, c_diff_off = jackknife_cov(diff, diff), jackknife_cov(off, off), jackknife_cov(diff, off)
    phis = np.linspace(-np.pi / 2, np.pi / 2, SET_ANGLES, endpoint=False)
    s2, c2 = np.sin(2 * phis), np.cos(2 * phis)
    gap = np.asarray(gap, dtype=np.float64)[..., None]
    se_gap = np.asarray(se_gap, dtype=np.float64)[..., None]
    h, g = -0.5 * gap * s2, gap * c2                  # the pooled matrix in the basis of each phi
    # per replicate h(phi) = -(diff / 2) sin 2phi + off cos 2phi, g(phi) = diff cos 2phi + 2 off sin 2phi
    v_h = 0.25 * s2**2 * v_diff + c2**2 * v_off - s2 * c2 * c_diff_off
    v_g = c2**2 * v_diff + 4 * s2**2 * v_off + 4 * s2 * c2 * c_diff_off
    c_gh = -0.5 * s2 * c2 * v_diff + 2 * s2 * c2 * v_off + (c2**2 - s2**2) * c_diff_off
    se_h = np.sqrt(np.maximum(v_h, np.finfo(np.float64).tiny))
    ordered = g >= -t * np.sqrt(np.maximum(v_g, 0.0))
    fieller = (np.abs(h) <= t * se_h) & ordered
    beta = c_gh / se_h**2
    z = g - beta * h
    qa, qb, qc = beta**2 + 4, 2 * z * beta, z**2 - (gap_min * se_gap) ** 2
    root = np.sqrt(np.maximum(qb**2 - 4 * qa * qc, 0.0))
    r1, r2 = (-qb - root) / (2 * qa), (-qb + root) / (2 * qa)      # r1 = r2: nothing truncated
    below, above = student.cdf(r1 / se_h), student.sf(r2 / se_h)
    mass = below + above
    cdf, sf = student.cdf(h / se_h), student.sf(h / se_h)
    lower_tail = np.where(h <= r1, cdf, below + np.maximum(cdf - (1 - above), 0.0)) / mass
    upper_tail = np.where(h >= r2, sf, above + np.maximum(sf - (1 - below), 0.0)) / mass
    alpha = (1 - level) / 2
    selective = (lower_tail >= alpha) & (upper_tail >= alpha) & ordered
    return RotationSets(phis=phis, fieller=fieller, selective=selective)


def plane_replicates(pair: np.ndarray, factor: np.ndarray, metric: np.ndarray, shards: Sequence[Moments],
                     side: str, condition: float = 1.0) -> np.ndarray:
    """Each delete-one-shard replicate's matrix of a pair's generalized problem (A = F F', B) in the
    plane of the pooled pair, whitened by the replicate's own B there.

    The replicates' F and B enter only through their projections on the plane, which are linear in
    the moments: each shard's are taken once (P_j = pair' F_j, pair' B_j pair) and pool i's is
    sum_{j != i} n_j P_j / sum_{j != i} n_j, the text-count weights `Moments.combine` gives the pool.
    No pool is formed: one d x d product per shard instead of S - 1 additions per replicate (at
    d = 4096, one combination of 20 shards took 4.6-5.9 s on the device tool's host; there were S of them).

    Parameters
    ----------
    pair : (d, 2) the pooled eigenvectors of the pair, B-orthonormal, leading first.
    factor, metric : the pooled F and B (to check that ``pair`` diagonalises them).
    shards : the per-shard `Moments` the pooled problem combines (S of them; replicate i leaves shard i out).
    side : "U" reads (Sxy, Sxx) from each shard, "V" (C1, C0).
    condition : the pooled B's condition number on its retained range (largest over smallest retained
        eigenvalue): the check that ``pair`` diagonalises the pooled problem allows rounding of machine
        epsilon times it where that exceeds `PLANE_RTOL` (an ill-conditioned Sxx, e.g. states whose
        scales span ten decades, gives B-orthonormality to about 1e-8 only).

    Returns
    -------
    (S, 2, 2) float64; NaN for a replicate whose B is singular on the plane (or whose pool has no texts).
    """
    pooled = pair.T @ factor
    pooled = pooled @ pooled.T
    scale = max(abs(pooled[0, 0]), np.finfo(np.float64).tiny)
    tolerance = max(PLANE_RTOL, np.finfo(np.float64).eps * float(condition))
    if abs(pooled[0, 1]) > tolerance * scale or np.abs(pair.T @ metric @ pair - np.eye(2)).max() > tolerance:
        raise ValueError(f"the {side} pair does not diagonalise its pooled problem")
    names = ("Sxy", "Sxx") if side == "U" else ("C1", "C0")
    factors = np.stack([pair.T @ getattr(shard, names[0]) for shard in shards])             # (S, 2, c)
    metrics = np.stack([pair.T @ (getattr(shard, names[1]) @ pair) for shard in shards])    # (S, 2, 2)
    counts = np.array([shard.n_texts for shard in shards], dtype=np.float64)
    weights = counts[None, :] * (1.0 - np.eye(len(shards)))
    totals = weights.sum(axis=1)
    out = np.full((len(shards), 2, 2), np.nan)
    for i in np.flatnonzero(totals > 0):
        a = np.tensordot(weights[i] / totals[i], factors, axes=1)
        w, q = np.linalg.eigh(np.tensordot(weights[i] / totals[i], metrics, axes=1))
        if not w[0] > PLANE_RTOL * max(w[1], 0.0):     # the replicate's metric is singular on the plane
            continue
        inv_root = (q / np.sqrt(w)) @ q.T
        out[i] = inv_root @ (a @ a.T) @ inv_root
    return out


def ntps_over_rotations(U: Subspace, V: Subspace, k: int, phis_U: np.ndarray, phis_V: np.ndarray,
                        *, span_rtol: float = SPAN_RTOL) -> np.ndarray:
    """NTPS_theory(k) with u_{k_U} rotated towards u_{k_U + 1} by each of ``phis_U`` (Sxx inner
    product) and v_k towards v_{k + 1} by each of ``phis_V`` (C0 inner product), the pooled
    subspaces otherwise; in closed form.

    With Q an orthonormal basis of span(v_1 .. v_{k-1}) and R = (r_k, r_{k+1}) the two next-token
    directions' residuals against it (in the coordinates of `theory_geometry`), the projector onto
    V_k(psi) is Q Q' + e e', e the normalised c(psi)' R; so NTPS is a ratio of quadratic forms in
    (cos psi, sin psi) and (cos phi, sin phi). ``phis_U`` must be [0] where k_U = m (no pair) and
    ``phis_V`` [0] where k = r_V.

    Parameters
    ----------
    U, V : the pooled descending perception and next-token subspaces.
    k : number of next-token directions, 1 <= k <= r_V.
    phis_U, phis_V : (nU,), (nV,) rotations in radians.
    span_rtol : as in `theory_geometry`: a rotated v_k whose residual against span(v_1 .. v_{k-1})
        is below it (relative) adds no direction.

    Returns
    -------
    (len(phis_U), len(phis_V)) float64 in [0, 1].
    """
    m, r_V = U.rank_A, V.rank_B
    kU = min(k, m)
    if (kU >= m and np.any(phis_U != 0)) or (k >= r_V and np.any(phis_V != 0)):
        raise ValueError("a rotation needs a next direction: k_U < m for U, k < r_V for V")
    Q_r, s_r = U.range_basis, U.range_eigenvalues
    u = np.zeros((Q_r.shape[1], kU + 1))
    u[:, : min(kU + 1, m)] = Q_r.T @ U.whitened[:, : min(kU + 1, m)]
    v = np.zeros((Q_r.shape[1], k + 1))
    v[:, : min(k + 1, r_V)] = np.sqrt(s_r)[:, None] * (Q_r.T @ V.vectors[:, : min(k + 1, r_V)])
    Q = np.zeros((v.shape[0], 0))
    if k > 1:
        basis, counts = nested_orthonormal_basis(v[:, : k - 1], rtol=span_rtol)
        Q = basis[:, : counts[-1]]
    R = v[:, k - 1: k + 1] - Q @ (Q.T @ v[:, k - 1: k + 1])
    G = Q.T @ u                                  # (q, kU + 1)
    H = R.T @ u                                  # (2, kU + 1)
    fixed_Q = np.sum(G[:, : kU - 1] ** 2)
    G2, H2, Hf = G[:, kU - 1:], H[:, kU - 1:], H[:, : kU - 1]
    D = np.stack([np.cos(phis_U), np.sin(phis_U)], axis=1)      # (nU, 2)
    C = np.stack([np.cos(phis_V), np.sin(phis_V)], axis=1)      # (nV, 2)
    rotated_Q = np.einsum("ai,ij,aj->a", D, G2.T @ G2, D)
    norm = np.einsum("bi,ij,bj->b", C, R.T @ R, C)
    fixed_e = np.einsum("bi,ij,bj->b", C, Hf @ Hf.T, C)
    cross = (C @ H2 @ D.T) ** 2                                  # (nV, nU)
    # a rotated v_k inside span(v_1 .. v_{k-1}) (rank-deficient V) adds no direction
    scale = np.einsum("bi,ij,bj->b", C, v[:, k - 1: k + 1].T @ v[:, k - 1: k + 1], C)
    adds = norm > (span_rtol**2) * np.maximum(scale, np.finfo(np.float64).tiny)
    e_part = np.where(adds[:, None], (fixed_e[:, None] + cross) / np.where(adds, norm, 1.0)[:, None], 0.0)
    values = (fixed_Q + rotated_Q[None, :] + e_part) / kU
    return np.clip(values.T, 0.0, 1.0)


def _rotation_ranges(shards: list[Moments], frame: pd.DataFrame, *, level: float, gap_min: float, rtol: float,
                     solved: tuple[Subspace, Subspace] | None, plugins: np.ndarray | None = None,
                     pooled: Moments | None = None, kinds: Sequence[str] = ("fieller", "chosen"),
                     rows: pd.Series | None = None, chosen_level: float | None = None) -> pd.DataFrame:
    """Per row of ``frame`` (those where ``rows`` is True, all by default), NTPS's range over the
    rotation sets of its pairs, shifted by the row's estimate minus the pooled plug-in: over the
    Fieller sets (kind "fieller") and over the sets `rotation_interval` uses (kind "chosen": the
    selective set on a side whose eigengap ratio passed ``gap_min``, the Fieller set otherwise).
    Columns ``{kind}_lower``, ``{kind}_upper`` and ``{kind}_U`` / ``{kind}_V`` (the largest |angle|
    kept, 0 without a pair) for each of ``kinds``; NaN on rows left out, on a row with a non-finite
    interval or eigengap ratio, or with a replicate whose metric is singular on a pair's plane. A side
    whose set is empty (the test rejects every rotation, the sample's own included) is not rotated.
    Each row costs a few products of d x d matrices and a basis of its first k next-token directions,
    so `ntps_estimate` asks it of the rows its flag needs it for. ``solved``: the pooled (U, V) if
    already solved; ``plugins``: the pooled plug-in NTPS at each row's k (len(frame),) if already known
    (else a `theory_geometry` of the pooled moments gives it: an orthonormal basis of all r_V next-token
    directions, d^3 work); ``pooled``: the shards combined, if already (`Moments.combine`);
    ``chosen_level``: the level of kind "chosen"'s sets, where it differs from ``level`` (the widening's,
    `WIDENING_LEVEL`); the Fieller kind's sets are always at ``level``."""
    columns = [f"{kind}_{what}" for kind in ("fieller", "chosen") for what in ("lower", "upper", "U", "V")]
    out = pd.DataFrame(np.nan, index=frame.index, columns=columns)
    if rows is not None and not rows.any():      # nothing to compute: no pooled solve (the torch path's host)
        return out
    if pooled is None:
        pooled = Moments.combine(shards)
    if solved is None:
        solved = perception_subspace(pooled, rtol=rtol), next_token_subspace(pooled, rtol=rtol)
    U, V = solved
    if plugins is None:
        geometry = _theory_geometry_of(pooled, U, V)
        plugins = [geometry.ntps(int(k)) if k <= geometry.r_V else np.nan for k in frame["k"]]
    plugin_at = pd.Series(np.asarray(plugins, dtype=np.float64), index=frame.index)
    m, r_V = U.rank_A, V.rank_B
    planes: dict = {}
    for index, row in frame[rows if rows is not None else np.ones(len(frame), bool)].iterrows():
        k = int(row["k"])
        if not (np.isfinite(row["lower"]) and np.isfinite(row["upper"]) and np.isfinite(row["estimate"])):
            continue
        kept: dict[str, list[np.ndarray]] | None = {kind: [] for kind in kinds}
        for side, space, kk, rank in (("U", U, min(k, m), m), ("V", V, k, r_V)):
            if kk >= rank:
                for angles in kept.values():
                    angles.append(np.zeros(1))
                continue
            ratio = row[f"gap_ratio_{side}"]
            gap = space.eigenvalues[kk - 1] - space.eigenvalues[kk]
            if not (np.isfinite(ratio) and ratio > 0 and gap > 0):
                kept = None
                break
            if (side, kk) not in planes:
                factor, metric = (pooled.Sxy, pooled.Sxx) if side == "U" else (pooled.C1, pooled.C0)
                condition = space.range_eigenvalues.max() / space.range_eigenvalues.min()
                planes[side, kk] = plane_replicates(space.vectors[:, kk - 1: kk + 1], factor, metric, shards, side,
                                                    condition=condition)
            if not np.isfinite(planes[side, kk]).all():
                kept = None
                break
            sets = rotation_sets(gap, gap / ratio, planes[side, kk], level=level, gap_min=gap_min)
            chosen = (sets if chosen_level is None or chosen_level == level or "chosen" not in kinds else
                      rotation_sets(gap, gap / ratio, planes[side, kk], level=chosen_level, gap_min=gap_min))
            choice = {"fieller": sets.fieller, "chosen": chosen.selective if ratio >= gap_min else chosen.fieller}
            for kind in kinds:
                kept[kind].append(sets.phis[choice[kind]] if choice[kind].any() else np.zeros(1))
        if kept is None:
            continue
        shift = row["estimate"] - plugin_at[index]
        for kind, (phis_U, phis_V) in kept.items():
            values = ntps_over_rotations(U, V, k, phis_U, phis_V)
            out.loc[index, [f"{kind}_lower", f"{kind}_upper", f"{kind}_U", f"{kind}_V"]] = (
                values.min() + shift, values.max() + shift, float(np.abs(phis_U).max()), float(np.abs(phis_V).max()))
    return out


def rotation_interval(moment_shards: Sequence[Moments], frame: pd.DataFrame, *, level: float, gap_min: float,
                      rtol: float, solved: tuple[Subspace, Subspace] | None = None,
                      ranges: pd.DataFrame | None = None) -> pd.DataFrame:
    """`ntps_estimate`'s frame with each row's interval widened over the rotation sets (module docstring).

    Per row: each side with a next direction (U: k_U < m, V: k < r_V) gets the selective set of
    `rotation_sets` where its eigengap ratio passed ``gap_min`` and the Fieller set otherwise; NTPS
    over every pair of kept rotations (`ntps_over_rotations`) is shifted by the row's estimate minus
    the pooled plug-in and joined with the row's jackknife-t interval. A side whose set is empty (the
    test rejects every rotation, the sample's own included) is not rotated. Rows with a non-finite
    interval or eigengap ratio, or a replicate whose metric is singular on a pair's plane, keep their
    interval (``rotation_U`` / ``rotation_V`` NaN). The flag is left as it was.

    Parameters
    ----------
    moment_shards : the shards the frame was computed from.
    frame : `ntps_estimate`'s frame (jackknife intervals).
    level, gap_min, rtol : as in `ntps_estimate`.
    solved : the pooled (U, V) if already solved.
    ranges : the rows' ranges if already computed (`_rotation_ranges` of the same frame).

    Returns
    -------
    The frame with ``lower`` / ``upper`` widened, the jackknife interval kept as ``lower_jackknife`` /
    ``upper_jackknife``, ``rotation_U`` / ``rotation_V`` (the largest |angle| kept, radians; 0 without
    a pair) and ``interval`` = "rotation".
    """
    if ranges is None:
        ranges = _rotation_ranges(list(moment_shards), frame, level=level, gap_min=gap_min, rtol=rtol, solved=solved)
    out = _widened(frame, ranges, kept="jackknife")
    out["interval"] = "rotation"
    return out


def _widened(frame: pd.DataFrame, ranges: pd.DataFrame, *, kept: str, rows: pd.Series | None = None) -> pd.DataFrame:
    """``frame`` with ``lower`` / ``upper`` joined with NTPS's range over the sets `rotation_interval` uses
    (``ranges``' kind "chosen", from `_rotation_ranges`) on ``rows`` (all by default) where that range was
    computed, the interval before as ``lower_{kept}`` / ``upper_{kept}``, and ``rotation_U`` / ``rotation_V``
    (the largest |angle| kept; NaN on the rows left as they were)."""
    out = frame.copy()
    out[f"lower_{kept}"], out[f"upper_{kept}"] = frame["lower"], frame["upper"]
    done = ranges["chosen_lower"].notna() & (True if rows is None else rows.astype(bool))
    out.loc[done, "lower"] = np.minimum(frame.loc[done, "lower"], ranges.loc[done, "chosen_lower"])
    out.loc[done, "upper"] = np.maximum(frame.loc[done, "upper"], ranges.loc[done, "chosen_upper"])
    out["rotation_U"] = ranges["chosen_U"].where(done)
    out["rotation_V"] = ranges["chosen_V"].where(done)
    return out


def widened_rows(frame: pd.DataFrame) -> pd.Series:
    """Which rows of an `ntps_estimate` frame (or a study's estimates table) `rotation_widening` widened: those
    with the interval before it (``lower_unwidened``) and a rotation range (``rotation_U``); False everywhere in a
    frame computed without the widening.

    Parameters
    ----------
    frame : `ntps_estimate`'s frame, or rows of it.

    Returns
    -------
    Boolean Series on ``frame``'s index.
    """
    if "lower_unwidened" not in frame.columns or "rotation_U" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["rotation_U"].notna()


def interval_description(kind: str, widened: bool = False, widening_level: float | None = None,
                         stationary_widened: bool | float = False) -> str:
    """How the study's report and the notebooks' layer profiles name a row's interval (after its level).

    Parameters
    ----------
    kind : the row's interval, one of `INTERVALS`.
    widened : whether `rotation_widening` widened the row (`widened_rows`).
    widening_level : the level of the rotation sets it was widened over (the row's ``widening_level``); None or
        NaN: not known (a table written before the column), not named.
    stationary_widened : whether `ntps_nb.core.estimators.stationary_widening` moved an end of the row (its
        ``stationary_widened``; NaN, a table written before the column, reads as False).

    Returns
    -------
    `INTERVAL_DESCRIPTIONS` of ``kind``, with `WIDENED_DESCRIPTION` after it where ``widened``, e.g. "...,
    widened over ... cannot reject (rotation sets at 60%)" (a "rotation" interval is widened already and is named as
    it is), and `STATIONARY_DESCRIPTION` after that where ``stationary_widened``.
    """
    text = INTERVAL_DESCRIPTIONS[kind]
    if widened and kind != "rotation":
        known = widening_level is not None and np.isfinite(widening_level)
        text = f"{text}, {WIDENED_DESCRIPTION}" + (f" (rotation sets at {widening_level:.0%})" if known else "")
    if pd.notna(stationary_widened) and bool(stationary_widened):
        text = f"{text}, {STATIONARY_DESCRIPTION}"
    return text


def rotation_widening(moment_shards: Sequence[Moments], frame: pd.DataFrame, *, level: float, gap_min: float,
                      rtol: float, solved: tuple[Subspace, Subspace] | None = None,
                      ranges: pd.DataFrame | None = None, widening_level: float | None = None) -> pd.DataFrame:
    """`ntps_estimate`'s frame with the interval of each reliable row widened over the rotations of the pairs at k
    (`ntps_estimate`'s ``rotation_widening``, an option since session 60, its default since session 63).

    The flag's eigengap condition accepts, in a population whose eigenvalues at k are nearly tied, the few draws
    whose noise inflated the sample gap, and so rotated the eigenvector furthest; there the rows it accepts
    under-cover (docs/estimator.md, "Why the near-tied design fails", and "The default interval widened over the
    rotation sets"). Those rows are the ones the selective set of `rotation_interval` was built for: the rotations a
    test conditioned on the row having passed the eigengap condition cannot reject. On each reliable row NTPS's range
    over those sets (the Fieller set on a side whose eigengap ratio did not pass), shifted by the estimator's
    correction, is joined with the row's interval, whatever that interval is (the quadratic one by default). Rows
    the flag refuses keep their interval; the flag does not change. Near the eigengap threshold a population whose
    eigenvalues at k are well apart gives rows the data cannot tell from those, so there the widened interval
    over-covers; it is the default all the same, because where the flag seldom accepts a population's draws the
    interval alone under-covers and a row cannot tell which kind of population it came from (docs/estimator.md,
    "Rare acceptance"). The sets are at ``widening_level``: in `ntps_estimate` `WIDENING_LEVEL` (0.6) since session
    64, not the interval's level, which keeps the rarely accepted rows' coverage in the band and takes most of the
    over-coverage away (docs/estimator.md, "The widening's level").

    Parameters
    ----------
    moment_shards, level, gap_min, rtol, solved : as in `rotation_interval`.
    frame : `ntps_estimate`'s frame, its flag computed.
    ranges : the rows' ranges if already computed (`_rotation_ranges` of the same frame with kind "chosen", at least
        on its reliable rows, its sets at ``widening_level``).
    widening_level : the level of the rotation sets (`WIDENING_LEVEL` in `ntps_estimate`); None: ``level``.

    Returns
    -------
    The frame with ``lower`` / ``upper`` widened on the reliable rows, the interval before as ``lower_unwidened`` /
    ``upper_unwidened``, ``rotation_U`` / ``rotation_V`` (the largest |angle| kept, radians, 0 without a pair;
    NaN on the rows not widened) and ``widening_level`` (the sets' level, on every row).
    """
    reliable = frame["reliable"].astype(bool)
    if ranges is None:
        ranges = _rotation_ranges(list(moment_shards), frame, level=level, gap_min=gap_min, rtol=rtol, solved=solved,
                                  kinds=("chosen",), rows=reliable, chosen_level=widening_level)
    widened = _widened(frame, ranges, kept="unwidened", rows=reliable)
    return widened.assign(widening_level=level if widening_level is None else widening_level)


def rotation_stability(moment_shards: Sequence[Moments], frame: pd.DataFrame, *, level: float, gap_min: float,
                       rtol: float, solved: tuple[Subspace, Subspace] | None = None,
                       ranges: pd.DataFrame | None = None) -> pd.DataFrame:
    """`ntps_estimate`'s frame with the flag's rotation condition: ``rotation_stable`` where NTPS's
    range over the Fieller sets of the rotation of the pairs at k (test inversion, valid over all
    draws: no conditioning on the flag) lies inside the row's jackknife-t interval, up to
    `STABLE_ATOL`; ``reliable`` is and-ed with it.

    The jackknife-t interval is a linearisation of the estimate in the shards' noise; where the pair
    at k is nearly tied, the rotation of its eigenvector is not linear in that noise and the rows
    the eigengap condition accepts are those the noise has rotated furthest (docs/estimator.md, "Why
    the near-tied design fails"). The condition asks the data whether the linearisation holds at
    this row: if a rotation the shards cannot reject moves NTPS outside the interval, the interval
    is not read as calibrated. The ranges are computed on the rows the other conditions accept
    (``reliable`` on entry; elsewhere NaN and not ``rotation_stable``: the condition cannot make them
    reliable, and a study's k = "all" at a large d would pay a basis of k directions per row); rows
    where they cannot be computed (a non-finite interval or eigengap ratio, a replicate's metric
    singular on a pair's plane) are not ``rotation_stable``.

    Parameters
    ----------
    moment_shards, frame, level, gap_min, rtol, solved, ranges : as in `rotation_interval`
        (``frame`` with its jackknife-t interval and flag; ``ranges`` at least on its reliable rows).

    Returns
    -------
    The frame with ``rotation_lower`` / ``rotation_upper`` (the Fieller range, shifted by the
    estimator's correction; NaN where not computed), ``rotation_stable`` and ``reliable`` updated.
    """
    if ranges is None:
        ranges = _rotation_ranges(list(moment_shards), frame, level=level, gap_min=gap_min, rtol=rtol, solved=solved,
                                  kinds=("fieller",), rows=frame["reliable"].astype(bool))
    out = frame.copy()
    out["rotation_lower"], out["rotation_upper"] = ranges["fieller_lower"], ranges["fieller_upper"]
    inside = ((ranges["fieller_lower"] >= frame["lower"] - STABLE_ATOL)
              & (ranges["fieller_upper"] <= frame["upper"] + STABLE_ATOL))
    out["rotation_stable"] = inside.fillna(False).astype(bool) & frame["reliable"].astype(bool)
    out["reliable"] = out["rotation_stable"]      # the other conditions and the range inside the interval
    return out
