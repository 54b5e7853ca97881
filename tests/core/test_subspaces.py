"""The eigensolves' LAPACK front end: numpy's for the analysis, scipy's for the released algorithm only.

pip's numpy and scipy each bundle an OpenBLAS with its own thread pool; analysis code that alternates scipy's
LAPACK with numpy's products runs the two pools against each other (`benchmarks/bench_blas_pools.py`). These
tests pin which front end each path uses, and that the two agree where the answer is unique.
"""

import numpy as np
import pytest
import scipy.linalg

from ntps_nb.core.estimators import ntps_estimate
from ntps_nb.core.moments import Moments
from ntps_nb.core.peers import h_score, h_score_ledoit_wolf
from ntps_nb.core.score import ntps_sweep, reference_geometry, theory_geometry
from ntps_nb.core.simulate import lds_model, sample_shards
from ntps_nb.core.subspaces import generalized_eigh, negative_reach, symmetric_eigh
from tests.core.conftest import random_spd

#: Two backward-stable LAPACK drivers on a well-conditioned matrix agree to rounding of its largest eigenvalue.
DRIVER_AGREEMENT = 1e-12
#: float32 solves agree to a thousand times float32's rounding of the largest eigenvalue.
FLOAT32_AGREEMENT = 1e3 * float(np.finfo(np.float32).eps)
#: Unit eigenvectors of distinct eigenvalues from the two drivers: |cos| within this of 1.
VECTOR_AGREEMENT = 1e-8
#: scipy.linalg's dense front ends the analysis could reach.
SCIPY_LAPACK = ("eigh", "eigvalsh", "cholesky", "svd", "solve", "lstsq")


class ScipyLapackCalled(AssertionError):
    pass


@pytest.fixture
def scipy_lapack_refused(monkeypatch):
    """scipy.linalg's LAPACK front ends raise `ScipyLapackCalled` inside the test."""
    def refuse(*args, **kwargs):
        raise ScipyLapackCalled("scipy.linalg was called")

    for name in SCIPY_LAPACK:
        monkeypatch.setattr(scipy.linalg, name, refuse)


@pytest.fixture(scope="module")
def shards():
    return sample_shards(lds_model(d=12, n_classes=3, seed=5), 480, 8, np.random.default_rng(5))


def test_the_analysis_never_reaches_scipys_lapack(shards, scipy_lapack_refused):
    """The theory variant's every path (the geometry, sweeps with two estimators, the default `ntps_estimate`
    row with its quadratic interval and flag, the rotation interval), the rounding check and two peer scores
    solve on numpy's LAPACK. Fails on the package before: `generalized_eigh` called `scipy.linalg.eigh`."""
    pooled = Moments.combine(shards)
    assert theory_geometry(pooled).r_V == pooled.d
    for estimator in ("plugin", "richardson"):
        assert np.isfinite(ntps_sweep(shards, estimator=estimator)["ntps"]).all()
    for interval in (None, "rotation"):
        frame = ntps_estimate(shards, [1, 2, 4], interval=interval)
        assert np.isfinite(frame[["estimate", "lower", "upper"]].to_numpy()).all()
    assert negative_reach(pooled.C0) == 0.0
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    features = rng.standard_normal((60, 5)) + labels[:, None]
    assert h_score(features, labels) > 0 and h_score_ledoit_wolf(features, labels) > 0


def test_the_reference_variant_keeps_scipys_eigh_as_the_released_code(shards, scipy_lapack_refused):
    """SPEC section 4: the reference variant repeats the released code's steps, scipy.linalg.eigh included."""
    with pytest.raises(ScipyLapackCalled):
        reference_geometry(Moments.combine(shards))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_symmetric_eigh_is_scipys_eigendecomposition_on_numpys_lapack(dtype):
    rng = np.random.default_rng(1)
    matrix = random_spd(rng, 30).astype(dtype)
    evals, evecs = symmetric_eigh(matrix)
    reference, _ = scipy.linalg.eigh(matrix.astype(np.float64))
    tolerance = DRIVER_AGREEMENT if dtype == np.float64 else FLOAT32_AGREEMENT
    assert evals.dtype == dtype and evecs.dtype == dtype
    assert np.all(np.diff(evals) >= 0)  # ascending
    assert np.abs(evals - reference).max() <= tolerance * reference.max()
    # an independent check of the vectors: orthonormal, and A v = lambda v
    assert np.abs(evecs.T @ evecs - np.eye(30)).max() <= 10 * tolerance
    residual = matrix.astype(np.float64) @ evecs - evecs * evals
    assert np.abs(residual).max() <= 10 * tolerance * reference.max()


def test_generalized_eigh_gives_the_same_subspace_on_either_front_end():
    """Where the eigenvalues are distinct the generalized eigenvectors are unique up to sign."""
    rng = np.random.default_rng(2)
    B, factor = random_spd(rng, 20), rng.standard_normal((20, 20))
    numpy_side = generalized_eigh(B, A_factor=factor)
    scipy_side = generalized_eigh(B, A_factor=factor, solver="scipy")
    lam = scipy_side.eigenvalues
    assert np.abs(numpy_side.eigenvalues - lam).max() <= DRIVER_AGREEMENT * lam.max()
    cosines = np.abs(np.sum(numpy_side.whitened * scipy_side.whitened, axis=0))
    assert np.abs(cosines - 1).max() <= VECTOR_AGREEMENT


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_matrix_is_refused_on_both_front_ends(bad):
    matrix = np.eye(4)
    matrix[1, 2] = matrix[2, 1] = bad
    for solver in ("numpy", "scipy"):
        with pytest.raises(ValueError, match="infs or NaNs"):
            symmetric_eigh(matrix, solver)
    with pytest.raises(ValueError, match="infs or NaNs"):
        negative_reach(matrix)
    with pytest.raises(ValueError, match="solver must be"):
        symmetric_eigh(np.eye(2), "lapack")
