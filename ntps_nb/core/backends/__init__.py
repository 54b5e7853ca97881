"""Optional array backends of the core's analysis (same numbers as the numpy reference).

Each backend lives in its own module and imports its array library only there, so importing
`ntps_nb.core` (or this package) loads no backend: ``from ntps_nb.core.backends.torch import
theory_sweep_torch`` is what pulls torch in.
"""
