"""Shape checking of the core (see shapes.py; the import hook is installed in tests/conftest.py, before any test
module can import the core) and random, valid moment instances for its tests."""

import numpy as np
import pytest
from jaxtyping import config as jaxtyping_config

from ntps_nb import Moments


@pytest.fixture(autouse=True)
def _check_shapes():
    jaxtyping_config.update("jaxtyping_disable", False)
    yield
    jaxtyping_config.update("jaxtyping_disable", True)


def random_spd(rng, d, rank=None):
    A = rng.standard_normal((d, rank or d))
    return A @ A.T + (1e-3 * np.eye(d) if rank is None else 0.0)


def random_moments(rng, d=8, n_classes=3, n_texts=100):
    """Moments with full-rank Sxx and C0 and generic Sxy, C1 (not from data, but valid)."""
    freqs = rng.dirichlet(np.ones(n_classes))
    return Moments(
        Sxx=random_spd(rng, d), Sxy=rng.standard_normal((d, n_classes)), Syy=np.diag(freqs),
        C0=random_spd(rng, d), C1=rng.standard_normal((d, d)), n_texts=n_texts, n_tokens=10 * n_texts,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
