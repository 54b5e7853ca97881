"""Progress bars for the core's long loops of eigensolves.

A shard-bootstrap interval is one factorisation per replicate: `ntps_interval_sweep`'s default 1,000
replicates (and one per shard) take minutes at d = 576 on one core, and a factorisation's cost
grows as d^3; `ntps_estimate` (3 + 2 S parts at S shards), `estimate_by_n` and `ntps_diagnostics` repeat
whole solves too, and `probe_layers` fits one probe per layer. Those functions take ``progress=True`` (the
default) and show a bar (`tqdm.auto`: a widget in Jupyter, a line on stderr elsewhere) once a call has run
`PROGRESS_DELAY_S` seconds, so quick calls (small d, tests) print nothing; on a torch device
(`ntps_nb.core.backends.torch`) the bar advances a solved batch at a time. ``progress=False`` turns a call's bar off;
``TQDM_DISABLE=1`` in the environment Python starts with turns every such bar off (tqdm reads its
variables when it is imported). A study's stages pass ``progress=False``: they report their progress in
the unit's log. Executed notebooks keep no bar: a bar in Jupyter is a widget, and
`ntps_nb.notebooks.clean_notebook` strips widget outputs.
"""

from __future__ import annotations

from tqdm.auto import tqdm

#: Seconds a call runs before its bar appears.
PROGRESS_DELAY_S = 5.0


def progress_bar(total: int, desc: str, progress: bool, *, unit: str) -> tqdm:
    """A bar over ``total`` steps that appears after `PROGRESS_DELAY_S` seconds, or none.

    Parameters
    ----------
    total : int
        Steps the loop will take (each ``update(1)``).
    desc : str
        What the bar counts, shown at its left (the calling function's name).
    progress : bool
        False: a disabled bar, which shows nothing. True: shown after the delay, unless the
        environment Python started with sets ``TQDM_DISABLE``.
    unit : str
        The name of one step ("replicate", "part", "subsample", ...).

    Returns
    -------
    tqdm
        Use it as a context manager, so that it closes when the loop ends or raises. It is left off
        the screen when it closes.
    """
    # passing disable only when off leaves tqdm's own default, which reads TQDM_DISABLE
    off = {} if progress else {"disable": True}
    return tqdm(total=int(total), desc=desc, unit=unit, delay=PROGRESS_DELAY_S, leave=False, **off)
