"""ntps_nb: the Next Token Perception Score (arXiv 2505.17169), its theory, and notebooks.

The pure-math core (numpy/scipy) is importable without torch::

    from ntps_nb import Moments, ntps, ntps_sweep, excess_loss, excess_loss_bounds

A number to report for the population a layer's texts come from (the plug-in ``ntps`` is biased toward
chance at finite N) comes from the per-shard moments of that layer, with its interval and reliability flag::

    from ntps_nb import layer_shards, ntps_estimate, estimate_by_n
    shards = layer_shards(result.shards)[layer]       # result: an extraction with shards=10 or more
    rows = ntps_estimate(shards, [2, 8, 32])           # estimate, interval, `reliable`, per k
    settles = estimate_by_n(shards, [2, 8, 32])        # the same on nested subsamples: does it settle?
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
from ntps_nb.core.estimators import estimate_by_n, ntps_estimate
from ntps_nb.core.diagnostics import ntps_diagnostics, stability_summary, three_dim_example
from ntps_nb.core.intervals import (
    excess_loss_interval,
    layer_shards,
    ntps_difference,
    ntps_interval,
    ntps_interval_sweep,
    split_into_shards,
    width_by_n,
)
from ntps_nb.core.peers import (
    h_score,
    h_score_ledoit_wolf,
    knn_accuracy,
    logme,
    pca_overlap_ntps,
    pca_overlap_sweep,
    peer_scores,
    rankme,
)
from ntps_nb.core.probes import chance_corrected_accuracy, heldout_probe, probe_layers
from ntps_nb.core.published import load_published, published_correlations
from ntps_nb.core.threads import analysis_threads
from ntps_nb.core.stats import (
    bootstrap_ci,
    correlate,
    partial_correlation,
    partial_correlation_ci,
    permutation_pvalue,
    select_in_sample,
    select_leave_one_dataset_out,
    selection_null,
    stratified_concordance,
    winning_configs,
)

__version__ = "0.1.0"

__all__ = [
    "LayerMoments", "Moments", "moments_from_sequences", "one_hot", "perception_moments",
    "REFERENCE_FRACTIONS", "TheoryGeometry", "ntps", "ntps_sweep", "reference_geometry",
    "reference_ntps_pinv", "theory_geometry",
    "Subspace", "generalized_eigh", "next_token_subspace", "perception_subspace",
    "SyntheticTask", "angle_sweep", "excess_loss", "excess_loss_bounds", "fitted_excess_loss",
    "least_squares_loss", "synthetic_linear_task", "__version__",
    "ntps_diagnostics", "stability_summary", "three_dim_example", "ntps_estimate", "estimate_by_n", "layer_shards",
    "excess_loss_interval", "ntps_difference", "ntps_interval", "ntps_interval_sweep", "split_into_shards",
    "width_by_n",
    "h_score", "h_score_ledoit_wolf", "knn_accuracy", "logme", "pca_overlap_ntps", "pca_overlap_sweep",
    "peer_scores", "rankme", "chance_corrected_accuracy", "heldout_probe", "probe_layers",
    "load_published", "published_correlations", "bootstrap_ci", "correlate", "partial_correlation",
    "partial_correlation_ci", "permutation_pvalue", "stratified_concordance", "select_in_sample", "select_leave_one_dataset_out", "selection_null",
    "winning_configs", "analysis_threads",
]
