"""What one switch between numpy's and scipy's BLAS pools costs: the reference geometry (scipy's eigh, as the
released code) timed alone and right after numpy work (a theory geometry, a default `ntps_estimate` row), every
pool at 16 threads (the device machine's cores), on one layer's LDS shards at d = 256. Run once per package, e.g.
the package at a revision first on PYTHONPATH. Its "reference after theory" line times the pair (a theory geometry
and then a reference geometry); the next line times the reference geometry alone, started right after a theory one.

    cd /tmp && PYTHONPATH=$REPO/.oldpkg:$REPO python $REPO/benchmarks/blas_pool_switch.py
    cd /tmp && PYTHONPATH=$REPO python $REPO/benchmarks/blas_pool_switch.py
"""

import time
import warnings

import numpy as np

import ntps_nb
from ntps_nb.core.estimators import ntps_estimate
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import reference_geometry, theory_geometry
from ntps_nb.core.simulate import lds_model, sample_shards

warnings.simplefilter("ignore")
print(ntps_nb.__file__)
ntps_nb.analysis_threads(16)
parts = sample_shards(lds_model(d=256, n_classes=6, seed=1), 2000, 20, np.random.default_rng(0))
pooled = Moments.combine(parts)


def t(f, n=5):
    """Seconds of each of n calls of f."""
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return np.round(ts, 3).tolist()


print("reference alone", t(lambda: reference_geometry(pooled)))
print("theory alone", t(lambda: theory_geometry(pooled)))
print("reference after theory", t(lambda: (theory_geometry(pooled), reference_geometry(pooled))))


def ref_after_theory():
    """Seconds of a reference geometry started right after a theory geometry."""
    theory_geometry(pooled)
    s = time.perf_counter()
    reference_geometry(pooled)
    return time.perf_counter() - s


print("reference timed right after a theory geometry", [round(ref_after_theory(), 3) for _ in range(5)])
ntps_estimate(parts, [1, 2, 4])
print("reference after a default row", t(lambda: reference_geometry(pooled), 3))
