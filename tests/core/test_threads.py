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


def test_default_is_the_process_share_of_its_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert default_threads() == 16
    monkeypatch.setenv(PROCESSES_ENV, "3")
    assert default_threads() == 5
    assert default_threads(processes=32) == 1  # never below one thread
    assert default_threads(processes=4) == 4  # the argument wins over the environment


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
