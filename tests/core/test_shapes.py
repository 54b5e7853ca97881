"""The test-time shape check is on: the core's jaxtyping hints are enforced in tests/core."""

import jaxtyping
import numpy as np
import pytest

from ntps_nb import Moments, ntps
from ntps_nb.core.probes import heldout_probe
from tests.conftest import SHAPES_CHECKED
from tests.core.conftest import random_moments
from tests.core.shapes import CHECKED_MODULES, holds_array, unchecked_shapes

pytestmark = pytest.mark.skipif(not SHAPES_CHECKED,
                                reason="ntps_nb.core was imported before tests/conftest.py installed the hook")


def test_checked_modules_are_the_core_modules():
    from pathlib import Path

    core = Path(__file__).resolve().parents[2] / "ntps_nb" / "core"
    names = {f"ntps_nb.core.{p.stem}" for p in core.glob("*.py") if p.stem != "__init__"}
    assert set(CHECKED_MODULES) <= names and names - set(CHECKED_MODULES) == {"ntps_nb.core.intervals"}


def test_dimension_names_bind_across_the_arguments_of_one_call(rng):
    m = random_moments(rng, d=4, n_classes=3)
    with pytest.raises(jaxtyping.TypeCheckError):  # Sxy is (d, C) with d = 4 from Sxx, not (3, C)
        Moments(Sxx=m.Sxx, Sxy=m.Sxy[:3], Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=1, n_tokens=1)
    with pytest.raises(jaxtyping.TypeCheckError):  # train (N, d) and test (M, d) share d
        heldout_probe(rng.standard_normal((20, 3)), np.arange(20) % 2, rng.standard_normal((20, 2)),
                      np.arange(20) % 2, n_classes=2)
    with unchecked_shapes(), pytest.raises(ValueError, match="Sxy must have shape"):
        Moments(Sxx=m.Sxx, Sxy=m.Sxy[:3], Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=1, n_tokens=1)
    assert 0 <= ntps(m, k=2) <= 1  # consistent shapes pass, with the check back on


def test_only_array_hints_are_checked():
    from typing import Optional, Sequence

    from jaxtyping import Float

    assert holds_array(Float[np.ndarray, "d d"]) and holds_array(Optional[Float[np.ndarray, " d"]])
    assert holds_array(Sequence[Float[np.ndarray, "_T d"]])
    assert not holds_array(Sequence[int]) and not holds_array(int) and not holds_array("Moments")
