"""The angles' capture both scripts use: ntps_nb.core.estimators.stationary_distance wrapped so that each call's
(point, replicates) is kept in `captured` (the last one is the draw's)."""
import numpy as np
import ntps_nb.core.estimators as E

captured = []
_original = E.stationary_distance


def _capture(point, replicates):
    captured.append((np.array(point), np.array(replicates)))
    return _original(point, replicates)


E.stationary_distance = _capture
