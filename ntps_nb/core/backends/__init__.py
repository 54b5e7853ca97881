"""Optional array backends of the core's analysis (same numbers as the numpy reference).

Each backend lives in its own module and imports its array library only there, so importing
`ntps_nb.core` (or this package) loads no backend: ``from ntps_nb.core.backends.torch import
theory_sweep_torch`` is what pulls torch in.

The core's public functions that take ``device=`` dispatch through `analysis_backend`: None or
``"cpu-numpy"`` (the default) is the numpy code itself; a torch device ("cpu", "cuda",
"cuda:1") computes the same quantities with `ntps_nb.core.backends.torch`, imported here, inside
the function, the first time a torch device is asked for.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

#: The ``device=`` values that mean the numpy core (the reference implementation).
NUMPY_DEVICES = (None, "cpu-numpy")


def analysis_backend(device: Any) -> ModuleType | None:
    """The module that computes on ``device``: None for the numpy core, else the torch backend.

    Parameters
    ----------
    device : None or "cpu-numpy" (the numpy core), or a torch device name ("cpu", "cuda",
        "cuda:0", ...) or ``torch.device``.

    Returns
    -------
    None for the numpy core; the module `ntps_nb.core.backends.torch` otherwise, after checking
    that ``device`` names a device torch can compute on here.

    Raises
    ------
    ValueError for a device that is not a torch device or is not available (e.g. "cuda" on a
    machine without CUDA); ImportError when torch is not installed.
    """
    if device is None or (isinstance(device, str) and device == "cpu-numpy"):
        return None
    if not isinstance(device, str) and type(device).__name__ != "device":
        raise ValueError(f"device must be None or 'cpu-numpy' (numpy) or a torch device name ('cpu', 'cuda', "
                         f"'cuda:1', ...), got {device!r} of type {type(device).__name__}")
    try:
        from ntps_nb.core.backends import torch as backend  # lazy: torch only when a torch device is asked for
    except ImportError as error:
        raise ImportError(f"device={device!r} computes with torch, which is not importable here ({error}); "
                          "install torch or pass device=None for the numpy core") from error
    backend.check_device(device)
    return backend


def estimator_backend(device: Any, estimator: str, solved: tuple[str, ...], what: str) -> ModuleType | None:
    """`analysis_backend` for a call computing ``estimator``, refusing a torch device for an estimator the torch
    backend does not solve there.

    Parameters
    ----------
    device : as in `analysis_backend`.
    estimator : the NTPS estimator the call computes.
    solved : the estimators the torch backend computes for this call.
    what : what the call computes, for the error ("the plug-in's interval").

    Returns
    -------
    None for the numpy core; the torch backend module otherwise.

    Raises
    ------
    ValueError for a torch device with an estimator not in ``solved`` (and as `analysis_backend` raises).
    """
    backend = analysis_backend(device)
    if backend is not None and estimator not in solved:
        raise ValueError(f"device={device!r} solves {what}; estimator={estimator!r} runs on the numpy code "
                         "(device=None)")
    return backend
