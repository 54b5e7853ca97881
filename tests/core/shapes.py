"""The core's jaxtyping shapes, checked at test time: jaxtyping's import hook with beartype.

`tests/core/conftest.py` installs the hook for ``ntps_nb.core`` before the core is imported, so
every function and dataclass of the core checks the arrays it takes and returns against its
``Float[np.ndarray, "d d"]``-style hints, with dimension names bound consistently across one
call (``Sxx: "d d"`` and ``Sxy: "d C"`` must agree on d).

Only hints that hold a jaxtyping array are checked. The others (``Sequence[int]``,
``Literal[...]``) describe what callers usually pass, while the core deliberately accepts any
array-like and answers bad values with its own ValueError naming the value; checking them too
would replace those messages and refuse numpy input the code handles.
"""

from __future__ import annotations

import contextlib
import typing
from typing import Any, Callable, Iterator

from beartype import BeartypeConf, beartype
from jaxtyping import AbstractArray, config

#: The string the import hook is given (it imports and calls it for each decorated function).
TYPECHECKER = "tests.core.shapes.array_hints_only"

#: Every core module but intervals, whose ShardStack.combined hints ``counts`` as
#: ``Float[np.ndarray, "B S"]`` although the bootstrap passes integer counts (the code converts
#: them to float64): its hint wants ``Real``, to be fixed with the module's other changes; then
#: intervals joins this list.
CHECKED_MODULES = [
    f"ntps_nb.core.{name}"
    for name in ("atomic", "diagnostics", "estimators", "gain", "moments", "peers", "probes", "published",
                 "progress", "quadratic", "rotation", "score", "selection", "simulate", "stats",
                 "subspaces", "theory", "threads", "validation")
]

# int is accepted where float is hinted (PEP 484's numeric tower), as Python's own convention
_BEARTYPE = beartype(conf=BeartypeConf(is_pep484_tower=True))


def holds_array(hint: Any) -> bool:
    """True if the hint is, or has among its arguments, a jaxtyping array type."""
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(holds_array(arg) for arg in typing.get_args(hint))


def array_hints_only(fn: Callable) -> Callable:
    """beartype, applied to ``fn`` after dropping every annotation that holds no jaxtyping array.

    jaxtyping hands the typechecker functions of its own making (a copy of the signature of the
    decorated function), so changing their annotations leaves the core's functions as they are.
    """
    fn.__annotations__ = {name: hint for name, hint in fn.__annotations__.items() if holds_array(hint)}
    return _BEARTYPE(fn)


@contextlib.contextmanager
def unchecked_shapes() -> Iterator[None]:
    """Switch the hook's checks off, for tests of the core's own messages about bad shapes
    (which users, who run without the hook, get)."""
    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", before)
