"""Labelled token-sequence generators whose population NTPS is known exactly.

Every NTPS the package prints is computed from sample moments, i.e. it estimates the NTPS of the
population the texts come from. To check an estimator (bias, spread, interval coverage) the truth
must be known, so each generator here gives its population moments in closed form
(`PopulationModel.population_moments`), and the population NTPS is the theory NTPS of those
moments (`PopulationModel.population_ntps`). Four families:

``factor_model`` (low-rank plus noise). Text n has T tokens
``h_{n,t} = F g_n + L mu_{y_n} + e_{n,t}``: a text-constant part (``F g_n``, g_n ~ N(0, I_q),
predictable from the prefix) and the label centroid ``L mu_y``; token noise
``e ~ N(0, Sigma_e)``, i.i.d. over t. With K = F F^T + L M_mu L^T (M_mu = sum_c p_c mu_c mu_c^T),
alpha = sum_{t<T} t^2 and beta = sum_{t<T} t::

    Sxx = K + Sigma_e / T    Sxy[:, c] = p_c L mu_c    C0 = alpha K + beta Sigma_e    C1 = beta K

``lds_model`` (linear dynamical system with class-dependent input):
``h_1 = b_y + w_1``, ``h_{t+1} = A h_t + b_y + w_{t+1}``, w ~ N(0, sigma_w^2 I). The covariance of
the state and of its prefix sum follows a class-independent recursion, the means a per-class one;
the moments are their sums (see `_lds_moments`).

The first two control the hidden size d, the number of classes C, the length T, the label
signal, the angle between the label directions and the predictable ones, and the eigenvalue
spacing of the perception and next-token problems (``gap``: "separated", "moderate", "tied").

``reflection_model``: the factor model with a mirror symmetry (centroids on a regular C-gon in
the plane of an "even" and an "odd" label direction), which puts the population NTPS at k = 1 at
a stationary point of the rotation of U's top pair: the case symmetric designs produce and the
generic families do not (its docstring).

``markov_model`` (discrete tokens): a class-dependent Markov chain over a vocabulary read through
embeddings, h_t = memory h_(t-1) + E[x_t], with imbalanced class priors. Its features are discrete
mixtures rather than Gaussian and its eigengaps are not planted: a population of another kind than
the three the estimators' settings were chosen on. Two more departures apply to the others:
`heavy_tailed` (Student t texts, any family) and the factor and LDS families' ``offset`` (a constant
vector that dominates the uncentred moments, a massive activation). docs/estimator.md, "Families the
calibration never saw", has what the default estimator does on all three.

Sampling is vectorised: `sample_shards` draws N texts and returns the moments of S disjoint
shards (the input of the shard estimators and intervals), in O(N T d^2).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from tqdm.auto import tqdm

from ntps_nb.core.moments import Moments
from ntps_nb.core.score import InterpolationWarning
from ntps_nb.core.subspaces import generalized_eigh

Gap = Literal["separated", "moderate", "tied"]

#: Ratio between consecutive eigenvalue scales of the planted spectra, per eigengap regime.
GAP_RATIOS = {"separated": 1.5, "moderate": 1.15, "tied": 1.0}
#: In the "tied" regime the spectra are flat up to this relative jitter (nearly tied, not exactly).
TIED_JITTER = 0.02
#: The ``n_texts`` of population moments: they are the limit of infinitely many texts, and a count this
#: large makes every finite-sample correction of the estimators vanish and no `InterpolationWarning` apply.
POPULATION_N_TEXTS = 2**31 - 1
#: `reflection_model`: ratio of U's even to its odd eigenvalue per eigengap regime (wider than
#: `GAP_RATIOS`, so that the pair is resolved well enough at N / d = 32 for the flag to accept rows there).
REFLECTION_RATIOS = {"separated": 4.0, "moderate": 2.0, "tied": 1.0 + TIED_JITTER}


def _spectrum(n: int, gap: str, rng: np.random.Generator) -> np.ndarray:
    """n decreasing positive scales with the spacing of ``gap`` (largest 1)."""
    if gap not in GAP_RATIOS:
        raise ValueError(f"gap must be one of {tuple(GAP_RATIOS)}, got {gap!r}")
    ratio = GAP_RATIOS[gap]
    if ratio == 1.0:
        scales = 1.0 - TIED_JITTER * np.sort(rng.random(n))
    else:
        scales = ratio ** -np.arange(n, dtype=np.float64)
    return np.sort(scales)[::-1]


def _orthonormal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _centroids(n_classes: int, rank: int, scales: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(C, rank) class centroids whose (uncentred, equal-prior) second moment has eigenvalues
    proportional to ``scales**2``."""
    left = _orthonormal(n_classes, rng)[:, :rank]
    right = _orthonormal(rank, rng)
    return np.sqrt(n_classes) * left @ np.diag(scales) @ right


def _offset(d: int, norm: float, seed: int) -> np.ndarray:
    """A fixed vector of length ``norm`` in a random direction (its own random stream: a model's other
    parameters are the same with or without it)."""
    direction = np.random.default_rng([int(seed), 505]).standard_normal(d)
    return float(norm) * direction / np.linalg.norm(direction)


@dataclass(frozen=True, eq=False)
class PopulationModel:
    """A labelled sequence generator with exact population moments.

    Attributes
    ----------
    family : "factor", "lds", "reflection" or "markov".
    d, n_classes, n_tokens : hidden size, classes C, tokens per text T.
    priors : (C,) class probabilities.
    settings : the generator's parameters (for provenance).
    """

    family: str
    d: int
    n_classes: int
    n_tokens: int
    priors: Float[np.ndarray, " C"]
    settings: dict
    _moments: Callable[[], Moments] = field(repr=False)
    _sampler: Callable[[np.ndarray, np.random.Generator], np.ndarray] = field(repr=False)

    def population_moments(self) -> Moments:
        """The NTPS moments of the population (expectations per text), exactly.

        Returns
        -------
        `Moments` with n_texts = `POPULATION_N_TEXTS` (the limit of infinitely many texts), n_tokens =
        T - 1 and ``x_mean``; Sxx, C0, C1 (d, d), Sxy (d, C), Syy (C, C) = diag(priors).
        """
        return self._moments()

    def population_ntps(self, ks) -> np.ndarray:
        """Population NTPS_theory at each k of ``ks`` (NaN beyond the population's r_V).

        Parameters
        ----------
        ks : (K,) integer numbers of next-token directions (a scalar is taken as K = 1).

        Returns
        -------
        (K,) float array.
        """
        from ntps_nb.core.score import theory_geometry
        from ntps_nb.core.intervals import theory_values

        return theory_values(theory_geometry(self.population_moments()), np.atleast_1d(ks))

    def sample_labels(self, n_texts: int, rng: np.random.Generator) -> np.ndarray:
        """Labels of ``n_texts`` texts drawn independently from the class priors.

        Parameters
        ----------
        n_texts : number of texts N.
        rng : the random generator to draw from.

        Returns
        -------
        (N,) integer array in 0..C-1.
        """
        return rng.choice(self.n_classes, size=int(n_texts), p=self.priors)

    def sample_sequences(self, labels: np.ndarray, rng: np.random.Generator) -> Float[np.ndarray, "N T d"]:
        """(N, T, d) token states of texts with the given labels.

        Parameters
        ----------
        labels : (N,) integer labels in 0..C-1.
        rng : the random generator to draw from.

        Returns
        -------
        (N, T, d) float64 array.
        """
        return self._sampler(np.asarray(labels), rng)


def factor_model(
    d: int = 64,
    n_classes: int = 4,
    *,
    n_tokens: int = 8,
    n_predictable: int | None = None,
    signal: float = 0.5,
    angle: float = np.pi / 4,
    gap: Gap = "moderate",
    token_noise: float = 1.0,
    unpredictable_noise: float = 4.0,
    offset: float = 0.0,
    seed: int = 0,
) -> PopulationModel:
    """Low-rank plus noise: text-constant predictable factors, label centroids, token noise.

    Parameters
    ----------
    d, n_classes, n_tokens : hidden size, classes, tokens per text (T >= 2).
    n_predictable : number q of predictable (text-constant) directions; default min(d // 2, 64).
    signal : scale of the label centroids (larger: larger eigenvalues of the perception problem).
    angle : angle between the label directions and the predictable span (0: labels lie in the
        most predictable directions; pi/2: in directions that carry only token noise).
    gap : eigenvalue spacing of both spectra ("separated", "moderate" or "tied").
    token_noise : isotropic token-noise scale.
    unpredictable_noise : extra token noise in the directions orthogonal to the predictable span.
    offset : length of a constant vector added to every state (0: none): a "massive activation", a
        common direction far larger than the rest that dominates the uncentred moments, as in real
        hidden states.
    seed : seed of the planted geometry (not of the samples).

    Returns
    -------
    `PopulationModel` of family "factor" with equal class priors.
    """
    rng = np.random.default_rng([int(seed), 101])
    q = min(d // 2, 64) if n_predictable is None else int(n_predictable)
    C = int(n_classes)
    rank = min(C, q, d - q)
    if not (1 <= q < d and rank >= 1):
        raise ValueError(f"need 1 <= n_predictable < d and room for the label directions: d={d}, q={q}, C={C}")
    frame = _orthonormal(d, rng)
    P, R = frame[:, :q], frame[:, q:]
    F = P * _spectrum(q, gap, rng)
    # label directions: a rotation of the first `rank` predictable directions towards unpredictable ones
    mix = _orthonormal(rank, rng)
    L = (np.cos(angle) * P[:, :rank] + np.sin(angle) * R[:, :rank]) @ mix
    mu = signal * _centroids(C, rank, _spectrum(rank, gap, rng), rng)  # (C, rank)
    noise_scales = np.full(d, float(token_noise) ** 2)
    noise_scales[q:] += float(unpredictable_noise) ** 2
    T = int(n_tokens)
    if T < 2:
        raise ValueError(f"n_tokens must be >= 2 (the next-token moments need a next token), got {T}")
    settings = dict(family="factor", d=d, n_classes=C, n_tokens=T, n_predictable=q, signal=signal,
                    angle=float(angle), gap=gap, token_noise=token_noise,
                    unpredictable_noise=unpredictable_noise, offset=float(offset), seed=seed)
    return _low_rank_plus_noise(F, L, mu, frame * np.sqrt(noise_scales), T, settings, _offset(d, offset, seed))


def _low_rank_plus_noise(F: np.ndarray, L: np.ndarray, mu: np.ndarray, noise_factor: np.ndarray, T: int,
                         settings: dict, offset: np.ndarray | None = None) -> PopulationModel:
    """The population ``h_{n,t} = F g_n + L mu_{y_n} + c + e_{n,t}`` (g ~ N(0, I), e = noise_factor z,
    z ~ N(0, I), i.i.d. over t; equal priors; c = ``offset``, default 0), its exact moments and its sampler
    (module docstring; c enters as a shift of every class centroid)."""
    d, C = F.shape[0], mu.shape[0]
    priors = np.full(C, 1.0 / C)
    Sigma_e = noise_factor @ noise_factor.T

    shift = np.zeros(d) if offset is None else np.asarray(offset, dtype=np.float64)

    def moments() -> Moments:
        centroids = mu @ L.T + shift  # (C, d)
        K = F @ F.T + (centroids.T * priors) @ centroids
        t = np.arange(1, T, dtype=np.float64)
        alpha, beta = float(np.sum(t**2)), float(np.sum(t))
        return Moments(Sxx=K + Sigma_e / T, Sxy=(centroids * priors[:, None]).T, Syy=np.diag(priors),
                       C0=alpha * K + beta * Sigma_e, C1=beta * K, n_texts=POPULATION_N_TEXTS, n_tokens=T - 1,
                       x_mean=priors @ centroids)

    def sampler(labels: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        n = labels.size
        constant = gen.standard_normal((n, F.shape[1])) @ F.T + mu[labels] @ L.T + shift
        noise = gen.standard_normal((n, T, d)) @ noise_factor.T
        return constant[:, None, :] + noise

    return PopulationModel(family=settings["family"], d=d, n_classes=C, n_tokens=T, priors=priors,
                           _moments=moments, _sampler=sampler, settings=settings)


def reflection_model(
    d: int = 16,
    n_classes: int = 3,
    *,
    n_tokens: int = 8,
    n_predictable: int | None = None,
    signal: float = 1.0,
    angle: float = np.pi / 4,
    gap: Gap = "moderate",
    token_noise: float = 1.0,
    unpredictable_noise: float = 4.0,
    seed: int = 0,
) -> PopulationModel:
    """A factor model with a mirror symmetry: the population NTPS at k = 1 sits at a stationary
    point of the rotation of U's top pair.

    The class centroids are the vertices of a regular C-gon in the plane of two label directions:
    an "even" one u1 = cos(angle) p + sin(angle) r (p the most predictable direction, r an
    unpredictable one) with a vertex on it, and an "odd" one u2, unpredictable and orthogonal to
    both. Reflecting u2 to -u2 (and relabelling the classes) leaves every population moment
    unchanged, so U's two directions are one even and one odd, V is even, and NTPS(k = 1) as a
    function of the angle phi by which U's top direction turns from the even towards the odd one
    is even in phi: its derivative is zero at the truth (phi = 0), a maximum (the odd direction
    carries none of V). There the error of the estimate is quadratic in the rotation, not linear:
    the case the rotation condition of the reliability flag cannot linearise. Symmetric designs
    (axis-aligned covariances, centroids placed symmetrically) have such points wherever an even
    and an odd direction are nearly tied; in the generic families NTPS has a nonzero slope in the
    rotation (tests/core/test_simulate.py checks one factor model).

    ``gap`` sets the ratio of the even to the odd perception eigenvalue (`REFLECTION_RATIOS`), the
    even one on top; the predictable factors' spectrum is always "separated", so V is resolved. The
    seed draws the frame (the design is symmetric in any frame). At ``angle = 0`` the even direction
    lies in V and the odd one outside it, so at k = 2 (U the whole pair) every principal angle between
    U and V is 0 or 90 degrees and NTPS = 0.5: a stationary point of NTPS inside (0, 1) of another
    kind (docs/estimator.md, "A truth at a stationary point of the rotation").

    Parameters
    ----------
    d, n_classes : hidden size (at least n_predictable + 2) and classes (C >= 3: the centroids span the plane).
    n_tokens, n_predictable, signal, token_noise, unpredictable_noise, seed : as in `factor_model`
        (``signal`` scales the even direction's centroids; n_predictable defaults to min(d // 2, 64)).
    angle : angle of u1 from the predictable direction p (0: U's top direction lies in V).
    gap : the ratio of U's two eigenvalues ("separated", "moderate" or "tied").

    Returns
    -------
    `PopulationModel` of family "reflection" with equal class priors.
    """
    rng = np.random.default_rng([int(seed), 303])
    C, T = int(n_classes), int(n_tokens)
    q = min(d // 2, 64) if n_predictable is None else int(n_predictable)
    if C < 3:
        raise ValueError(f"the reflection model needs n_classes >= 3 (a C-gon spans the plane), got {C}")
    if not 1 <= q <= d - 2:
        raise ValueError(f"need 1 <= n_predictable <= d - 2 (two unpredictable directions): d={d}, q={q}")
    if T < 2:
        raise ValueError(f"n_tokens must be >= 2 (the next-token moments need a next token), got {T}")
    if gap not in REFLECTION_RATIOS:
        raise ValueError(f"gap must be one of {tuple(REFLECTION_RATIOS)}, got {gap!r}")
    ratio = REFLECTION_RATIOS[gap]
    frame = _orthonormal(d, rng)
    F = frame[:, :q] * _spectrum(q, "separated", rng)
    noise_scales = np.full(d, float(token_noise) ** 2)
    noise_scales[q:] += float(unpredictable_noise) ** 2
    u1 = np.cos(angle) * frame[:, 0] + np.sin(angle) * frame[:, q]
    u2 = frame[:, q + 1]
    # The odd direction's eigenvalue in closed form: u2 is an eigenvector of Sxx (noise n2 plus the
    # centroids' x = s2^2 / 2) and of A = Sxy Sxy^T = M_mu / C, so lambda_odd = (x / C) / (n2 / T + x).
    even = _low_rank_plus_noise(F, u1[:, None], np.sqrt(2.0) * signal * np.cos(2 * np.pi * np.arange(C) / C)[:, None],
                                frame * np.sqrt(noise_scales), T, {"family": "reflection"})
    even_moments = even.population_moments()
    lam_even = float(generalized_eigh(even_moments.Sxx, A_factor=even_moments.Sxy).eigenvalues[0])
    lam_odd = lam_even / ratio
    if not 0 < lam_odd * C < 1:
        raise ValueError(f"no odd scale gives the eigenvalue {lam_odd:.3g} with C = {C}")
    x = lam_odd * C * (noise_scales[q + 1] / T) / (1 - lam_odd * C)
    angles = 2 * np.pi * np.arange(C) / C
    mu = np.column_stack([np.sqrt(2.0) * signal * np.cos(angles), np.sqrt(2 * x) * np.sin(angles)])  # (C, 2)
    settings = dict(family="reflection", d=d, n_classes=C, n_tokens=T, n_predictable=q, signal=signal,
                    angle=float(angle), gap=gap, token_noise=token_noise,
                    unpredictable_noise=unpredictable_noise, seed=seed)
    return _low_rank_plus_noise(F, np.column_stack([u1, u2]), mu, frame * np.sqrt(noise_scales), T, settings)


def _lds_moments(A, B_inputs, priors, noise_var, T) -> Moments:
    """Exact moments of h_1 = b + w_1, h_{t+1} = A h_t + b + w_{t+1} mixed over classes.

    Covariances (class-independent): Shh(t) = Cov h_t, Ssh(t) = Cov(s_t, h_t), Sss(t) = Cov s_t;
    means m_h(t), m_s(t) per class. Second moments are covariance plus the prior-weighted mean
    outer products.
    """
    d = A.shape[0]
    Q = noise_var * np.eye(d)
    Shh, Ssh, Sss = Q.copy(), Q.copy(), Q.copy()
    mh = B_inputs.copy()  # (C, d)
    ms = B_inputs.copy()
    C0 = np.zeros((d, d))
    C1 = np.zeros((d, d))
    n_pairs = 0
    for _ in range(1, T):
        # pair (s_t, h_{t+1}), then advance to t + 1
        mh_next = mh @ A.T + B_inputs
        C0 += Sss + (ms.T * priors) @ ms
        C1 += Ssh @ A.T + (ms.T * priors) @ mh_next
        n_pairs += 1
        Shh_next = A @ Shh @ A.T + Q
        Ssh_next = Ssh @ A.T + Shh_next
        Sss = Sss + Ssh @ A.T + A @ Ssh.T + Shh_next
        Shh, Ssh = Shh_next, Ssh_next
        mh, ms = mh_next, ms + mh_next
    Sxx = (Sss + (ms.T * priors) @ ms) / T**2
    Sxy = (ms * priors[:, None]).T / T
    return Moments(Sxx=Sxx, Sxy=Sxy, Syy=np.diag(priors), C0=C0, C1=C1, n_texts=POPULATION_N_TEXTS, n_tokens=n_pairs,
                   x_mean=priors @ ms / T)


def lds_model(
    d: int = 64,
    n_classes: int = 4,
    *,
    n_tokens: int = 8,
    signal: float = 0.5,
    angle: float = np.pi / 4,
    gap: Gap = "moderate",
    max_persistence: float = 0.9,
    noise: float = 1.0,
    offset: float = 0.0,
    seed: int = 0,
) -> PopulationModel:
    """Linear dynamical system with class-dependent constant input.

    Parameters
    ----------
    d, n_classes, n_tokens : hidden size, classes, tokens per text (T >= 2).
    signal : scale of the class inputs b_c.
    angle : angle between the input directions and the most persistent (predictable) modes of A
        (0: inputs drive the slowest modes; pi/2: the fastest).
    gap : spacing of A's persistence spectrum and of the class inputs' singular values.
    max_persistence : largest eigenvalue of the symmetric transition matrix A, in (0, 1).
    noise : standard deviation of the state noise w.
    offset : length of a constant input c added to every class's (0: none); the states' common mean,
        sum_j A^j c, then dominates the uncentred moments, as a "massive activation" does in real hidden states.
    seed : seed of the planted geometry.

    Returns
    -------
    `PopulationModel` of family "lds" with equal class priors.
    """
    rng = np.random.default_rng([int(seed), 202])
    C = int(n_classes)
    T = int(n_tokens)
    if T < 2:
        raise ValueError(f"n_tokens must be >= 2, got {T}")
    if not 0 < max_persistence < 1:
        raise ValueError(f"max_persistence must lie in (0, 1), got {max_persistence}")
    rank = min(C, d // 2)
    frame = _orthonormal(d, rng)
    rho = max_persistence * _spectrum(d, gap, rng)
    A = (frame * rho) @ frame.T
    slow, fast = frame[:, :rank], frame[:, d - rank:]
    directions = (np.cos(angle) * slow + np.sin(angle) * fast) @ _orthonormal(rank, rng)
    inputs = signal * _centroids(C, rank, _spectrum(rank, gap, rng), rng) @ directions.T + _offset(d, offset, seed)
    priors = np.full(C, 1.0 / C)
    noise_var = float(noise) ** 2

    def moments() -> Moments:
        return _lds_moments(A, inputs, priors, noise_var, T)

    def sampler(labels: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        n = labels.size
        b = inputs[labels]
        out = np.empty((n, T, d))
        h = b + noise * gen.standard_normal((n, d))
        out[:, 0] = h
        for t in range(1, T):
            h = h @ A.T + b + noise * gen.standard_normal((n, d))
            out[:, t] = h
        return out

    return PopulationModel(
        family="lds", d=d, n_classes=C, n_tokens=T, priors=priors, _moments=moments, _sampler=sampler,
        settings=dict(family="lds", d=d, n_classes=C, n_tokens=T, signal=signal, angle=float(angle), gap=gap,
                      max_persistence=max_persistence, noise=noise, offset=float(offset), seed=seed),
    )


def _markov_moments(E, start, trans, priors, memory, T) -> Moments:
    """Exact moments of the Markov token model (`markov_model`).

    With o_s the one-hot of token s, h_t = E' sum_{s<=t} memory^(t-s) o_s, so every moment is E' Q E
    with Q = sum_{s,u} b_s c_u E[o_s o_u'] for the tokens' coefficients b, c of the two features, and
    E[o_s o_u' | y] = diag(pi_s) P^(u - s) for s <= u (pi_s the class's token marginal at s, P its
    transition matrix).
    """
    V, d = E.shape
    steps = np.arange(T)
    lag = np.subtract.outer(steps, steps)
    decay = np.where(lag >= 0, float(memory) ** np.clip(lag, 0, None), 0.0)  # (t, s): h_t's weight on o_s
    x_coef = decay.T @ np.full(T, 1.0 / T)
    prefix = [decay.T @ (steps <= t) for t in range(T - 1)]  # s_t = h_0 + ... + h_t
    following = [decay[t + 1] for t in range(T - 1)]  # h_(t+1)
    Sxx, C0, C1 = np.zeros((d, d)), np.zeros((d, d)), np.zeros((d, d))
    Sxy, x_mean = np.zeros((d, len(priors))), np.zeros(d)
    for c, p in enumerate(priors):
        powers = [np.eye(V)]
        for _ in range(T - 1):
            powers.append(powers[-1] @ trans[c])
        marginals = np.stack([start[c] @ power for power in powers])  # (T, V)
        joint = np.empty((T, T, V, V))
        for s in range(T):
            for u in range(s, T):
                joint[s, u] = marginals[s][:, None] * powers[u - s]
                joint[u, s] = joint[s, u].T

        def second(b, c_):
            return E.T @ np.einsum("s,u,suvw->vw", b, c_, joint) @ E

        mean_x = E.T @ (x_coef @ marginals)
        Sxx += p * second(x_coef, x_coef)
        Sxy[:, c] = p * mean_x
        x_mean += p * mean_x
        C0 += p * sum(second(b, b) for b in prefix)
        C1 += p * sum(second(b, f) for b, f in zip(prefix, following))
    return Moments(Sxx=Sxx, Sxy=Sxy, Syy=np.diag(priors), C0=C0, C1=C1, n_texts=POPULATION_N_TEXTS,
                   n_tokens=T - 1, x_mean=x_mean)


def markov_model(
    d: int = 16,
    n_classes: int = 4,
    *,
    n_tokens: int = 8,
    vocabulary: int | None = None,
    memory: float = 0.7,
    signal: float = 0.5,
    concentration: float = 0.3,
    imbalance: float = 1.0,
    gap: Gap = "moderate",
    seed: int = 0,
) -> PopulationModel:
    """Discrete tokens: a class-dependent Markov chain over a vocabulary, read through embeddings.

    Text n's tokens x_1..x_T follow a Markov chain whose start distribution and transition matrix
    depend on the label: P_y = (1 - signal) P_0 + signal Q_y, every row of P_0 and Q_y drawn from a
    Dirichlet with ``concentration`` (small: sparse, peaked transitions); the state is a decaying sum
    of the tokens' embeddings, h_t = memory h_(t-1) + E[x_t] (E: vocabulary x d). Class priors are
    unequal, p_c proportional to (c + 1)^-imbalance. Unlike the other families the features are
    discrete mixtures, not Gaussian, the classes are imbalanced, and the eigenvalue spacing of the
    perception and next-token problems is not planted: ``gap`` sets only the spacing of the
    embeddings' singular values. A family to check the estimators on a population their calibration
    never saw; the moments are exact (`_markov_moments`).

    Parameters
    ----------
    d, n_classes, n_tokens : hidden size, classes, tokens per text (T >= 2).
    vocabulary : number of token types V (default 4 d; at least d, so that the features span R^d).
    memory : decay of the state in [0, 1) (0: h_t is the embedding of token t alone).
    signal : in [0, 1], how far each class's chain departs from the shared one.
    concentration : Dirichlet concentration of the chains' rows (> 0).
    imbalance : exponent of the class priors (0: equal priors).
    gap : spacing of the embeddings' singular values ("separated", "moderate" or "tied").
    seed : seed of the chains and embeddings (not of the samples).

    Returns
    -------
    `PopulationModel` of family "markov".
    """
    rng = np.random.default_rng([int(seed), 404])
    C, T = int(n_classes), int(n_tokens)
    V = 4 * int(d) if vocabulary is None else int(vocabulary)
    if T < 2:
        raise ValueError(f"n_tokens must be >= 2 (the next-token moments need a next token), got {T}")
    if V < d:
        raise ValueError(f"vocabulary must be at least d (the embeddings span R^d), got {V} < {d}")
    if not (0 <= memory < 1 and 0 <= signal <= 1 and concentration > 0 and imbalance >= 0 and C >= 2):
        raise ValueError(f"need 0 <= memory < 1, 0 <= signal <= 1, concentration > 0, imbalance >= 0 and "
                         f"n_classes >= 2, got {memory}, {signal}, {concentration}, {imbalance}, {C}")
    E = rng.standard_normal((V, d)) / np.sqrt(V) @ np.diag(_spectrum(d, gap, rng)) @ _orthonormal(d, rng)
    shared_start = rng.dirichlet(np.full(V, concentration))
    shared = rng.dirichlet(np.full(V, concentration), size=V)
    start = (1 - signal) * shared_start + signal * rng.dirichlet(np.full(V, concentration), size=C)  # (C, V)
    trans = (1 - signal) * shared + signal * rng.dirichlet(np.full(V, concentration), size=(C, V))  # (C, V, V)
    priors = (np.arange(1, C + 1, dtype=np.float64) ** -float(imbalance))
    priors /= priors.sum()
    start_cdf, trans_cdf = np.cumsum(start, axis=-1), np.cumsum(trans, axis=-1)

    def moments() -> Moments:
        return _markov_moments(E, start, trans, priors, memory, T)

    def sampler(labels: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        draws = gen.random((labels.size, T))
        tokens = np.empty((labels.size, T), dtype=np.int64)
        tokens[:, 0] = (start_cdf[labels] < draws[:, :1]).sum(axis=1)
        for t in range(1, T):
            tokens[:, t] = (trans_cdf[labels, tokens[:, t - 1]] < draws[:, t:t + 1]).sum(axis=1)
        out = E[np.minimum(tokens, V - 1)]  # a draw above the cdf's rounded last entry is the last token
        for t in range(1, T):
            out[:, t] += memory * out[:, t - 1]
        return out

    return PopulationModel(
        family="markov", d=d, n_classes=C, n_tokens=T, priors=priors, _moments=moments, _sampler=sampler,
        settings=dict(family="markov", d=d, n_classes=C, n_tokens=T, vocabulary=V, memory=memory, signal=signal,
                      concentration=concentration, imbalance=imbalance, gap=gap, seed=seed),
    )


def heavy_tailed(model: PopulationModel, df: float) -> PopulationModel:
    """``model`` with each text's whole sequence scaled by its own random factor: heavy-tailed texts.

    Text n's states become s_n h_(n,t) with s_n^2 = (df - 2) / chi2_df drawn independently of the text and its
    label, so that E[s^2] = 1: each text is a multivariate Student t in the Gaussian families (kurtosis infinite
    at df <= 4), the way a few texts with outsized activations dominate a sample of real hidden states. The
    second moments Sxx, C0, C1 are unchanged and the label moments scale by E[s] (Sxy and x_mean), so the
    population moments stay exact.

    Parameters
    ----------
    model : any `PopulationModel`.
    df : degrees of freedom of the scale (> 2; smaller: heavier tails).

    Returns
    -------
    `PopulationModel` of the same family, its settings with ``tails = df``.
    """
    import scipy.special

    if not df > 2:
        raise ValueError(f"df must be > 2 (E[s^2] = 1 needs a finite variance), got {df}")
    df = float(df)
    log_ratio = scipy.special.gammaln((df - 1) / 2) - scipy.special.gammaln(df / 2)
    mean_scale = float(np.sqrt((df - 2) / 2) * np.exp(log_ratio))

    def moments() -> Moments:
        m = model.population_moments()
        return replace(m, Sxy=mean_scale * m.Sxy, x_mean=None if m.x_mean is None else mean_scale * m.x_mean)

    def sampler(labels: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        states = model.sample_sequences(labels, gen)
        return states * np.sqrt((df - 2) / gen.chisquare(df, size=labels.size))[:, None, None]

    return PopulationModel(family=model.family, d=model.d, n_classes=model.n_classes, n_tokens=model.n_tokens,
                           priors=model.priors, _moments=moments, _sampler=sampler,
                           settings={**model.settings, "tails": df})


#: The generator families by name (`PopulationModel.family`), for scripts and notebooks that pick one.
FAMILIES: dict[str, Callable[..., PopulationModel]] = {"factor": factor_model, "lds": lds_model,
                                                       "reflection": reflection_model, "markov": markov_model}


def moments_of_array(sequences: Float[np.ndarray, "N T d"], labels: np.ndarray, n_classes: int) -> Moments:
    """The NTPS moments of equal-length sequences, vectorised (equals `moments_from_sequences`).

    Parameters
    ----------
    sequences : (N, T, d) token states.
    labels : (N,) integer labels in 0..C-1.
    n_classes : number of label columns C.

    Returns
    -------
    `Moments` with n_texts = N, n_tokens = N (T - 1) and ``x_mean``; ``Shh`` is not computed.
    """
    X = np.asarray(sequences, dtype=np.float64)
    n, T, d = X.shape
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), labels] = 1.0
    xbar = X.mean(axis=1)
    S = np.cumsum(X, axis=1)[:, :-1].reshape(-1, d)
    H = X[:, 1:].reshape(-1, d)
    return Moments(Sxx=xbar.T @ xbar / n, Sxy=xbar.T @ Y / n, Syy=np.diag(Y.sum(axis=0) / n),
                   C0=S.T @ S / n, C1=S.T @ H / n, n_texts=n, n_tokens=n * (T - 1), x_mean=xbar.mean(axis=0))


def _shard_sizes(n_texts: int, n_shards: int, weights: Sequence[float] | None) -> np.ndarray:
    """Texts per shard: equal (floor or ceil) without ``weights``, else proportional to them (largest
    remainders), each at least 1."""
    if weights is None:
        sizes = np.full(n_shards, n_texts // n_shards)
        sizes[: n_texts % n_shards] += 1
        return sizes
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_shards,) or not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"weights must be {n_shards} positive finite numbers, got {weights!r}")
    share = 1 + (n_texts - n_shards) * w / w.sum()        # one text each, the rest by weight
    sizes = np.floor(share).astype(np.int64)
    sizes[np.argsort(sizes - share)[: n_texts - sizes.sum()]] += 1
    return sizes


def sample_shards(model: PopulationModel, n_texts: int, n_shards: int, rng: np.random.Generator,
                  *, block: int = 4096, weights: Sequence[float] | None = None) -> list[Moments]:
    """Draw n_texts texts and return the moments of n_shards disjoint random shards.

    Texts are generated in blocks of at most ``block`` per shard to bound memory; every shard
    holds floor or ceil of n_texts / n_shards texts, or with ``weights`` about n_texts times its
    weight's share (floors, the remainder to the largest fractional parts, at least one text each),
    as shards of unequal sizes (files, workers) would. A shard missing a class is allowed (its Syy
    has a zero), since shards are combined before anything is solved.

    Parameters
    ----------
    model : the `PopulationModel` to sample from.
    n_texts : number of texts N.
    n_shards : number of shards S, 1 <= S <= N.
    rng : the random generator (labels and sequences are drawn from it in order).
    block : largest number of texts generated at once.
    weights : (S,) positive relative shard sizes, or None (equal shards).

    Returns
    -------
    list of S `Moments`.
    """
    n_texts, n_shards = int(n_texts), int(n_shards)
    if not 1 <= n_shards <= n_texts:
        raise ValueError(f"need 1 <= n_shards <= n_texts, got n_shards={n_shards}, n_texts={n_texts}")
    sizes = _shard_sizes(n_texts, n_shards, weights)
    shards = []
    for size in sizes:
        parts = []
        for start in range(0, size, block):
            labels = model.sample_labels(min(block, size - start), rng)
            parts.append(moments_of_array(model.sample_sequences(labels, rng), labels, model.n_classes))
        shards.append(parts[0] if len(parts) == 1 else Moments.combine(parts))
    return shards


def pair_shards(delta: float, n_draws: int, n_shards: int, rng: np.random.Generator) -> np.ndarray:
    """Shard matrices of the exact two-dimensional eigenvector model, the known truth of a nearly
    tied pair of eigenvalues.

    Each shard's matrix is diag(sqrt(2) delta, 0) + noise, with independent normal noise of SD
    sqrt(S) on each diagonal entry and sqrt(S / 2) on the off-diagonal one (S = ``n_shards``), so
    the mean of the S shards has the population eigenvectors e_1, e_2 and a gap delta times the SD
    of its diagonal difference's noise (the population eigengap ratio).

    Parameters
    ----------
    delta : the population gap over the SD of the mean's diagonal difference.
    n_draws : independent draws.
    n_shards : shards per draw, S.
    rng : the random generator (one standard normal array of shape (n_draws, S, 3) is drawn).

    Returns
    -------
    (n_draws, S, 2, 2) float64, symmetric.
    """
    S = int(n_shards)
    noise = rng.standard_normal((int(n_draws), S, 3)) * np.sqrt(S)
    m = np.zeros((int(n_draws), S, 2, 2))
    m[..., 0, 0] = delta * np.sqrt(2) + noise[..., 0]
    m[..., 1, 1] = noise[..., 1]
    m[..., 0, 1] = m[..., 1, 0] = noise[..., 2] / np.sqrt(2)
    return m


# --------------------------------------------------------------------------------------------
# Bias, spread and coverage of estimators, over a grid of generators and sizes


def estimator_map(
    models: Sequence[PopulationModel],
    n_over_d: Sequence[float],
    ks: Sequence[int],
    *,
    estimators: Sequence[str] = ("plugin", "crossfit"),
    n_draws: int = 50,
    n_shards: int = 10,
    level: float = 0.90,
    seed: int = 0,
    first_draw: int = 0,
    progress: bool = False,
    interval: str | None = None,
    device: Any = None,
    shard_weights: Sequence[float] | None = None,
    flag_any_estimator: bool = True,
    stationary_flag: bool = True,
    rotation_widening: bool = True,
    widening_level: float | None = None,
    stationary_widening: bool = True,
) -> pd.DataFrame:
    """Draw samples from each model at each N = n_over_d * d and record every estimator's value,
    interval and reliability flag against the population NTPS.

    k values beyond the population's or the sample's rank give NaN estimates and are kept; an
    estimator that raises on a draw gives a row of NaN with the exception in ``failure`` (so a map
    never drops a draw silently: `summarise_map` counts them as ``n_failed``). `summarise_map` turns
    the frame into bias / SD / RMSE / coverage with Monte Carlo errors.

    Parameters
    ----------
    models : the `PopulationModel` generators.
    n_over_d : (R,) ratios N / d; N = max(round(ratio * d), n_shards).
    ks : (K,) numbers of next-token directions.
    estimators : names from `ESTIMATORS`, passed to `ntps_estimate`.
    n_draws : samples per (model, N).
    n_shards : shards per sample (jackknife units).
    level : coverage level of the intervals.
    seed : seed of the draws.
    first_draw : index of the first draw: draws first_draw .. first_draw + n_draws - 1 (each draw's
        sample is seeded by its index, so a map split into ranges of draws equals the whole map).
    progress : show a progress bar.
    interval : `ntps_estimate`'s interval (None, the default: "quadratic" for "richardson", "jackknife"
        for the others; "jackknife"; "rotation"; "quadratic", for "richardson" only).
    device : `ntps_estimate`'s ``device`` (None: numpy; a torch device such as "cuda": the estimators of
        `ntps_nb.core.estimators.DEVICE_ESTIMATORS` solved there).
    shard_weights : (n_shards,) relative shard sizes (`sample_shards`' ``weights``), or None (equal).
    flag_any_estimator : `ntps_estimate`'s: True (the default here) marks every estimator's rows reliable by the
        flag's conditions, so that the map compares estimators on the rows the flag accepts (how the default was
        chosen, and how the plug-in's such rows were found to under-cover); False gives what a user of
        `ntps_estimate` gets, reliable rows only for `ntps_nb.core.estimators.CALIBRATED_ESTIMATORS`.
    stationary_flag : `ntps_estimate`'s: True (its default) gives the flag its stationary condition and the rows
        ``stationary_distance``; False, the flag without it (and no such column).
    rotation_widening : `ntps_estimate`'s: True (its default) widens the reliable rows' interval over the rotation
        sets of the pairs at k, the interval before it in ``lower_unwidened`` / ``upper_unwidened``; False, the
        interval as it is (and no such columns).
    widening_level : `ntps_estimate`'s (None: its default, `ntps_nb.core.rotation.WIDENING_LEVEL`).
    stationary_widening : `ntps_estimate`'s (its default, True; off without ``stationary_flag``): the reliable rows'
        interval joined with the values NTPS takes where the angles the data cannot separate from a bound are at it.
        The rows carry stationary_lower / stationary_upper either way, so `ntps_nb.core.estimators.stationary_widening`
        applies it to a frame drawn without it (as benchmarks/unseen_family_check.py does, to read both).

    Returns
    -------
    DataFrame, one row per (model, N, draw, estimator, k): the columns of `ntps_estimate`, failure
    (the exception `ntps_estimate` raised on the draw, as "Type: message"; empty where it did not),
    truth, n_over_d, n_texts, draw, model (index), covered, error (estimate - truth) and the model's
    settings as ``task_*``.
    """
    from ntps_nb.core.estimators import FlagNotCalibratedWarning, ntps_estimate

    ks = np.asarray(ks, dtype=np.int64)
    if interval == "quadratic" and set(estimators) != {"richardson"}:
        raise ValueError(f"interval='quadratic' is derived for the estimator 'richardson', got {list(estimators)}")
    widening = {} if widening_level is None else {"widening_level": widening_level}
    rows = []
    total = len(models) * len(n_over_d) * int(n_draws)
    bar = tqdm(total=total, disable=not progress, desc="estimator map")
    for mi, model in enumerate(models):
        truth = model.population_ntps(ks)
        for ratio in n_over_d:
            n_texts = max(int(round(ratio * model.d)), n_shards)
            for draw in range(int(first_draw), int(first_draw) + int(n_draws)):
                rng = np.random.default_rng([int(seed), mi, int(round(ratio * 1000)), draw])
                shards = sample_shards(model, n_texts, n_shards, rng, weights=shard_weights)
                for estimator in estimators:
                    try:
                        # the map's rows carry n_over_d (N <= d is theirs to read) and the estimator (whose flag
                        # is calibrated is the map's to say)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", InterpolationWarning)
                            warnings.simplefilter("ignore", FlagNotCalibratedWarning)
                            table = ntps_estimate(shards, ks, estimator=estimator, level=level, seed=draw,
                                                  interval=interval, device=device,
                                                  flag_any_estimator=flag_any_estimator,
                                                  stationary_flag=stationary_flag,
                                                  rotation_widening=rotation_widening,
                                                  stationary_widening=stationary_widening, progress=False,
                                                  **widening)
                        failure = ""
                    except (ValueError, np.linalg.LinAlgError) as error:   # kept, and said: a draw it cannot estimate
                        failure = f"{type(error).__name__}: {error}"
                        table = pd.DataFrame({"k": ks, "estimator": estimator, "estimate": np.nan, "se": np.nan,
                                              "lower": np.nan, "upper": np.nan, "reliability": np.nan,
                                              "reliable": False})
                    table = table.assign(failure=failure, truth=truth, n_over_d=float(ratio), n_texts=n_texts,
                                         draw=draw, model=mi,
                                         **{f"task_{k}": v for k, v in model.settings.items()})
                    rows.append(table)
                bar.update()
    bar.close()
    out = pd.concat(rows, ignore_index=True)
    out["covered"] = (out["lower"] <= out["truth"]) & (out["truth"] <= out["upper"])
    out["error"] = out["estimate"] - out["truth"]
    return out


def _failed(frame: pd.DataFrame) -> np.ndarray:
    """Whether the estimator raised on each row of an `estimator_map` frame (False where the frame,
    read from a file written before the column, has no ``failure``; an empty message reads back as NaN)."""
    if "failure" not in frame:
        return np.zeros(len(frame), dtype=bool)
    return (frame["failure"].notna() & (frame["failure"].astype(object) != "")).to_numpy()


def summarise_map(frame: pd.DataFrame, *, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Per cell: bias, SD, RMSE and coverage of each estimator, with Monte Carlo standard errors,
    over all draws and over the draws its reliability flag accepts.

    A draw whose estimate is NaN (undefined at that k, or the estimator raised: ``n_failed``) counts
    as not covered and is left out of bias / SD / RMSE (``n_defined`` says how many were defined).
    Rows with a non-finite truth are dropped.

    Parameters
    ----------
    frame : DataFrame returned by `estimator_map`.
    by : columns defining a cell (default: those of task_family, task_d, task_n_classes, task_gap,
        n_over_d, k, estimator that are present).

    Returns
    -------
    DataFrame, one row per cell: the ``by`` columns, truth, draws, n_defined, n_failed (draws on which
    the estimator raised; 0 for a frame without a ``failure`` column), bias, bias_mcse, sd,
    rmse, coverage, coverage_mcse, mean_width, share_reliable, n_reliable, bias_reliable,
    rmse_reliable, coverage_reliable, coverage_reliable_mcse, width_reliable.
    """
    by = list(by) if by is not None else [c for c in ("task_family", "task_d", "task_n_classes", "task_gap",
                                                           "n_over_d", "k", "estimator") if c in frame.columns]
    frame = frame[np.isfinite(frame["truth"])]

    def cell(g: pd.DataFrame) -> pd.Series:
        err = g["error"].to_numpy()
        ok = np.isfinite(err)
        n = len(g)
        cov = g["covered"].to_numpy(dtype=float)
        rel = g["reliable"].to_numpy(dtype=bool)
        width = (g["upper"] - g["lower"]).to_numpy()
        out = {
            "truth": float(g["truth"].iloc[0]), "draws": n, "n_defined": int(ok.sum()),
            "n_failed": int(_failed(g).sum()),
            "bias": np.mean(err[ok]) if ok.any() else np.nan,
            "bias_mcse": np.std(err[ok], ddof=1) / np.sqrt(ok.sum()) if ok.sum() > 1 else np.nan,
            "sd": np.std(err[ok], ddof=1) if ok.sum() > 1 else np.nan,
            "rmse": np.sqrt(np.mean(err[ok] ** 2)) if ok.any() else np.nan,
            "coverage": cov.mean(), "coverage_mcse": np.sqrt(cov.mean() * (1 - cov.mean()) / n),
            "mean_width": np.nanmean(width) if np.isfinite(width).any() else np.nan,
            "share_reliable": rel.mean(),
        }
        r_ok = rel & ok
        nr = int(r_ok.sum())
        out.update({
            "n_reliable": nr,
            "bias_reliable": np.mean(err[r_ok]) if nr else np.nan,
            "rmse_reliable": np.sqrt(np.mean(err[r_ok] ** 2)) if nr else np.nan,
            "coverage_reliable": cov[r_ok].mean() if nr else np.nan,
            "coverage_reliable_mcse": np.sqrt(cov[r_ok].mean() * (1 - cov[r_ok].mean()) / nr) if nr else np.nan,
            "width_reliable": np.mean(width[r_ok]) if nr else np.nan,
        })
        return pd.Series(out)

    return frame.groupby(by, sort=True).apply(cell, include_groups=False).reset_index()


#: The moment groups `bias_decomposition` replaces by their population values, one at a time.
SOURCES = {"perception (Sxy)": ("Sxy",), "next-token (C0, C1)": ("C0", "C1"), "whitening (Sxx)": ("Sxx",)}


def bias_decomposition(
    model: PopulationModel,
    n_texts: int,
    ks: Sequence[int],
    *,
    estimators: Sequence[str] = ("plugin",),
    n_draws: int = 40,
    n_shards: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Where does an estimator's bias come from? Replace one group of sample moments at a time by
    its population value and see how much bias is left.

    For each draw, the shard moments are used as sampled ("all sampled") and with exactly one of
    `SOURCES` left noisy while the other moments are set to their population values in every shard
    (e.g. "only perception (Sxy) sampled"). The bias that remains when only one source is noisy is
    that source's contribution (the contributions need not add up: the estimators are nonlinear).
    "Sxy and Sxx sampled" keeps the two moments of the pooled states noisy together (C0, C1 exact).

    Parameters
    ----------
    model : the `PopulationModel` to sample from.
    n_texts : texts per draw N.
    ks : (K,) numbers of next-token directions.
    estimators : names from `ESTIMATORS`, passed to `estimate_ntps`.
    n_draws : number of samples.
    n_shards : shards per sample.
    seed : seed of the draws.

    Returns
    -------
    DataFrame, one row per (estimator, k, what is sampled): estimator, k, sampled, truth, bias,
    bias_mcse, sd, n_defined, n_texts and the model's settings as ``task_*``.
    """
    from ntps_nb.core.estimators import estimate_ntps

    ks = np.asarray(ks, dtype=np.int64)
    population = model.population_moments()
    truth = model.population_ntps(ks)
    exact = {name: getattr(population, name) for name in ("Sxx", "Sxy", "C0", "C1")}
    variants = {"all sampled": ()}
    for label, names in SOURCES.items():
        variants[f"only {label} sampled"] = tuple(n for n in exact if n not in names)
    # the label and whitening moments come from the same pooled states: their joint effect
    variants["Sxy and Sxx sampled"] = ("C0", "C1")
    values: dict[tuple[str, str], list[np.ndarray]] = {}
    for draw in range(int(n_draws)):
        shards = sample_shards(model, n_texts, n_shards, np.random.default_rng([int(seed), draw]))
        for label, fixed in variants.items():
            parts = [replace(s, **{n: exact[n] for n in fixed}) for s in shards]
            for estimator in estimators:
                values.setdefault((estimator, label), []).append(estimate_ntps(parts, ks, estimator=estimator).estimate)
    rows = []
    for (estimator, label), v in values.items():
        v = np.asarray(v)
        err = v - truth
        n_ok = np.isfinite(err).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(err, axis=0) / n_ok
            sd = np.sqrt(np.nansum((err - mean) ** 2, axis=0) / (n_ok - 1))
        for i, k in enumerate(ks):
            rows.append({"estimator": estimator, "k": int(k), "sampled": label, "truth": truth[i], "bias": mean[i],
                         "bias_mcse": sd[i] / np.sqrt(n_ok[i]) if n_ok[i] > 1 else np.nan, "sd": sd[i],
                         "n_defined": int(n_ok[i]), "n_texts": int(n_texts),
                         **{f"task_{key}": value for key, value in model.settings.items()}})
    return pd.DataFrame(rows)
