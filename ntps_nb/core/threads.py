"""BLAS threads for CPU analysis that cannot oversubscribe the cores.

numpy/scipy's BLAS (OpenBLAS, MKL) and scikit-learn's OpenMP start one thread per core by
default, in every process. Several processes analysing at once (a study's workers, a notebook
beside a job) then run cores x processes threads on the cores, and a small eigensolve slows down
by orders of magnitude (a 128 x 128 eigh: 0.009 s with one thread, 0.76 s with threads competing).
`analysis_threads` bounds those pools to this process's share of the cores it may run on, for a
``with`` block or, called alone, for the rest of the session (a notebook's setup cell)::

    with analysis_threads():          # the cores of this process / NTPS_NB_ANALYSIS_PROCESSES
        sweep = ntps_sweep(moments)
    with analysis_threads(4):         # exactly 4 threads
        ...
    with analysis_threads(processes=3):   # this process is one of 3 analysing at once
        ...
    ntps_nb.analysis_threads()        # from here on, for the whole session

torch's own thread pool (its bundled OpenMP) is left alone: the forward passes take their
threads from ``torch.set_num_threads``, the study from its ``torch_threads`` setting.

One process can oversubscribe its cores on its own: pip's numpy and scipy wheels each bundle an
OpenBLAS with its own pool of threads, and a pool's threads keep spinning for a while after each
call. Code that alternates scipy's LAPACK with numpy's products runs both pools at once; on 2 cores
with both at 2 threads the default `ntps_estimate` row at d = 256 took almost four times as long as
with one thread a pool. So the analysis solves its eigenproblems through numpy's LAPACK
(`ntps_nb.core.subspaces.symmetric_eigh`), on the pool its products use; only the reference variant
keeps scipy's, as the released code did (`benchmarks/bench_blas_pools.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def analysis_processes() -> int:
    """How many processes analyse at once on this process's cores: ``NTPS_NB_ANALYSIS_PROCESSES``, else 1.

    A study run with ``processes=N`` sets it to N in each of its worker processes; set it yourself
    when you start several analyses on one machine.

    Returns
    -------
    int >= 1.
    """
    raw = os.environ.get(PROCESSES_ENV, "1")
    try:
        processes = int(raw)
    except ValueError:
        raise ValueError(f"{PROCESSES_ENV} must be a positive integer, got {raw!r}") from None
    return _positive_int(processes, PROCESSES_ENV)


def default_threads(processes: int | None = None) -> int:
    """This process's share of its cores: available cores // processes (at least 1).

    Parameters
    ----------
    processes : number of processes sharing the cores, a positive integer; default
        `analysis_processes` (``NTPS_NB_ANALYSIS_PROCESSES``, else 1).

    Returns
    -------
    int >= 1, threads for this process.
    """
    processes = analysis_processes() if processes is None else _positive_int(processes, "processes")
    return max(1, available_cores() // processes)


def _torchs_own(filepath: str | None) -> bool:
    """A thread-pool library shipped inside the torch package (its libgomp: torch's intra-op threads)."""
    if not filepath:
        return False
    folder = Path(filepath).parent
    return folder.name == "torch.libs" or (folder.name == "lib" and folder.parent.name == "torch")


class AnalysisThreads:
    """A thread bound in force: `analysis_threads`'s result.

    The bound holds from construction until `restore` (or the end of a ``with`` block, which
    yields the bound as an int).

    Parameters
    ----------
    n : threads per pool, a positive integer.
    """

    def __init__(self, n: int):
        from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

        self.n = _positive_int(n, "n")
        controller = ThreadpoolController()
        pools = [lib.filepath for lib in controller.lib_controllers if not _torchs_own(lib.filepath)]
        self._limiter = controller.select(filepath=pools).limit(limits=self.n)

    def __enter__(self) -> int:
        return self.n

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        """Give every bounded pool back the threads it had before.

        Returns
        -------
        None
        """
        self._limiter.restore_original_limits()

    def __repr__(self) -> str:
        return f"AnalysisThreads({self.n})"


def analysis_threads(n: int | None = None, *, processes: int | None = None) -> AnalysisThreads:
    """Bound the BLAS and OpenMP threads of this process's analysis (numpy, scipy, scikit-learn).

    The bound is in force from the call: inside ``with analysis_threads(): ...`` (which yields it
    as an int and restores the pools after), or, called alone, until ``.restore()`` is called.
    Pools loaded by an import after the call are not bounded (``import ntps_nb`` loads numpy's,
    scipy's and scikit-learn's); torch's own pool is never touched (``torch.set_num_threads``).

    Parameters
    ----------
    n : threads per pool; default `default_threads(processes)`.
    processes : how many processes analyse at once on these cores (only when ``n`` is not given;
        default: ``NTPS_NB_ANALYSIS_PROCESSES``, else 1).

    Returns
    -------
    AnalysisThreads
        The bound in force (``.n`` threads); a context manager yielding ``n``.
    """
    if n is not None and processes is not None:
        raise ValueError("give n (threads) or processes, not both")
    return AnalysisThreads(default_threads(processes) if n is None else _positive_int(n, "n"))
