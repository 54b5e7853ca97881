"""ntps_nb: the Next Token Perception Score (arXiv 2505.17169), its theory, and notebooks.

The pure-math core (numpy/scipy) is importable without torch::

    from ntps_nb import Moments, ntps, ntps_sweep, excess_loss, excess_loss_bounds
"""

from ntps_nb.core.moments import LayerMoments, Moments, moments_from_sequences, one_hot, perception_moments
from ntps_nb.core.score import (
    REFERENCE_FRACTIONS,
    TheoryGeometry,
    ntps,
    ntps_sweep,
    reference_geometry,
    reference_ntps_pinv,
    theory_geometry,
)
from ntps_nb.core.subspaces import Subspace, generalized_eigh, next_token_subspace, perception_subspace
from ntps_nb.core.theory import (
    SyntheticTask,
    angle_sweep,
    excess_loss,
    excess_loss_bounds,
    fitted_excess_loss,
    least_squares_loss,
    synthetic_linear_task,
)

__version__ = "0.1.0"

__all__ = [
    "LayerMoments", "Moments", "moments_from_sequences", "one_hot", "perception_moments",
    "REFERENCE_FRACTIONS", "TheoryGeometry", "ntps", "ntps_sweep", "reference_geometry",
    "reference_ntps_pinv", "theory_geometry",
    "Subspace", "generalized_eigh", "next_token_subspace", "perception_subspace",
    "SyntheticTask", "angle_sweep", "excess_loss", "excess_loss_bounds", "fitted_excess_loss",
    "least_squares_loss", "synthetic_linear_task", "__version__",
]
