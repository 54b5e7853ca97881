"""The jackknife-t interval of "richardson" without the jackknife's excess on the quadratic part of
the error (`ntps_estimate`'s ``interval="quadratic"``).

Where the population NTPS is stationary (at 0 or 1, or inside (0, 1) with every principal angle
between U_k and V_k at 0 or 90 degrees) the estimate's error is quadratic in the shards' noise, and
the delete-one-shard jackknife counts that part about 2.3-2.7 times over (S = 10-20 shards): the
jackknife-t interval over-covers there, which is why the reliability flag has had its bound
condition (`ntps_nb.core.estimators.flag_at_bound`), whose selection biases the rows it keeps near
0 and 1 (docs/estimator.md, "The bias at the edges of [0, 1]"). This interval removes the excess
from the variance, and the flag that goes with it has no bound condition.

The construction (docs/estimator.md, "A variance without the jackknife's quadratic excess").
Expand the plug-in F to second order in the shards' deviations z_i from the population (S equal
shards; z_i the deviation of shard i's mean moments, with covariance Omega): an estimator that
combines plug-ins on weighted poolings of the shards has the error sum_i a_i g'z_i + sum_ij M_ij
z_i'H z_j, with H the Hessian of F in the moments. Richardson's M has a zero diagonal (that is what
removes the plug-in's 1 / N bias), so its quadratic part has variance 2 tr(M^2) T, T = tr((H
Omega)^2), for any distribution of the shards, and the jackknife's expectation of that part is
(S - 1) / S sum_i 2 tr((M_(i) - mean)^2) T, M_(i) the coefficients of the replicate without shard i
(its split fixed, as the estimator's jackknife keeps it). `quadratic_factors` computes both from the
split. T is estimated without bias from the plug-in's interaction contrasts between shards of
different halves (`interaction_T`): with m the pooled moments and d_i the change leaving shard i out,
F(m + d_i + d_j) - F(m + d_i) - F(m + d_j) + F(m) = d_i'H d_j = (z_i - zbar)'H(z_j - zbar) / (S - 1)^2 to
second order, and the double differences G_ij - G_il - G_kj + G_kl of G = (S - 1)^2 times the
contrasts are (z_i - z_k)'H(z_j - z_l): the unknown population drops out (|A| |B| more plug-ins, from at
most `INTERACTION_HALF` = 5 shards of each half: 25 at 10 shards and at 20). The variance is max(J -
(jackknife - variance) T, J variance / jackknife), J the jackknife's: at most the whole excess is removed, and
never more than a purely quadratic error would have.

The difference J - excess is noisier than J where the excess is a large part of it (T-hat comes from the
interactions of at most 5 x 5 shard pairs): the interval's Student t has the Satterthwaite degrees of
freedom of that difference (`satterthwaite_df`), J counted on S - 1 and T-hat's variance from a
delete-one-shard jackknife over the same interactions (`interaction_T_variance`, no further plug-in).
Without them the rows whose estimated quadratic share of the variance was above 0.2 (not
at the floor) covered 0.54-0.83 in interior cells of the map while their cells covered 0.85-0.95
(docs/estimator.md, "The quadratic interval's degrees of freedom").

What it does on known truth (docs/estimator.md, "A variance without the jackknife's quadratic excess" to
"The quadratic interval's degrees of freedom"): on a quadratic toy T is recovered
within Monte Carlo error and the interval covers 0.86-0.95 where the quadratic part spreads over
several directions; on the generators it brings part of the stationary cells into [0.85, 0.95],
unbiased, and leaves the rest conservative (there |error| / SE is not Student's t: the SE grows with
the error, or the error is peaked); with the degrees of freedom, away from stationary points it covers
about as the plain jackknife does (0.92 pooled on the map; 0.88 without them). On the whole map
(docs/estimator.md, "The whole map with the Satterthwaite default"):
on every row meeting the flag's noise and eigengap conditions the stationary cells of the map and of the
d = 16 checks cover 0.93-0.95, none above 0.95; the conservative cells are the flag's selection, and on
the local model itself the interval over-covers only where the quadratic part has rank 1 or 2 (0.97-0.99).
The rows at the floor (``quadratic_excess`` = J (1 - variance / jackknife), ``df`` = S - 1) are the
least covered rows away from stationary points: on the local model with the quadratic part half the
variance or less they cover 0.58-0.80, the rest 0.95-0.99, all of them together 0.905-0.920.
T-hat from at most 5 shards of each half (`INTERACTION_HALF`): at 20 shards 25 plug-ins instead
of 100, coverage as with every shard on the local model and on 29 designs at d = 16 and 64, widths 5-6% more on
average (docs/estimator.md, "The interactions from five shards of each half").
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from ntps_nb.core.moments import Moments

#: Shards each half of richardson's split needs for `interaction_T` (a difference within each half).
MIN_HALF = 2
#: A jackknife SE at most this is rounding of an estimate the shards do not move (NTPS lies in [0, 1]; e.g.
#: NTPS = 1 at k >= r): the Satterthwaite ratio of two rounding errors is arbitrary (numpy and torch differ),
#: so such a row keeps S - 1 degrees of freedom, as at the floor.
SETTLED_SE = 1e-12
#: At most this many shards of each half of richardson's split enter T-hat's interactions (the first of each
#: half, `interaction_halves`): T-hat is unbiased from any of them, and the interactions cost one plug-in per
#: pair (25 at this cap; 100 with every shard at 20 shards). 5 x 5 is what the interval was checked with on the
#: estimator map (10 shards); at 20 shards, on the local model and on 29 generator designs at d = 16 and 64, the cap
#: leaves coverage as it was and widens intervals by 5-6% on average (docs/estimator.md, "The interactions
#: from five shards of each half").
INTERACTION_HALF = 5
#: Rounding allowed in the trace of richardson's quadratic coefficients (zero: no 1 / N bias; entries are O(1 / S^2)).
TRACE_ATOL = 1e-12


def _coefficients(weights: Sequence[np.ndarray], factors: Sequence[float]) -> np.ndarray:
    """(S, S) quadratic coefficients of sum_p factors[p] F(sum_i weights[p][i] z_i) for F(x) = x'Hx / 2."""
    return sum(f * np.outer(w, w) / 2 for w, f in zip(weights, factors))


def _richardson_coefficients(n_shards: int, a: np.ndarray, b: np.ndarray, drop: int | None) -> np.ndarray:
    """M of richardson on equal shards (less ``drop``) with the split a | b, the split fixed."""
    from ntps_nb.core.estimators import _richardson_combination

    parts = [[i for i in range(n_shards) if i != drop], [i for i in a if i != drop], [i for i in b if i != drop]]
    weights = []
    for part in parts:
        w = np.zeros(n_shards)
        w[part] = 1.0 / len(part)
        weights.append(w)
    # richardson is linear in its three plug-ins: its coefficient on each is that of a unit plug-in
    full, *halves = np.eye(3)
    combination = _richardson_combination(full, list(halves), [len(p) for p in parts[1:]], len(parts[0]))
    return _coefficients(weights, combination)


@functools.lru_cache(maxsize=64)  # a function of the split alone; ntps_estimate asks for it twice a call
def quadratic_factors(n_shards: int, seed: int) -> tuple[float, float]:
    """Richardson's quadratic error against T = tr((H Omega)^2), exactly, for equal shards.

    With an even number of shards the halves are equal and richardson's coefficients M have a zero
    diagonal, so the factors hold for any distribution of the shards. With an odd number the halves
    differ by a shard and M keeps a diagonal (its trace, the 1 / N bias, is still zero, in every
    replicate too): the factors are then exact for Gaussian shard means (the diagonal adds a fourth-moment
    term, which averaging the texts of a shard makes small) and were checked against a brute-force
    simulation (tests/core/test_quadratic.py) and on the estimator map (docs/estimator.md, "Crashes on an
    ill-conditioned Sxx and on odd shard counts").

    Parameters
    ----------
    n_shards : number of shards S (each half of the split needs at least `MIN_HALF`).
    seed : the seed of richardson's split (`ntps_nb.core.estimators.split_halves`).

    Returns
    -------
    (variance, jackknife) : the quadratic part of the estimate has variance ``variance * T`` and the
        delete-one-shard jackknife variance's expectation of it is ``jackknife * T``
        (variance = 1 / S^2 and jackknife / variance = 2.670 at S = 10).
    """
    from ntps_nb.core.estimators import split_halves

    a, b = split_halves(n_shards, seed)
    if min(len(a), len(b)) < MIN_HALF:
        raise ValueError(f"the quadratic interval needs at least {MIN_HALF} shards in each half of the split "
                         f"(at least {2 * MIN_HALF} shards), got {n_shards}")
    M = _richardson_coefficients(n_shards, a, b, None)
    replicates = np.array([_richardson_coefficients(n_shards, a, b, i) for i in range(n_shards)])
    # richardson's 1 / N term is the trace (E z'Mz = tr(M) tr(H Omega)): a programming error if not removed
    if max(abs(np.trace(M)), np.abs(np.trace(replicates, axis1=1, axis2=2)).max()) > TRACE_ATOL:
        raise RuntimeError("richardson's quadratic coefficients keep a 1 / N term")
    centred = replicates - replicates.mean(axis=0)
    jackknife = (n_shards - 1) / n_shards * 2 * float(np.einsum("sij,sji->", centred, centred))
    return 2 * float(np.trace(M @ M)), jackknife


def interaction_halves(n_shards: int, seed: int, half: int | None = INTERACTION_HALF
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The shards of each half of richardson's split whose interactions T-hat is read from.

    Parameters
    ----------
    n_shards : number of shards S.
    seed : the seed of richardson's split (`ntps_nb.core.estimators.split_halves`).
    half : at most this many shards of each half, the first (None: all of them); at least `MIN_HALF`.

    Returns
    -------
    (a, b) : sorted shard indices, one array per half.
    """
    from ntps_nb.core.estimators import split_halves

    if half is not None and (isinstance(half, bool) or not isinstance(half, (int, np.integer)) or half < MIN_HALF):
        raise ValueError(f"the interactions need at least {MIN_HALF} shards of each half (an integer, or None for "
                         f"every shard), got interaction_half={half!r}")
    a, b = split_halves(n_shards, seed)
    return (a, b) if half is None else (a[:half], b[:half])


def interaction_T(G: np.ndarray) -> np.ndarray:
    """Unbiased T = tr((H Omega)^2) from the interactions G[i, j] = (z_i - zbar)'H (z_j - zbar) between
    shard i of one half and shard j of the other.

    The mean over i != k (one half) and j != l (the other) of (G_ij - G_il - G_kj + G_kl)^2 / 4: each
    double difference is (z_i - z_k)'H(z_j - z_l), free of zbar, with expectation of the square 4 T
    for independent shards.

    Parameters
    ----------
    G : (A, B, ...) interactions, A and B at least `MIN_HALF`; trailing axes (e.g. k) are kept.

    Returns
    -------
    (...) array: the estimate of T (NaN where an interaction is NaN).
    """
    G = np.asarray(G, dtype=np.float64)
    if G.shape[0] < MIN_HALF or G.shape[1] < MIN_HALF:
        raise ValueError(f"interaction_T needs at least {MIN_HALF} shards in each half, got {G.shape[:2]}")
    quads = np.array([(i, k, j, m) for i, k in itertools.permutations(range(G.shape[0]), 2)
                      for j, m in itertools.permutations(range(G.shape[1]), 2)])
    i, k, j, m = quads.T
    return np.mean((G[i, j] - G[i, m] - G[k, j] + G[k, m]) ** 2, axis=0) / 4


def contrast_counts(n_texts: np.ndarray, seed: int, half: int | None = INTERACTION_HALF
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted poolings whose plug-ins the interactions need: m + d_i + d_j for i in one half of
    richardson's split and j in the other (at most ``half`` shards of each, `interaction_halves`).

    m + d_i + d_j is the pooling with text shares p_(i) + p_(j) - p (p the pooled shares, p_(i) those
    without shard i), all positive.

    Parameters
    ----------
    n_texts : (S,) texts per shard.
    seed : the seed of richardson's split.
    half : at most this many shards of each half (None: all).

    Returns
    -------
    (counts, a, b) : (|a| |b|, S) multiplicities of each shard (`Moments.combine`'s weights), row
        i_a * |b| + j_b for the pair (a[i_a], b[j_b]); the shards of the two halves taken.
    """
    n = np.asarray(n_texts, dtype=np.float64)
    S = n.size
    a, b = interaction_halves(S, seed, half)
    share = n / n.sum()
    without = [np.where(np.arange(S) == i, 0.0, n / (n.sum() - n[i])) for i in range(S)]
    counts = np.array([(without[i] + without[j] - share) / share for i in a for j in b])
    return counts, a, b


def interactions(pooled: np.ndarray, left_out: np.ndarray, contrasts: np.ndarray, n_shards: int,
                 seed: int, half: int | None = INTERACTION_HALF) -> np.ndarray:
    """The interactions G[i, j] = (z_i - zbar)'H (z_j - zbar) between shard i of one half of richardson's
    split and shard j of the other (at most ``half`` of each), from the plug-in's contrasts (to second order).

    Parameters
    ----------
    pooled : (K,) the plug-in on all shards.
    left_out : (S, K) the plug-in without shard i (row i).
    contrasts : (|a| |b|, K) the plug-in on the rows of `contrast_counts`.
    n_shards, seed : S and the seed of richardson's split.
    half : at most this many shards of each half, as for `contrast_counts`.

    Returns
    -------
    (|a|, |b|, K) array (NaN where a plug-in is NaN).
    """
    a, b = interaction_halves(n_shards, seed, half)
    contrasts = np.asarray(contrasts, dtype=np.float64).reshape(len(a), len(b), -1)
    left_out = np.asarray(left_out, dtype=np.float64)
    G = contrasts - left_out[a][:, None] - left_out[b][None, :] + np.asarray(pooled)[None, None]
    return G * (n_shards - 1) ** 2


def interaction_T_variance(G: np.ndarray) -> np.ndarray:
    """Delete-one-shard jackknife variance of `interaction_T` (G).

    Leaving a shard out drops its row (one half) or column (the other half) of G: the double
    differences are free of the shards' mean, so no further plug-in is needed. Each half needs at
    least ``MIN_HALF + 1`` shards; with fewer the variance is NaN (the caller then keeps S - 1 degrees
    of freedom).

    Parameters
    ----------
    G : (A, B, ...) interactions, as for `interaction_T`.

    Returns
    -------
    (...) array: (S - 1) / S sum_i (T_(i) - mean)^2 over the S = A + B replicates.
    """
    G = np.asarray(G, dtype=np.float64)
    A, B = G.shape[:2]
    if min(A, B) < MIN_HALF + 1:
        return np.full(G.shape[2:], np.nan)
    replicates = np.array([interaction_T(np.delete(G, i, axis=0)) for i in range(A)]
                          + [interaction_T(np.delete(G, j, axis=1)) for j in range(B)])
    S = A + B
    return (S - 1) / S * np.sum((replicates - replicates.mean(axis=0)) ** 2, axis=0)


def satterthwaite_df(J: np.ndarray, excess: np.ndarray, excess_variance: np.ndarray, floored: np.ndarray,
                     n_shards: int) -> np.ndarray:
    """Degrees of freedom of the variance J - excess (Satterthwaite), at most S - 1.

    J is read as a scaled chi-square on S - 1 degrees of freedom (variance 2 J^2 / (S - 1)) and the
    excess as independent of it with variance ``excess_variance``: df = 2 (J - excess)^2 / (2 J^2 /
    (S - 1) + excess_variance). Where the variance is at its floor J variance / jackknife (``floored``),
    or the excess' variance is unknown (NaN), S - 1: the floor is a multiple of J; and where sqrt(J) is at
    most `SETTLED_SE` (rounding of an estimate that does not move), S - 1.

    Parameters
    ----------
    J : (K,) jackknife variances.
    excess : (K,) the excess removed, (jackknife - variance) T-hat.
    excess_variance : (K,) its variance, (jackknife - variance)^2 `interaction_T_variance`.
    floored : (K,) bool, rows at the floor.
    n_shards : S.

    Returns
    -------
    (K,) float array in [1, S - 1] (NaN where J is NaN).
    """
    J, excess, excess_variance = (np.asarray(x, dtype=np.float64) for x in (J, excess, excess_variance))
    full = float(n_shards - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = 2 * (J - excess) ** 2 / (2 * J ** 2 / full + excess_variance)
    settled = J <= SETTLED_SE ** 2
    df = np.where(np.asarray(floored) | np.isnan(excess_variance) | settled, full, np.clip(df, 1.0, full))
    return np.where(np.isnan(J), np.nan, df)


def numpy_plugins(moment_shards: Sequence[Moments], ks: np.ndarray, rtol: float
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """A solver of `quadratic_interval`: the theory plug-in at ``ks`` on each row of a count matrix, in numpy.

    Parameters
    ----------
    moment_shards : the per-shard `Moments`.
    ks : (K,) numbers of next-token directions.
    rtol : as in `ntps_nb.core.score.theory_geometry`.

    Returns
    -------
    A function of an (n, S) count matrix (`Moments.combine`'s weights per row) returning the (n, K)
    plug-ins, a NaN row where the geometry is undefined.
    """
    from ntps_nb.core.intervals import theory_values
    from ntps_nb.core.score import theory_geometry

    def solve(counts: np.ndarray) -> np.ndarray:
        values = np.full((len(counts), len(ks)), np.nan)
        for row, weights in enumerate(counts):
            try:
                values[row] = theory_values(theory_geometry(Moments.combine(list(moment_shards), weights),
                                                            rtol=rtol), ks)
            except (ValueError, np.linalg.LinAlgError):
                pass
        return values

    return solve


def quadratic_interval(moment_shards: Sequence[Moments], frame: pd.DataFrame, *, level: float, seed: int,
                       noise_max: float, gap_min: float, solve: Callable[[np.ndarray], np.ndarray],
                       pooled: np.ndarray | None = None, left_out: np.ndarray | None = None,
                       T_variance: Callable[[np.ndarray], np.ndarray] | None = None,
                       interaction_half: int | None = INTERACTION_HALF) -> pd.DataFrame:
    """`ntps_estimate`'s richardson frame with the quadratic interval and its flag.

    The standard error becomes sqrt(max(J - excess, J variance / jackknife)), the excess (jackknife -
    variance) T-hat (`quadratic_factors`, `interactions`, `interaction_T`), the interval the Student-t
    interval on it with the Satterthwaite degrees of freedom of J - excess (`satterthwaite_df`: the
    excess' variance from `interaction_T_variance`; S - 1 at the floor); ``reliable`` is the flag's
    conditions on that interval without the bound condition: a finite interval meeting [0, 1],
    subspace noise per direction at most ``noise_max`` and the eigengap ratio at least ``gap_min``
    (the rotation condition, where asked, is applied after, on this interval). ``at_bound`` is recomputed on the new standard error
    and reported, not and-ed in.

    Parameters
    ----------
    moment_shards : the per-shard `Moments` the frame was computed from (at least 4).
    frame : `ntps_estimate`'s frame of the "richardson" estimator, before its rotation condition.
    level, seed, noise_max, gap_min : as in `ntps_estimate`.
    solve : the plug-in at the frame's ks on each row of an (n, S) count matrix (`numpy_plugins`, or
        the torch backend's replicates).
    pooled, left_out : (K,) and (S, K) plug-ins on all shards and without each, where the caller has
        them (else solved through ``solve``).
    T_variance : T-hat's variance from the interactions, for the degrees of freedom (default
        `interaction_T_variance`; `benchmarks/quadratic_toy_check.py` passes an unbiased one to compare).
    interaction_half : at most this many shards of each half enter T-hat (`interaction_halves`; None: all,
        |A| |B| plug-ins).

    Returns
    -------
    The frame with se, lower, upper, reliable and at_bound replaced, and interval ("quadratic"),
    se_jackknife, lower_jackknife, upper_jackknife, quadratic_excess (the variance removed) and df (the
    interval's degrees of freedom).
    """
    from ntps_nb.core.estimators import flag_at_bound, flag_conditions

    shards = list(moment_shards)
    S = len(shards)
    if set(frame["estimator"]) != {"richardson"}:
        raise ValueError("interval='quadratic' is derived for the 'richardson' estimator (its error has no "
                         f"diagonal quadratic term); got {sorted(set(frame['estimator']))}")
    n_texts = np.array([s.n_texts for s in shards])
    counts, _, _ = contrast_counts(n_texts, seed, interaction_half)
    if pooled is None or left_out is None:
        base = solve(np.vstack([np.ones(S), 1.0 - np.eye(S)]))
        pooled, left_out = base[0], base[1:]
    G = interactions(pooled, left_out, solve(counts), S, seed, interaction_half)
    variance, jackknife = quadratic_factors(S, seed)
    excess = (jackknife - variance) * interaction_T(G)
    J = frame["se"].to_numpy(dtype=float) ** 2
    floor = J * variance / jackknife
    with np.errstate(invalid="ignore"):
        floored = J - excess <= floor
        narrowed = np.maximum(J - excess, floor)
    T_var = (interaction_T_variance if T_variance is None else T_variance)(G)
    df = satterthwaite_df(J, excess, (jackknife - variance) ** 2 * T_var, floored, S)
    se = np.sqrt(narrowed)
    t = scipy.stats.t.ppf((1 + level) / 2, np.where(np.isnan(df), S - 1, df))
    estimate = frame["estimate"].to_numpy(dtype=float)
    lower, upper = estimate - t * se, estimate + t * se
    reliable = flag_conditions(lower, upper, frame["subspace_noise"], frame["gap_ratio"], noise_max=noise_max,
                               gap_min=gap_min)
    out = frame.assign(interval="quadratic", se_jackknife=frame["se"], lower_jackknife=frame["lower"],
                       upper_jackknife=frame["upper"], se=se, lower=lower, upper=upper,
                       quadratic_excess=J - narrowed, df=df)
    at_bound = flag_at_bound(out.assign(reliable=True))["at_bound"].to_numpy()
    return out.assign(reliable=reliable, at_bound=at_bound)


# ---------------------------------------------------------------------------------------------
# The local model the construction is derived for, as known truth for its checks: a statistic F of the
# shards' mean deviations z (draws, S, p), richardson on its poolings (tests/core/test_quadratic.py,
# benchmarks/quadratic_toy_check.py).


def local_poolings(z: np.ndarray, F: Callable[[np.ndarray], np.ndarray], counts: np.ndarray,
                   n_texts: np.ndarray | None = None) -> np.ndarray:
    """F on each count row's pooling of the shard means (weights: counts times ``n_texts``, normalised;
    equal shards without ``n_texts``), as `numpy_plugins` pools moments: a ``solve`` of `quadratic_interval`.

    Parameters
    ----------
    z : (draws, S, p) the shards' mean deviations.
    F : the statistic, from (draws, p) to (draws,).
    counts : (rows, S) weights per shard.
    n_texts : (S,) texts per shard, or None.

    Returns
    -------
    (rows, draws) float array.
    """
    shares = np.asarray(counts, dtype=np.float64) if n_texts is None else counts * np.asarray(n_texts)
    shares = shares / shares.sum(axis=1, keepdims=True)
    return np.array([F(np.einsum("s,nsp->np", row, z)) for row in shares])


def local_richardson(z: np.ndarray, F: Callable[[np.ndarray], np.ndarray], a: Sequence[int], b: Sequence[int],
                     drop: int | None = None) -> np.ndarray:
    """richardson of F on the shard means, from F on the pooling and on the halves.

    Parameters
    ----------
    z : (draws, S, p) the shards' mean deviations.
    F : the statistic, from (draws, p) to (draws,).
    a, b : the shards of the two halves (`ntps_nb.core.estimators.split_halves`).
    drop : a shard left out of the pooling and its half (a delete-one-shard replicate), or None.

    Returns
    -------
    (draws,) float array.
    """
    from ntps_nb.core.estimators import _richardson_combination

    parts = [[i for i in range(z.shape[1]) if i != drop], [i for i in a if i != drop], [i for i in b if i != drop]]
    values = [F(z[:, part].mean(axis=1)) for part in parts]
    return _richardson_combination(values[0], values[1:], [len(p) for p in parts[1:]], len(parts[0]))


def local_jackknife_variance(z: np.ndarray, F: Callable[[np.ndarray], np.ndarray], a: Sequence[int],
                             b: Sequence[int]) -> np.ndarray:
    """The delete-one-shard jackknife variance of `local_richardson` (the split fixed, as the estimator's
    jackknife keeps it).

    Parameters
    ----------
    z, F, a, b : as in `local_richardson`.

    Returns
    -------
    (draws,) float array.
    """
    S = z.shape[1]
    loo = np.array([local_richardson(z, F, a, b, drop=i) for i in range(S)])
    return (S - 1) / S * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0)
