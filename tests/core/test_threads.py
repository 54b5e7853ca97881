"""analysis_threads bounds the BLAS/OpenMP pools inside its block and restores them after."""

import os

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from ntps_nb import analysis_threads
from ntps_nb.core import threads
from ntps_nb.core.threads import PROCESSES_ENV, available_cores, default_threads


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_the_block_sets_the_blas_threads_and_restores_them():
    np.linalg.eigh(np.eye(3))  # numpy's BLAS is loaded
    before = blas_threads()
    assert before
    with analysis_threads(2) as n:
        assert n == 2 and blas_threads() == [2] * len(before)
        with analysis_threads(1):
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == [2] * len(before)
    assert blas_threads() == before


def test_called_alone_the_bound_holds_until_restored():
    """A notebook's setup cell calls it once: numpy's and scipy's BLAS and scikit-learn's OpenMP
    pools keep the bound after the call, until ``restore``."""
    import scipy.linalg  # noqa: F401  (scipy's BLAS)
    import sklearn.linear_model  # noqa: F401  (scikit-learn's OpenMP)

    def analysis_pools():  # torch's own pool, where a test before this one loaded torch, is not the analysis's
        return [pool for pool in threadpool_info() if not threads._torchs_own(pool["filepath"])]

    before = [(pool["filepath"], pool["num_threads"]) for pool in threadpool_info()]
    assert {pool["user_api"] for pool in analysis_pools()} == {"blas", "openmp"}
    bound = analysis_threads(3)
    assert bound.n == 3 and {pool["num_threads"] for pool in analysis_pools()} == {3}
    np.linalg.eigh(np.eye(4))
    assert {pool["num_threads"] for pool in analysis_pools()} == {3}
    bound.restore()
    assert [(pool["filepath"], pool["num_threads"]) for pool in threadpool_info()] == before


@pytest.mark.parametrize("path, own", [
    ("/env/lib/python3.11/site-packages/torch/lib/libgomp.so.1", True),
    ("/env/lib/python3.11/site-packages/torch.libs/libgomp-a34b3233.so.1.0.0", True),
    ("/env/lib/python3.11/site-packages/scikit_learn.libs/libgomp-e985bcbb.so.1.0.0", False),
    ("/env/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so", False),
    ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", False),
    (None, False),
])
def test_torchs_own_pool_is_told_apart_by_where_torch_keeps_it(path, own):
    """torch's threads are torch.set_num_threads's: its bundled OpenMP is never bounded here."""
    assert threads._torchs_own(path) is own


def test_default_is_the_process_share_of_its_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert default_threads() == 16
    monkeypatch.setenv(PROCESSES_ENV, "3")
    assert default_threads() == 5
    assert default_threads(processes=32) == 1  # never below one thread
    assert default_threads(processes=4) == 4  # the argument wins over the environment
    monkeypatch.delenv(PROCESSES_ENV)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert default_threads() == 2 and threads.analysis_processes() == 1


def test_available_cores_is_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
    assert available_cores() >= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be a positive integer"),
    (dict(n=2.5), "n must be a positive integer"),
    (dict(n=True), "n must be a positive integer"),
    (dict(processes=0), "processes must be a positive integer"),
    (dict(n=2, processes=2), "not both"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with analysis_threads(**kwargs):
            pass


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(PROCESSES_ENV, "many")
    with pytest.raises(ValueError, match=f"{PROCESSES_ENV} must be a positive integer, got 'many'"):
        default_threads()
    monkeypatch.setenv(PROCESSES_ENV, "0")
    with pytest.raises(ValueError, match=PROCESSES_ENV):
        default_threads()
