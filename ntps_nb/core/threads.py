"""BLAS threads for CPU analysis that cannot oversubscribe the cores.

numpy/scipy's BLAS (OpenBLAS, MKL) and OpenMP start one thread per core by default, in every
process. Several processes analysing at once (a study's workers, a notebook beside a job) then
run cores x processes threads on the cores, and a small eigensolve slows down by orders of
magnitude (a 128 x 128 eigh: 0.009 s with one thread, 0.76 s with threads competing).
`analysis_threads` bounds the threads of the BLAS and OpenMP pools inside a ``with`` block to
this process's share of the cores it may run on::

    with analysis_threads():          # the cores of this process / NTPS_NB_ANALYSIS_PROCESSES
        sweep = ntps_sweep(moments)
    with analysis_threads(4):         # exactly 4 threads
        ...
    with analysis_threads(processes=3):   # this process is one of 3 analysing at once
        ...
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

#: Environment variable naming how many processes share this machine's cores for analysis.
PROCESSES_ENV = "NTPS_NB_ANALYSIS_PROCESSES"


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one).

    Returns
    -------
    int >= 1.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads(processes: int | None = None) -> int:
    """This process's share of its cores: available cores // processes (at least 1).

    ``processes`` defaults to the environment variable ``NTPS_NB_ANALYSIS_PROCESSES``, else 1.

    Parameters
    ----------
    processes : number of processes sharing the cores, a positive integer.

    Returns
    -------
    int >= 1, threads for this process.
    """
    if processes is None:
        raw = os.environ.get(PROCESSES_ENV, "1")
        try:
            processes = int(raw)
        except ValueError:
            raise ValueError(f"{PROCESSES_ENV} must be a positive integer, got {raw!r}") from None
        what = PROCESSES_ENV
    else:
        what = "processes"
    return max(1, available_cores() // _positive_int(processes, what))


@contextlib.contextmanager
def analysis_threads(n: int | None = None, *, processes: int | None = None) -> Iterator[int]:
    """Bound the BLAS and OpenMP threads of this process inside the block; yields the bound.

    Parameters
    ----------
    n : threads per pool; default `default_threads(processes)`.
    processes : how many processes analyse at once on these cores (only when ``n`` is not given;
        default: ``NTPS_NB_ANALYSIS_PROCESSES``, else 1).

    Returns
    -------
    context manager yielding the int thread limit in force inside the block.
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    if n is not None and processes is not None:
        raise ValueError("give n (threads) or processes, not both")
    n = default_threads(processes) if n is None else _positive_int(n, "n")
    with threadpool_limits(limits=n):
        yield n
