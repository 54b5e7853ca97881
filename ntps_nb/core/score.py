"""The Next Token Perception Score, in its two variants (SPEC section 4).

NTPS(k) = ||P_V U||_F^2 / ||U||_F^2: how much of the perception subspace U lies inside the
next-token subspace V.

``variant="theory"`` (default) is the quantity the excess-loss bounds are about: top-k (descending)
directions, coordinates whitened by Sxx, only the m = rank(Sxy Sxy^T) directions of U that carry
label signal, NTPS = ||Pt Ut||_F^2 / min(k, m).

``variant="reference"`` follows the released code step by step: float32 moments, ascending
eigenvalue order, the first int(f * r) columns for f in np.arange(0.05, 1.0, 0.05), raw
coordinates, B-normalised U columns. It is ill-posed when rank(Sxy Sxy^T) < r_U (see SPEC
section 4 and `ntps_nb.diagnostics`); it exists to compare with the published numbers.

Sweeps over all k cost one factorisation: V's columns are orthonormalised once, nested, and
||P_k u||^2 is a cumulative sum of squared coordinates.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

from ntps_nb.core.backends import estimator_backend
from ntps_nb.core.moments import Moments
from ntps_nb.core.subspaces import (
    A_RANK_RTOL,
    RANGE_RTOL,
    REFERENCE_ABS_TOL,
    Subspace,
    nested_orthonormal_basis,
    next_token_subspace,
    perception_subspace,
    check_labels,
    generalized_eigh,
    negative_reach,
)

Variant = Literal["theory", "reference"]
Precision = Literal["float32", "float64"]

#: The 19 fractions of the released code, generated exactly as it does (float rounding included).
REFERENCE_FRACTIONS = np.arange(0.05, 1.0, 0.05)
#: Relative residual below which a column of Sxx^{1/2} V adds no new direction to the span.
SPAN_RTOL = 1e-9


class InterpolationWarning(UserWarning):
    """NTPS from moments of no more texts than the rank of Sxx, where the labels are fitted exactly."""


@contextlib.contextmanager
def _caught(category: type[Warning] | tuple[type[Warning], ...]) -> Iterator[list]:
    """Record every warning of ``category`` (a class or a tuple of them) the block raises (each occurrence,
    filtered when the caller says it) into the yielded list; the block's other warnings pass on as they came,
    when it ends. A block that raises gives way to its exception: nothing is recorded or passed on."""
    mine: list = []
    with warnings.catch_warnings(record=True) as caught:
        for one in category if isinstance(category, tuple) else (category,):
            warnings.simplefilter("always", one)
        yield mine
    for item in caught:
        if issubclass(item.category, category):
            mine.append(item)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno, source=item.source)


class GatheredInterpolationWarnings:
    """The `InterpolationWarning`s of a block of work, kept to be said once when it ends, by the caller (one
    warning a layer filled a notebook cell, and a study stage's log with one paragraph 31 times); the block's
    other warnings pass through as they came.

    ``with gathered.at(label):`` records the block's interpolation warnings under ``label`` (a layer, or
    None); ``messages`` maps each label to its messages, in the order they arose.
    """

    def __init__(self) -> None:
        self.messages: dict[Hashable, list[str]] = {}

    @contextlib.contextmanager
    def at(self, label: Hashable = None) -> Iterator[None]:
        """Record the interpolation warnings of the block under ``label`` (a block that raises gives way to
        its exception: its warnings are not recorded).

        Parameters
        ----------
        label : hashable
            The key of ``messages`` they are recorded under.

        Returns
        -------
        context manager
        """
        with _caught(InterpolationWarning) as caught:
            yield
        if caught:  # a label is recorded only where the block warned
            self.messages.setdefault(label, []).extend(str(item.message) for item in caught)


#: Relative gap (to the largest) below which two eigenvalues of the label moments Syy count as tied. Syy is
#: made of class frequencies: two distinct class counts differ by at least 1 / N of the largest.
TIE_RTOL = 1e-9


def tied_ks(Syy: Float[np.ndarray, "C C"], centred: bool = False) -> list[int]:
    """The k < m at which U_k is not determined where the labels are fitted exactly (no more texts than
    the rank of Sxx): there the perception eigenvalues are those of the label moments Syy (the class
    frequencies, uncentred), and U_k is one of many equally good choices, made by rounding, wherever the
    k-th and (k+1)-th of them are equal: classes of the same size.

    Parameters
    ----------
    Syy : (C, C) the label moments of the `Moments` NTPS is computed from (``Moments.Syy``).
    centred : whether NTPS centres uncentred moments (``y_mean`` the diagonal of Syy); False for moments
        that are centred already.

    Returns
    -------
    list of int, increasing (empty when no two leading eigenvalues of Syy are tied).
    """
    Syy = np.asarray(Syy, dtype=np.float64)
    if centred:
        y_mean = np.diag(Syy)
        Syy = Syy - np.outer(y_mean, y_mean)
    lam = np.linalg.eigvalsh((Syy + Syy.T) / 2)[::-1]  # descending
    top = max(float(lam[0]), np.finfo(np.float64).tiny)
    m = int(np.count_nonzero(lam > A_RANK_RTOL * top))
    return [k for k in range(1, m) if lam[k - 1] - lam[k] <= TIE_RTOL * top]


def interpolation_message(what: str, n_texts: int, rank: int, tied: Sequence[int] | None = None,
                          parts: int = 1) -> str:
    """Why NTPS from ``n_texts`` texts whose Sxx has rank ``rank`` (>= n_texts) describes the labels
    more than the features: the least-squares fit of the one-hot labels on the pooled states is exact,
    so the perception problem's eigenvalues are fixed by the class counts alone (Y^T Y: the counts
    themselves for uncentred moments), U's directions come in order of class size and classes of equal
    size are tied (a tie broken by rounding, which can differ between devices).

    Parameters
    ----------
    what : which moments (e.g. "the pooled moments", "a half of the split").
    n_texts : their number of texts.
    rank : the retained rank of their Sxx.
    tied : the k at which those moments' classes tie (`tied_ks`), or None where not known.
    parts : how many parts of an estimate (its pooled moments, halves, replicates) fit the labels exactly,
        ``what`` the largest of them; ``tied`` then holds the k at which any of them ties.

    Returns
    -------
    str, the `InterpolationWarning` message.
    """
    beyond = (" (more than the texts: eigenvalues of rounding size are retained as directions)"
              if rank > n_texts else "")
    if tied is None:
        ties = "classes of equal size are tied (broken by rounding: values can differ between devices)"
    elif tied:
        where = "" if parts == 1 else f" in one of the {parts} parts of the estimate that fit the labels exactly"
        ties = (f"classes of equal size are tied: here at k = {', '.join(map(str, tied))}{where}, where U_k is "
                "chosen by rounding and NTPS can differ between devices")
    else:
        ties = ("classes of equal size would be tied (no two are here" + ("" if parts == 1 else
                f", in any of the {parts} parts of the estimate that fit the labels exactly") + ")")
    return (f"{what}: {n_texts} texts, no more than the rank of Sxx ({rank}{beyond}): the labels are fitted "
            f"exactly, so the perception eigenvalues are fixed by the class counts, U's directions come in order of "
            f"class size and {ties}. NTPS there describes the labels more than the features (docs/estimator.md, "
            "'Fewer texts than dimensions').")


def interpolates(n_texts: int, rank: int, centred: bool = False) -> bool:
    """Whether a least-squares fit on moments of ``n_texts`` texts whose Sxx has retained rank ``rank``
    fits every label exactly: the rank reaches the number of texts (one less when centred).

    Parameters
    ----------
    n_texts : number of texts of the moments.
    rank : retained rank of their Sxx (e.g. `TheoryGeometry.r_U`).
    centred : whether the moments are centred (the intercept takes one direction).

    Returns
    -------
    bool.
    """
    return rank >= n_texts - (1 if centred else 0)


class RoundedMomentsWarning(UserWarning):
    """NTPS from moments whose C0 reaches below zero beyond the range tolerance: its products were rounded, and
    the rounding sits among V's retained directions."""


class NextTokenTieWarning(UserWarning):
    """NTPS at a k where the next-token eigenvalues mu_k and mu_{k+1} are tied: V_k takes directions rounding
    picks."""


class BeyondRankWarning(UserWarning):
    """NTPS asked at a k beyond the retained rank of C0 (r_V) in a call that reports every k it is given
    (`ntps_nb.core.estimators.ntps_estimate`, `ntps_nb.core.estimators.estimate_by_n`, the notebooks'
    `layer_profile` with another estimator than the plug-in): there are not k next-token directions, so those
    rows are NaN."""


class BeyondRankError(ValueError):
    """A k beyond the retained rank of C0 (r_V): there are not k next-token directions, so NTPS is undefined.
    A `ValueError`; a loop that reports NaN where an estimate is undefined (the notebooks' `layer_profile`) catches
    this one and nothing else."""


#: Gaps between neighbouring next-token eigenvalues at or below r_V x this x mu_1 count as ties (mu_1 the largest
#: eigenvalue, r_V their number): the float64 eigensolve's backward error, a modest multiple of n eps ||M|| for a
#: symmetric matrix M of order n (here the reduced matrix, ||M|| = mu_1), so the solve does not resolve them. A
#: block of zeros (C1 C1^T of lower rank than C0 retains) sits below it: SmolLM2's embedding layer on 40 trec6
#: texts has 36 at 3.9e-17 x mu_1 and below (r_V = 289: the tolerance is 6.4e-14 x mu_1). The spectra of its
#: hidden layers stay far above it: their smallest gap is 1.9e-8 x mu_1 on 40 texts and 1.7e-11 on 1,024
#: (layer 15, whose smallest eigenvalue is 5e-13 x mu_1; tolerance 1.3e-13), by
#: `benchmarks/next_token_null_block.py` (benchmarks/results/precision/ci_unit_next_token_null_block*.txt).
#: A_RANK_RTOL (1e-10 x mu_1), the rank tolerance of U's label directions, would call that gap a tie. At the
#: Llama-3-8B shape (d = 4096, random weights, 4,000 texts) the last gaps do reach it
#: (benchmarks/results/precision/h200_next_token_ties_gpu.txt): a tie is said only where it moves NTPS
#: (`next_token_tie_spread`).
NEXT_TOKEN_TIE_EPS = float(np.finfo(np.float64).eps)


def next_token_tie_tolerance(eigenvalues: Float[np.ndarray, " rV"]) -> float:
    """The gap at or below which two neighbouring next-token eigenvalues tie: r_V x `NEXT_TOKEN_TIE_EPS` x mu_1.

    Parameters
    ----------
    eigenvalues : (r_V,) the next-token eigenvalues, in any order.

    Returns
    -------
    float, absolute (in the eigenvalues' units); eigenvalues at or below it count as zero.
    """
    mu = np.asarray(eigenvalues, dtype=np.float64)
    return mu.size * NEXT_TOKEN_TIE_EPS * max(float(mu.max()), np.finfo(np.float64).tiny)


def next_token_tied_ks(eigenvalues: Float[np.ndarray, " rV"]) -> list[int]:
    """The k < r_V at which V_k is not determined: the k-th and (k+1)-th eigenvalues of the next-token
    problem (C1 C1^T, C0) on the retained range of C0 are equal, so V_k holds some of the directions of
    their eigenspace and which ones rounding decides (as classes of equal size decide U_k where the labels
    are fitted exactly, `tied_ks`). The common case is a block of zero eigenvalues, where C1 C1^T has lower
    rank than C0 retains: at the embedding layer, next states of repeated tokens are the same vector
    (docs/estimator.md, "Tied next-token eigenvalues"). At k = r_V, V_k is C0's whole retained range.

    Parameters
    ----------
    eigenvalues : (r_V,) the next-token eigenvalues (`TheoryGeometry.next_token_eigenvalues`), in any order.

    Returns
    -------
    list of int, increasing: the k with mu_k - mu_{k+1} <= r_V x `NEXT_TOKEN_TIE_EPS` x mu_1, gaps the
    float64 solve does not resolve (empty where none).
    """
    mu = np.asarray(eigenvalues, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"eigenvalues must be one-dimensional, got shape {mu.shape}")
    if not np.all(np.isfinite(mu)):
        raise ValueError("the next-token eigenvalues are not all finite")
    mu = np.sort(mu)[::-1]  # descending, mu_1 first
    if mu.size < 2:
        return []
    return [int(k) for k in np.flatnonzero(mu[:-1] - mu[1:] <= next_token_tie_tolerance(mu)) + 1]


#: Width of NTPS's range over the choices a next-token tie leaves V_k (`next_token_tie_spread`) above which the
#: tie is said (`warn_if_next_token_tied`) and the flag refuses the row (`eigengap_ratios`): far below the 3-4
#: decimals NTPS is read to. The tables' 7 significant digits can show smaller moves, as they show the rounding
#: of different CPU kernels at untied k.
NEXT_TOKEN_TIE_SPREAD = 1e-6


def next_token_tie_spread(geometry: "TheoryGeometry") -> dict[int, float]:
    """How far NTPS_theory can move at each tied k (`next_token_tied_ks`) as rounding picks V_k.

    A run of tied k from a to b ties the eigenvalues mu_a .. mu_{b+1}: V_k for k in [a, b] is V_{a-1} plus
    k - a + 1 directions of their eigenspace W, chosen by rounding. In Sxx-whitened coordinates, where U's
    directions u_i are orthonormal, ||P_{V_k} u_i||^2 then lies between ||P_{V_{a-1}} u_i||^2 and
    ||P_{V_{b+1}} u_i||^2, and NTPS(k) within a range of width sum_{i <= k_U} (||P_{V_{b+1}} u_i||^2 -
    ||P_{V_{a-1}} u_i||^2) / k_U: U's share in W. Read off the geometry's ``projected`` table, no solve. Where U
    has nothing in W the tie moves nothing; at the embedding layer on few texts it moved ci_unit's NTPS by up
    to 0.071 between CPU kernels (docs/estimator.md, "Tied next-token eigenvalues").

    Parameters
    ----------
    geometry : a `TheoryGeometry` that kept its next-token eigenvalues (descending, as solved).

    Returns
    -------
    dict mapping each tied k to the width of NTPS's range there (empty where none is tied, or where the
    geometry kept no next-token eigenvalues).
    """
    if geometry.next_token_eigenvalues is None:
        return {}
    tied = set(next_token_tied_ks(np.asarray(geometry.next_token_eigenvalues, dtype=np.float64)))
    spread: dict[int, float] = {}
    for k in sorted(tied):
        if k - 1 in tied:
            continue  # inside a run already read
        b = k
        while b + 1 in tied:
            b += 1
        lower = geometry.projected[k - 2] if k >= 2 else np.zeros(geometry.m)  # ||P_{V_{a-1}} u_i||^2
        share = geometry.projected[b] - lower  # U's directions' squared projections onto W (k = b + 1 <= r_V)
        for j in range(k, b + 1):
            kU = geometry.k_U(j)
            spread[j] = float(share[:kU].sum() / kU)
    return spread


def moving_next_token_ties(geometry: "TheoryGeometry") -> dict[int, float]:
    """The tied k at which the tie can move NTPS by more than `NEXT_TOKEN_TIE_SPREAD`: those the
    `NextTokenTieWarning` names and the flag refuses (`ntps_nb.core.estimators.eigengap_ratios`).

    Parameters
    ----------
    geometry : a `TheoryGeometry` (nothing is tied where it kept no next-token eigenvalues).

    Returns
    -------
    dict mapping each such k to the width of NTPS's range there (`next_token_tie_spread`).
    """
    return {k: width for k, width in next_token_tie_spread(geometry).items() if width > NEXT_TOKEN_TIE_SPREAD}


def integer_ranges(values: Sequence[int]) -> str:
    """Integers as ranges, in increasing order: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8".

    Parameters
    ----------
    values : integers (any order; repeats are read once).

    Returns
    -------
    str, comma-separated ranges ("" for none).
    """
    ordered = sorted(set(int(v) for v in values))
    parts, start = [], None
    for i, value in enumerate(ordered):
        start = value if start is None else start
        if i + 1 == len(ordered) or ordered[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


@contextlib.contextmanager
def warnings_named(where: str, category: type[Warning] | tuple[type[Warning], ...] = (
        NextTokenTieWarning, RoundedMomentsWarning, BeyondRankWarning)) -> Iterator[None]:
    """Re-issue the block's warnings of ``category`` with ``where`` before their message ("layer 0, the pooled
    moments: ..."): `ntps_sweep` does not know which layer or unit its moments are of, and a loop over layers
    does. The block's other warnings pass as they came.

    Parameters
    ----------
    where : what the block computes (a layer, a unit).
    category : the warnings to name, a class or a tuple (default `NextTokenTieWarning`, `RoundedMomentsWarning`
        and `BeyondRankWarning`).

    Returns
    -------
    context manager
    """
    with _caught(category) as caught:
        yield
    for item in caught:
        warnings.warn_explicit(f"{where}, {item.message}", item.category, item.filename, item.lineno,
                               source=item.source)


def warn_if_next_token_tied(geometry: "TheoryGeometry", ks: Sequence[int], stacklevel: int = 3) -> None:
    """Warn (`NextTokenTieWarning`) where a k of ``ks`` is one of the geometry's `next_token_tied_ks` and the tie
    can move NTPS there by more than `NEXT_TOKEN_TIE_SPREAD` (`next_token_tie_spread`): NTPS is then one of
    several equally valid values, chosen by rounding.

    Parameters
    ----------
    geometry : the `TheoryGeometry` of the pooled moments the values are read from (nothing is said where it
        kept no next-token eigenvalues).
    ks : the k whose values the caller returns.
    stacklevel : as in `warnings.warn`; the default 3 points at the caller of this function's caller.

    Returns
    -------
    None; warns at most once.
    """
    asked = {int(k) for k in ks}
    spread = {k: width for k, width in moving_next_token_ties(geometry).items() if k in asked}
    if not spread:
        return
    mu = np.sort(np.asarray(geometry.next_token_eigenvalues, dtype=np.float64))[::-1]
    zero = int(np.count_nonzero(mu <= next_token_tie_tolerance(mu)))
    block = (f" ({zero} of the r_V = {mu.size} are zero: C1 C1^T has rank {mu.size - zero} where C0 retains {mu.size})"
             if zero > 1 else f" (of r_V = {mu.size})")
    warnings.warn(
        f"the pooled moments: the next-token eigenvalues are tied at k = {integer_ranges(spread)}{block}, "
        "so V_k there holds directions rounding picks and NTPS at those k can differ between machines and "
        f"kernels, by up to {max(spread.values()):.2g}. At the embedding layer this follows from the tokenization: "
        "next states of repeated tokens are the same vector (docs/estimator.md, 'Tied next-token eigenvalues').",
        NextTokenTieWarning, stacklevel=stacklevel)


def warn_if_beyond_rank(r_V: int, ks: Sequence[int], stacklevel: int = 3) -> None:
    """Warn (`BeyondRankWarning`) where a k of ``ks`` exceeds ``r_V``: NTPS is undefined there, and a caller that
    returns a row for every k it was given returns NaN (`ntps` raises `BeyondRankError` instead).

    Parameters
    ----------
    r_V : the retained rank of the pooled C0 (the number of next-token directions).
    ks : the k whose values the caller returns.
    stacklevel : as in `warnings.warn` (default: the caller of the function that calls this one).

    Returns
    -------
    None; warns at most once.
    """
    beyond = sorted({int(k) for k in ks if int(k) > r_V})
    if not beyond:
        return
    warnings.warn(
        f"k = {integer_ranges(beyond)} is beyond the retained rank of C0 (r_V = {r_V}): there are not that many "
        "next-token directions, so NTPS is undefined there and those rows are NaN (ntps_sweep gives every k up to "
        "r_V).",
        BeyondRankWarning, stacklevel=stacklevel)


def warn_if_rounded(reach: float, r_V: int, stacklevel: int = 3) -> None:
    """Warn (`RoundedMomentsWarning`) where the pooled C0's `negative_reach` is above zero: a sum of outer products
    has no negative eigenvalue, so its products were rounded (float32 token products that the extraction was
    told to keep, ``float64_where_rounded=False``, or moments formed elsewhere), and rounding of that size in
    C0's null directions is kept as directions of V.

    Parameters
    ----------
    reach : `negative_reach` of the pooled C0 (0 where it is within the range tolerance).
    r_V : the retained rank of that C0.
    stacklevel : as in `warnings.warn` (default: the caller of the function that calls this one).

    Returns
    -------
    None; warns at most once.
    """
    if reach <= 0:
        return
    warnings.warn(
        f"the pooled moments: C0 has negative eigenvalues down to {reach:.1g} times its largest, which exact products "
        "cannot have: its products were rounded, and the range tolerance keeps directions of that rounding among V's "
        f"r_V = {r_V}, so r_V and NTPS at the k they enter need not be the texts' own (docs/estimator.md, 'Float32 "
        "token products where C0 is rank deficient'). ntps_nb.extract forms such layers again with float64 products "
        "unless told not to (float64_where_rounded=False).",
        RoundedMomentsWarning, stacklevel=stacklevel)


def warn_of_the_sample(pooled: Moments | None, shards: Sequence[Moments], geometry: "TheoryGeometry",
                       ks: Sequence[int], *, estimator: str, seed: int = 0, replicates: bool = False,
                       centred: bool = False, tol: float | None = None, rtol: float = RANGE_RTOL,
                       reach: float | None = None, stacklevel: int = 3) -> None:
    """What every theory NTPS read from these moments is said with, once per call: no more texts than the rank
    of Sxx in a part the value (or its interval, ``replicates``) reads (`InterpolationWarning`,
    `ntps_nb.core.estimators.warn_if_interpolating`), tied next-token eigenvalues that can move NTPS at one of
    ``ks`` (`NextTokenTieWarning`), C0 reaching below zero beyond the range tolerance (`RoundedMomentsWarning`),
    and a k of ``ks`` beyond C0's retained rank (`BeyondRankWarning`; only callers that take any k reach it).
    `ntps`, `ntps_sweep`, `ntps_estimate` (both backends) and `ntps_nb.core.diagnostics.ntps_diagnostics` call it.

    Parameters
    ----------
    pooled : the pooled moments the values are read from (their C0's rounding is checked); None where the caller
        gives ``reach``.
    shards : the per-shard moments (``[pooled]`` where there are none).
    geometry : the pooled moments' theory geometry (either backend's).
    ks : the k whose values the caller returns.
    estimator, seed, replicates, centred : as in `warn_if_interpolating`.
    tol, rtol : the caller's range tolerance (of the rounding check).
    reach : `negative_reach` of the pooled C0 where the caller measured it (a device's); None: measured here.
    stacklevel : as in `warnings.warn`, counted from this function's caller (3: the caller's caller).

    Returns
    -------
    None.
    """
    from ntps_nb.core.estimators import warn_if_interpolating

    warn_if_interpolating(list(shards), estimator, seed=seed, replicates=replicates, rank=geometry.r_U,
                          centred=centred, stacklevel=stacklevel + 1)
    warn_if_next_token_tied(geometry, ks, stacklevel=stacklevel + 1)
    warn_if_beyond_rank(geometry.r_V, ks, stacklevel=stacklevel + 1)
    if reach is None:
        if pooled is None:
            raise ValueError("warn_of_the_sample needs the pooled moments or the reach of their C0")
        reach = negative_reach(pooled.C0, tol=tol, rtol=rtol)
    warn_if_rounded(reach, geometry.r_V, stacklevel=stacklevel + 1)


def _k_from(k: int | None, fraction: float | None, r_V: int) -> int:
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k (an integer) and fraction (of the retained rank of C0)")
    grids = ": for several, ntps_sweep, ntps_interval_sweep or ntps_estimate take a grid"
    for name, value in (("k", k), ("fraction", fraction)):
        if value is not None and not (np.ndim(value) == 0 and isinstance(value, (numbers.Real, np.number))):
            raise ValueError(f"{name} must be one number, got {value!r}{grids if np.ndim(value) else ''}")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        k = int(fraction * r_V)
        if k < 1:
            raise ValueError(f"fraction {fraction} of the retained rank r_V = {r_V} selects no direction")
    if isinstance(k, (bool, np.bool_)) or int(k) != k:
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > r_V:
        raise BeyondRankError(f"k = {k} is beyond the retained rank of C0 (r_V = {r_V})")
    return k


@dataclass(frozen=True, eq=False)
class TheoryGeometry:
    """What NTPS_theory, the excess-loss identity and its bounds need for one layer, at every k.

    Attributes
    ----------
    eigenvalues : (m,) lambda_1 >= ... >= lambda_m > 0 of M = Sxx^{-1/2} Sxy Sxy^T Sxx^{-1/2}.
    projected : (r_V, m) ``projected[k-1, i]`` = ||Pt_k u_{i+1}||^2, Pt_k the projector onto
        span(Sxx^{1/2} V_k) in Sxx-whitened coordinates.
    r_V : retained rank of C0 (the largest valid k).
    r_U : retained rank of Sxx.
    trace_Syy : tr(Syy), the loss of the zero probe.
    next_token_eigenvalues : (r_V,) the descending eigenvalues of the next-token problem
        (C1 C1^T, C0) on the retained range of C0, or None where the code that built the geometry
        did not keep them; the reliability flag's eigengaps read them (`ntps_nb.core.estimators.eigengap_ratios`).
    overlap : (q, m) ``overlap[j, i]`` = <b_j, u_{i+1}>, b_1..b_q the nested orthonormal basis of the
        whitened V (the first ``span_counts[k-1]`` of them span V_k), or None where the code that built
        the geometry did not keep it; `principal_cos2` reads it (``projected`` is its cumulative square).
    span_counts : (r_V,) how many of the basis vectors span V_k at each k (with ``overlap``).
    """

    eigenvalues: Float[np.ndarray, " m"]
    projected: Float[np.ndarray, "rV m"]
    r_V: int
    r_U: int
    trace_Syy: float
    next_token_eigenvalues: np.ndarray | None = None
    overlap: np.ndarray | None = None
    span_counts: np.ndarray | None = None

    def principal_cos2(self, ks) -> np.ndarray:
        """The squared cosines of the principal angles between U_k (its k_U = min(k, m) directions) and
        V_k in Sxx-whitened coordinates, at each k of ``ks``: NTPS_theory(k) is their sum over k_U.

        Parameters
        ----------
        ks : (K,) positive numbers of next-token directions.

        Returns
        -------
        (K, max k_U) float64, each row descending, NaN past the min(k_U, dim V_k) angles there are and on
        the rows of a k beyond r_V. A ValueError where the geometry was built without ``overlap``.
        """
        if self.overlap is None or self.span_counts is None:
            raise ValueError("this geometry was built without its overlap matrix: principal angles need it")
        ks = np.asarray(ks, dtype=np.int64).reshape(-1)
        k_u = np.minimum(ks, self.m)
        out = np.full((ks.size, int(k_u.max(initial=1))), np.nan)
        beyond = ks > self.span_counts.size  # k beyond r_V: no V_k, NaN as theory_values gives
        spans = np.where(beyond, 0, self.span_counts[np.minimum(ks, self.span_counts.size) - 1])
        # the Gram matrix of U's columns projected on V_k, built up over the basis in the order of the spans; its
        # eigenvalues are the cos^2 (the squared singular values of overlap[:q, :k_U])
        grams = np.empty((ks.size, self.m, self.m))
        gram, done = np.zeros((self.m, self.m)), 0
        for row in np.argsort(spans, kind="stable"):
            block = self.overlap[done: spans[row]]
            gram, done = gram + block.T @ block, max(done, int(spans[row]))
            grams[row] = gram
        for width in np.unique(k_u):
            rows = np.flatnonzero(k_u == width)
            values = np.linalg.eigvalsh(grams[rows][:, :width, :width])[:, ::-1]  # descending
            angles = np.minimum(width, spans[rows])
            values[np.arange(width)[None, :] >= angles[:, None]] = np.nan
            out[rows, :width] = np.clip(values, 0.0, 1.0)
        out[beyond] = np.nan
        return out

    @property
    def m(self) -> int:
        """rank(Sxy Sxy^T): the number of label-carrying directions of U (at most C)."""
        return self.eigenvalues.size

    def k_U(self, k: int) -> int:
        return min(k, self.m)

    def k(self, k: int | None = None, fraction: float | None = None) -> int:
        """Validate k, or turn a fraction of r_V into k = int(fraction * r_V).

        Parameters
        ----------
        k, fraction : give exactly one; 1 <= k <= r_V, 0 < fraction <= 1.

        Returns
        -------
        int, the number of next-token directions.
        """
        return _k_from(k, fraction, self.r_V)

    def ntps(self, k: int) -> float:
        """NTPS_theory(k) = sum_{i <= k_U} ||Pt_k u_i||^2 / k_U, with k_U = min(k, m).

        Parameters
        ----------
        k : number of next-token directions, 1 <= k <= r_V (not validated here; see `k`).

        Returns
        -------
        float in [0, 1].
        """
        kU = self.k_U(k)
        return float(self.projected[k - 1, :kU].sum() / kU)

    def loss(self, k: int) -> float:
        """In-sample MSE of the least-squares probe on the k next-token features V_k.

        Parameters
        ----------
        k : number of next-token directions, 1 <= k <= r_V.

        Returns
        -------
        float, tr(Syy) - sum_i lambda_i ||Pt_k u_i||^2.
        """
        return float(self.trace_Syy - self.eigenvalues @ self.projected[k - 1])

    def best_loss(self, k: int) -> float:
        """In-sample MSE of the best k linear features (the top k_U perception directions).

        Parameters
        ----------
        k : number of directions.

        Returns
        -------
        float, tr(Syy) - sum_{i <= k_U} lambda_i.
        """
        return float(self.trace_Syy - self.eigenvalues[: self.k_U(k)].sum())

    def excess_loss(self, k: int) -> float:
        """DeltaL = L(V_k) - L*, from the identity of SPEC section 5.

        Parameters
        ----------
        k : number of next-token directions, 1 <= k <= r_V.

        Returns
        -------
        float, ``loss(k) - best_loss(k)`` computed from the identity.
        """
        kU = self.k_U(k)
        lam, proj = self.eigenvalues, self.projected[k - 1]
        return float(lam[:kU] @ (1.0 - proj[:kU]) - lam[kU:] @ proj[kU:])

    def bounds(self, k: int) -> tuple[float, float]:
        """(lower, upper) = ((lambda_kU - lambda_{k+1}), lambda_1) * k_U * (1 - NTPS).

        Parameters
        ----------
        k : number of next-token directions, 1 <= k <= r_V.

        Returns
        -------
        (lower, upper) : tuple of two floats (lambda_{k+1} taken as 0 when k >= m).
        """
        kU = self.k_U(k)
        gap = 1.0 - self.ntps(k)
        lam_next = self.eigenvalues[k] if k < self.m else 0.0
        return float((self.eigenvalues[kU - 1] - lam_next) * kU * gap), float(self.eigenvalues[0] * kU * gap)

    def sweep(self) -> pd.DataFrame:
        """NTPS_theory, the excess loss and its bounds at every k = 1..r_V.

        Returns
        -------
        DataFrame, one row per k with columns variant, k, fraction (k / r_V), k_U, m, r_U, r_V, ntps,
        excess_loss, lower_bound, upper_bound.
        """
        ks = np.arange(1, self.r_V + 1)
        kU = np.minimum(ks, self.m)
        cum = np.cumsum(self.projected, axis=1)  # sum over the first i+1 directions of U
        ntps_values = cum[ks - 1, kU - 1] / kU
        lam = self.eigenvalues
        lam_cum = np.cumsum(lam)
        loss = self.trace_Syy - self.projected @ lam
        best = self.trace_Syy - lam_cum[kU - 1]
        lam_next = np.where(ks < self.m, lam[np.minimum(ks, self.m - 1)], 0.0)
        gap = 1.0 - ntps_values
        return pd.DataFrame({
            "variant": "theory",
            "k": ks,
            "fraction": ks / self.r_V,
            "k_U": kU,
            "m": self.m,
            "r_U": self.r_U,
            "r_V": self.r_V,
            "ntps": ntps_values,
            "excess_loss": loss - best,
            "lower_bound": (lam[kU - 1] - lam_next) * kU * gap,
            "upper_bound": lam[0] * kU * gap,
        })


def theory_geometry(
    moments: Moments, *, centred: bool = False, tol: float | None = None, rtol: float = RANGE_RTOL,
    span_rtol: float = SPAN_RTOL,
) -> TheoryGeometry:
    """One factorisation per layer; every k is then a lookup.

    Parameters
    ----------
    moments : the layer's `Moments`.
    centred : use the centred perception moments (probe with intercept).
    tol, rtol : absolute / relative tolerance on the eigenvalues of Sxx and C0.
    span_rtol : relative residual below which a column of Sxx^{1/2} V adds no new direction.

    Returns
    -------
    `TheoryGeometry` with the (m,) eigenvalues of M and the (r_V, m) table ``projected``.

    Raises
    ------
    ValueError if Sxy is zero (no label signal, m = 0).
    """
    if centred:
        moments = moments.centred()
    U = perception_subspace(moments, order="descending", tol=tol, rtol=rtol)
    V = next_token_subspace(moments, order="descending", tol=tol, rtol=rtol)
    return _theory_geometry_of(moments, U, V, span_rtol=span_rtol)


def _theory_geometry_of(moments: Moments, U: Subspace, V: Subspace, *, span_rtol: float = SPAN_RTOL) -> TheoryGeometry:
    """`theory_geometry` from the moments' descending perception and next-token subspaces, solved
    by the caller (who may need them for something else too)."""
    m = U.rank_A
    if m == 0:
        raise ValueError("Sxy is zero: the pooled states carry no label signal, U is undefined")
    # Coordinates in the retained range of Sxx: u_i -> Y[:, i]; Sxx^{1/2} V -> S^{1/2} Q_r^T V.
    Q_r, s_r = U.range_basis, U.range_eigenvalues
    u_coords = Q_r.T @ U.whitened[:, :m]
    v_coords = np.sqrt(s_r)[:, None] * (Q_r.T @ V.vectors)
    basis, counts = nested_orthonormal_basis(v_coords, rtol=span_rtol)
    cum = np.cumsum((basis.T @ u_coords) ** 2, axis=0)  # (q, m)
    projected = np.zeros((V.rank_B, m))
    has_basis = counts > 0
    projected[has_basis] = cum[counts[has_basis] - 1]
    return TheoryGeometry(
        eigenvalues=U.eigenvalues[:m].copy(),
        projected=np.clip(projected, 0.0, 1.0),
        r_V=V.rank_B,
        r_U=U.rank_B,
        trace_Syy=float(np.trace(moments.Syy)),
        next_token_eigenvalues=np.asarray(V.eigenvalues, dtype=np.float64).copy(),
        overlap=basis.T @ u_coords,
        span_counts=np.asarray(counts, dtype=np.int64).copy(),
    )


@dataclass(frozen=True, eq=False)
class ReferenceGeometry:
    """The released algorithm's U and V (ascending order), with V orthonormalised once (nested)."""

    U: Float[np.ndarray, "d rU"]
    V: Float[np.ndarray, "d rV"]
    projected: Float[np.ndarray, "q rU"]  # [j, i]: sum of ||P u||^2 over basis j+1 and columns <= i
    norms: Float[np.ndarray, " rU"]  # cumulative ||u||^2 over the columns of U
    counts: np.ndarray
    precision: str

    @property
    def r_U(self) -> int:
        return self.U.shape[1]

    @property
    def r_V(self) -> int:
        return self.V.shape[1]

    def counts_at(self, fraction: float) -> tuple[int, int]:
        """(k_U, k_V) = (int(f * r_U), int(f * r_V)), as the released code truncates.

        Parameters
        ----------
        fraction : f.

        Returns
        -------
        (k_U, k_V) : tuple of two ints (0 when f selects no column).
        """
        return int(fraction * self.r_U), int(fraction * self.r_V)

    def ntps(self, fraction: float) -> float:
        """The released algorithm's NTPS at one fraction: ||P_{V_kV} U_kU||_F^2 / ||U_kU||_F^2.

        Parameters
        ----------
        fraction : f, with k_U = int(f * r_U), k_V = int(f * r_V).

        Returns
        -------
        float, NaN when k_U or k_V is 0.
        """
        kU, kV = self.counts_at(fraction)
        if kU < 1 or kV < 1:
            return float("nan")
        b = self.counts[kV - 1]
        numerator = float(self.projected[b - 1, kU - 1]) if b > 0 else 0.0
        return numerator / float(self.norms[kU - 1])

    def sweep(self, fractions: np.ndarray = REFERENCE_FRACTIONS) -> pd.DataFrame:
        """The released algorithm's NTPS at each fraction.

        Parameters
        ----------
        fractions : (F,) fractions (default: the released code's 19, `REFERENCE_FRACTIONS`).

        Returns
        -------
        DataFrame, one row per fraction with columns variant, fraction, k_U, k_V, r_U, r_V, ntps,
        precision.
        """
        return reference_sweep_frame(fractions, self.r_U, self.r_V, [self.ntps(f) for f in fractions], self.precision)


def reference_sweep_frame(fractions: Sequence[float], r_U: int, r_V: int, values: Sequence[float],
                          precision: str) -> pd.DataFrame:
    """The reference sweep's frame from the released algorithm's NTPS at each fraction (computed by
    `ReferenceGeometry.ntps`, or on a device by the torch backend).

    Parameters
    ----------
    fractions : (F,) fractions f; k_U = int(f * r_U), k_V = int(f * r_V) as the released code truncates.
    r_U, r_V : retained ranks of Sxx and C0 (the numbers of columns of U and V).
    values : (F,) NTPS at each fraction (NaN where k_U or k_V is 0).
    precision : "float32" or "float64", the solve's precision.

    Returns
    -------
    DataFrame, one row per fraction with columns variant, fraction, k_U, k_V, r_U, r_V, ntps,
    precision.
    """
    rows = []
    for f, value in zip(fractions, values, strict=True):
        rows.append({"variant": "reference", "fraction": float(f), "k_U": int(f * r_U), "k_V": int(f * r_V),
                     "r_U": int(r_U), "r_V": int(r_V), "ntps": float(value), "precision": precision})
    return pd.DataFrame(rows)


def _reference_subspaces(moments: Moments, precision: Precision, tol: float) -> tuple[np.ndarray, np.ndarray]:
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    check_labels(moments)
    dtype = np.float32 if precision == "float32" else np.float64
    Sxy = moments.Sxy.astype(dtype)
    C1 = moments.C1.astype(dtype)
    # the released code's steps, scipy's eigh included (SPEC section 4)
    U = generalized_eigh(moments.Sxx.astype(dtype), A=Sxy @ Sxy.T, order="ascending", tol=tol, dtype=dtype, name="Sxx",
                         solver="scipy")
    V = generalized_eigh(moments.C0.astype(dtype), A=C1 @ C1.T, order="ascending", tol=tol, dtype=dtype, name="C0",
                         solver="scipy")
    return U.vectors, V.vectors


def reference_geometry(
    moments: Moments, *, precision: Precision = "float32", tol: float = REFERENCE_ABS_TOL,
    span_rtol: float = SPAN_RTOL,
) -> ReferenceGeometry:
    """The released algorithm's subspaces; all fractions are then lookups.

    Parameters
    ----------
    moments : the layer's `Moments` (uncentred, as released).
    precision : "float32" (as released) or "float64", the dtype of the eigensolves.
    tol : absolute tolerance on the eigenvalues of Sxx and C0 (released: 1e-8).
    span_rtol : relative residual below which a column of V adds no new direction.

    Returns
    -------
    `ReferenceGeometry` with U (d, r_U) and V (d, r_V) in ascending eigenvalue order.
    """
    U, V = _reference_subspaces(moments, precision, tol)
    basis, counts = nested_orthonormal_basis(V.astype(np.float64), rtol=span_rtol)
    return reference_geometry_from(U, V, basis, counts, precision)


def reference_geometry_from(U: np.ndarray, V: np.ndarray, v_basis: np.ndarray, v_counts: np.ndarray,
                            precision: str) -> ReferenceGeometry:
    """The lookup tables of `ReferenceGeometry` from U, V and V's nested orthonormal basis.

    Parameters
    ----------
    U : (d, r_U) perception directions, ascending order.
    V : (d, r_V) next-token directions, ascending order.
    v_basis : (d, q) nested orthonormal basis of V's columns (`nested_orthonormal_basis`).
    v_counts : (r_V,) integer array, number of ``v_basis`` columns spanning V's first j+1 columns.
    precision : label stored with the geometry ("float32" or "float64").

    Returns
    -------
    `ReferenceGeometry`.
    """
    U64 = U.astype(np.float64)
    projected = np.cumsum(np.cumsum((v_basis.T @ U64) ** 2, axis=0), axis=1)
    norms = np.cumsum(np.sum(U64**2, axis=0))
    return ReferenceGeometry(U=U, V=V, projected=projected, norms=norms, counts=v_counts, precision=precision)


def reference_ntps_pinv(
    moments: Moments, fraction: float, *, precision: Precision = "float32", tol: float = REFERENCE_ABS_TOL
) -> float:
    """The released algorithm literally: P = V_f pinv(V_f) per fraction (slow; for checks and benchmarks).

    Parameters
    ----------
    moments : the layer's `Moments`.
    fraction : f, with k_U = int(f * r_U), k_V = int(f * r_V).
    precision : "float32" (as released) or "float64".
    tol : absolute tolerance on the eigenvalues of Sxx and C0.

    Returns
    -------
    float, NaN when k_U or k_V is 0.
    """
    U, V = _reference_subspaces(moments, precision, tol)
    kU, kV = int(fraction * U.shape[1]), int(fraction * V.shape[1])
    if kU < 1 or kV < 1:
        return float("nan")
    U_f, V_f = U[:, :kU], V[:, :kV]
    P = V_f @ np.linalg.pinv(V_f)
    return float(np.linalg.norm(P @ U_f) ** 2 / np.linalg.norm(U_f) ** 2)


def _pooled_and_shards(data: "Moments | Sequence[Moments]") -> tuple[Moments, list[Moments]]:
    """The pooled moments and the shard list of ``data`` (one `Moments` is one shard)."""
    if isinstance(data, Moments):
        return data, [data]
    shards = list(data)
    if not shards or not all(isinstance(s, Moments) for s in shards):
        raise ValueError("moments must be one Moments or a non-empty list of per-shard Moments")
    return (Moments.combine(shards) if len(shards) > 1 else shards[0]), shards


def check_reference_fraction(k: int | None, fraction: float | None, centred: bool) -> None:
    """The arguments the reference variant's NTPS at one fraction takes: a fraction in (0, 1), no k, uncentred.

    Parameters
    ----------
    k, fraction : as given to `ntps` (k must be None).
    centred : as given to `ntps` (must be False).

    Returns
    -------
    None; a ValueError says what is wrong.
    """
    if k is not None or fraction is None:
        raise ValueError("the reference variant takes fraction= (its k_U, k_V are int(fraction * rank))")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if centred:
        raise ValueError("the reference variant uses the uncentred moments, as released")


def check_reference_counts(fraction: float, k_U: int, k_V: int, r_U: int, r_V: int) -> None:
    """The reference variant's NTPS at ``fraction`` is defined: it selects at least one direction of each subspace.

    Parameters
    ----------
    fraction : the fraction f.
    k_U, k_V : int(f * r_U), int(f * r_V) (`ReferenceGeometry.counts_at`).
    r_U, r_V : the retained ranks.

    Returns
    -------
    None; a ValueError names the counts where either is 0.
    """
    if k_U < 1 or k_V < 1:
        raise ValueError(f"fraction {fraction} selects k_U = {k_U}, k_V = {k_V} directions (r_U = {r_U}, r_V = {r_V})")


def _check_estimator(estimator: str, variant: str) -> None:
    from ntps_nb.core.estimators import ESTIMATORS

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if variant == "reference" and estimator != "plugin":
        raise ValueError("the reference variant is the released algorithm, computed from the pooled moments; "
                         f"estimator={estimator!r} applies to the theory variant only")


def ntps(
    moments: "Moments | Sequence[Moments]",
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
    device: Any = None,
) -> float:
    """NTPS of one layer at k next-token directions (or a fraction of r_V).

    Parameters
    ----------
    moments : the layer's `Moments`, or a list of per-shard `Moments` of that layer (disjoint
        texts; pooled for the plug-in, used as shards by the shard estimators).
    k : number of next-token directions (theory variant).
    fraction : fraction of the retained rank; the reference variant takes only this.
    variant : "theory" (default) or "reference" (the released code's algorithm).
    estimator : how the population NTPS is estimated from the sample (theory variant):
        "plugin" (default; the NTPS of the pooled moments) or another of
        `ntps_nb.core.estimators.ESTIMATORS` (docs/estimator.md: what each does and how far each is
        from the population value on simulations). This gives the value alone; for a number to report
        use `ntps_nb.core.estimators.ntps_estimate`, whose default "richardson" rows carry an interval
        and a reliability flag calibrated on those simulations.
    seed : seed of the estimators' split of the shards into halves (`ntps_nb.core.estimators.split_halves`).
    centred : use the centred perception moments (probe with intercept); theory variant, plug-in.
    tol, rtol : absolute / relative tolerance on the eigenvalues of Sxx and C0 (theory); the
        reference variant uses the released absolute 1e-8 unless ``tol`` is given.
    precision : "float32" (as released) or "float64"; reference variant only.
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...): the same value
        from `ntps_nb.core.backends.torch.ntps_torch`, for the plug-in and, on the theory variant, "richardson"
        (another estimator raises a ValueError), as `ntps_sweep` solves them.

    Returns
    -------
    float, in [0, 1] for the plug-in (other estimators can leave that range; NaN where undefined).
    """
    _check_estimator(estimator, variant)
    backend = estimator_backend(device, estimator, ("plugin", "richardson"), "the plug-in's and richardson's values")
    if backend is not None:
        return backend.ntps_torch(moments, k, fraction=fraction, variant=variant, estimator=estimator, seed=seed,
                                  centred=centred, tol=tol, rtol=rtol, precision=precision, device=device,
                                  stacklevel=3)  # its warnings at the line that called ntps
    pooled, shards = _pooled_and_shards(moments)
    if variant == "theory":
        geometry = theory_geometry(pooled, centred=centred, tol=tol, rtol=rtol)
        kk = geometry.k(k, fraction)
        if estimator != "plugin" and (centred or tol is not None):
            raise ValueError("centred= and tol= are options of the plug-in; the other estimators use rtol only")
        from ntps_nb.core.estimators import estimate_ntps

        warn_of_the_sample(pooled, shards, geometry, [kk], estimator=estimator, seed=seed, centred=centred, tol=tol,
                           rtol=rtol)
        if estimator == "plugin":
            return geometry.ntps(kk)
        return float(estimate_ntps(shards, [kk], estimator=estimator, seed=seed, rtol=rtol,
                                   geometry=geometry).estimate[0])
    if variant == "reference":
        check_reference_fraction(k, fraction, centred)
        geometry = reference_geometry(pooled, precision=precision, tol=REFERENCE_ABS_TOL if tol is None else tol)
        check_reference_counts(fraction, *geometry.counts_at(fraction), geometry.r_U, geometry.r_V)
        return geometry.ntps(fraction)
    raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")


def ntps_sweep(
    moments: "Moments | Sequence[Moments]",
    *,
    variant: Variant = "theory",
    estimator: str = "plugin",
    seed: int = 0,
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: Precision = "float32",
    fractions: np.ndarray | None = None,
    device: Any = None,
) -> pd.DataFrame:
    """NTPS at every k (theory: k = 1..r_V, with the excess loss and its bounds) or at the 19
    fractions (reference), as a tidy frame, from one factorisation.

    ``moments`` and ``estimator`` are as in `ntps`. Every row names its ``estimator``; with an
    estimator other than the plug-in the frame has k, fraction, k_U, m, r_V, ntps and that
    estimator's ``reliability`` (the excess loss and its bounds are plug-in quantities).

    Parameters
    ----------
    moments : the layer's `Moments`, or a list of per-shard `Moments` of that layer.
    variant : "theory" (default) or "reference".
    estimator : "plugin" (default) or another of `ntps_nb.core.estimators.ESTIMATORS` (theory only).
    seed : as in `ntps` (the split into halves of the shard estimators).
    centred, tol, rtol, precision : as in `ntps`.
    fractions : (F,) fractions for the reference variant (default: `REFERENCE_FRACTIONS`).
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...): the same frame
        from `ntps_nb.core.backends.torch.ntps_sweep_torch`, for the plug-in and, on the theory variant,
        "richardson" (another estimator raises a ValueError).

    Returns
    -------
    DataFrame, one row per k (theory; columns as `TheoryGeometry.sweep` plus estimator, or with
    reliability and n_shards for another estimator) or per fraction (reference; columns as
    `ReferenceGeometry.sweep` plus estimator).
    """
    _check_estimator(estimator, variant)
    backend = estimator_backend(device, estimator, ("plugin", "richardson"), "the plug-in's and richardson's sweeps")
    if backend is not None:
        return backend.ntps_sweep_torch(moments, variant=variant, estimator=estimator, seed=seed, centred=centred,
                                        tol=tol, rtol=rtol, precision=precision, fractions=fractions, device=device,
                                        stacklevel=3)  # its warnings at the line that called ntps_sweep
    pooled, shards = _pooled_and_shards(moments)
    if variant == "theory":
        geometry = theory_geometry(pooled, centred=centred, tol=tol, rtol=rtol)
        frame = geometry.sweep()
        if estimator != "plugin" and (centred or tol is not None):
            raise ValueError("centred= and tol= are options of the plug-in; the other estimators use rtol only")
        from ntps_nb.core.estimators import estimate_ntps

        warn_of_the_sample(pooled, shards, geometry, frame["k"].to_numpy(), estimator=estimator, seed=seed,
                           centred=centred, tol=tol, rtol=rtol)
        if estimator == "plugin":
            return frame.assign(estimator="plugin")
        result = estimate_ntps(shards, frame["k"].to_numpy(), estimator=estimator, seed=seed, rtol=rtol,
                               geometry=geometry)
        return frame[["variant", "k", "fraction", "k_U", "m", "r_U", "r_V"]].assign(
            ntps=result.estimate, estimator=estimator, reliability=result.reliability,
            n_shards=result.n_shards)
    if variant == "reference":
        geometry = reference_geometry(pooled, precision=precision, tol=REFERENCE_ABS_TOL if tol is None else tol)
        return geometry.sweep(REFERENCE_FRACTIONS if fractions is None else np.asarray(fractions)).assign(
            estimator="plugin")
    raise ValueError(f"variant must be 'theory' or 'reference', got {variant!r}")
