"""Shape checking of the core (see shapes.py) and random, valid moment instances for its tests."""

import sys
import warnings

from beartype.roar import BeartypeDecorHintPep585DeprecationWarning
from jaxtyping import config as jaxtyping_config
from jaxtyping import install_import_hook

from tests.core.shapes import CHECKED_MODULES, TYPECHECKER

# The hook decorates modules imported after it; it must come before anything imports the core.
SHAPES_CHECKED = "ntps_nb.core" not in sys.modules
# beartype's advice to prefer collections.abc.Sequence over typing.Sequence concerns hints it
# is not asked to check here (array_hints_only drops them)
warnings.filterwarnings("ignore", category=BeartypeDecorHintPep585DeprecationWarning)
_HOOK = install_import_hook(CHECKED_MODULES, TYPECHECKER)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntps_nb import Moments  # noqa: E402

# The hook stays installed for the session, but the checks run only inside tests/core (the
# fixture below): I/O, study and notebook tests call the core unchecked, as users do.
jaxtyping_config.update("jaxtyping_disable", True)


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
