"""The study: a resumable grid runner over (model, dataset) units, their tidy tables, and the analysis.

A study is a small TOML file (``studies/*.toml``)::

    [study]
    name = "fast"
    models = ["smollm2-135m"]
    datasets = ["trec6", "sms-spam", "rt-polarity", "bbc-news"]
    max_train = 300
    max_test = 200
    max_length = 64
    ...

Your own data and models join the grid: ``[[datasets]]`` tables (name, path of a CSV, TSV or
parquet file, text and label columns, an optional split column) and any Hugging Face id or
local folder in ``models`` (`config`'s docstring). A file's sha256 enters its units' stage keys.

One unit of work is (model, dataset, settings). A unit is computed in stages (`stages`): the
extraction (moments, pooled features and shards of the train split, pooled features of the test
split; `ntps_nb.extract`), then the stages that read it, each writing one tidy table into
``data/results/<study>/units/<model>__<dataset>/``. Every stage has a content key over exactly
the settings its numbers depend on (and the keys of the stages it reads), and its result is
stored atomically under ``<study>/stages/<unit>/<stage>-<key>/``: a changed setting recomputes
only the stages whose key it changes (``n_boot``: the intervals; no forward pass where the
extraction cache keeps the extraction, and no LoRA training step). ``study status`` shows each
stage as complete, stale, missing or off.

To find the stage that computes a column, look the column up here (every table starts with the
provenance columns study, model, pretrained, quantized, dataset, n_train, n_test, n_classes,
max_length, drop_bos, seed, package_version, config_hash):

=========== =============== ================================= ==============================================
stage       writes          key: settings (+ stages it reads) columns (after the provenance columns)
=========== =============== ================================= ==============================================
extraction  (extraction     max_train, max_test, seed,        (read by the stages below; ``unit.json``:
            cache)          max_length, drop_bos, batch_size, extraction_key, extraction_seconds,
                            precision, layers, and the grids  n_truncated_train, mean_length_train,
                                                              extract_version, token_precision_train,
                            with their switches: probes,      float64_layers_train)
                            probe_layers, peers, peer_layers,
                            shards, interval_layers,
                            diagnostics, diagnostic_layers
ntps        ``ntps.csv``    k, peers, peer_layers, estimator  variant (theory, reference, pca_overlap),
                            (+ extraction)                    estimator, k, fraction, k_U, m, r_U, r_V, ntps,
                                                              excess_loss, lower_bound, upper_bound, layer,
                                                              k_V, precision (with an estimator other than
                                                              the plug-in, its theory rows have reliability
                                                              and n_shards, and no excess_loss or bounds)
probes      ``probes.csv``  probes, probe_layers, seed        layer, protocol, evaluated_on, classes_in_train,
                            (+ extraction)                    n_eval, d, accuracy, kappa_chance, chance,
                                                              majority_rate, mse, mse_per_text,
                                                              lstsq_accuracy, logreg_C, ridge, solver,
                                                              converged, n_iter, and for the cross-validated
                                                              probe (protocol heldout_cv, last layer):
                                                              balanced_accuracy, cohen_kappa, train_accuracy,
                                                              C_grid, cv_folds, cv_scoring, cv_score,
                                                              class_weight (tables of stage version 1 call
                                                              kappa_chance "kappa" and have no heldout_cv rows)
peers       ``peers.csv``   peers, peer_layers                layer, logme, h_score, h_score_lw, knn_accuracy,
                            (+ extraction)                    rankme, knn_k, knn_mode
intervals   ``intervals     shards, interval_layers, n_boot,  statistic, variant, estimator, k, fraction, k_U,
            .csv``          interval_method, seed, k, the     m, r_V, ntps, lower, upper, se_bootstrap,
                            estimator bootstrapped            se_jackknife, bias_bootstrap, n_valid, n_shards,
                            (interval_estimator),
                            interval_variants
                            (+ extraction)
                                                              n_texts, n_boot, level, method, centred, layer
estimates   ``estimates     estimator, k, interval_layers,    variant (theory), estimator, k, estimate, se,
            .csv``          shards, seed (+ extraction)       lower, upper, level, reliability, reliable,
                                                              n_texts, n_shards, layer: the estimator's
                                                              delete-one-shard jackknife interval and
                                                              reliability flag on the interval layers
diagnostics ``diagnostics   diagnostics, diagnostic_layers,   variant, estimator, k, fraction, k_U, k_V, m,
            .csv``          diagnostic_k, diagnostic_         precision, r_U, r_V, ntps, perturb_max_dev,
                            fractions, n_perturb,             perturb_std, perturb_rank_changes, perm_mean,
                            n_permutations, seed, estimator   perm_std, p_value, p_side, perm_z,
                            (+ extraction)                    solver_max_dev, n_perturb, perturb_scale,
                                                              n_permutations, layer
lora        ``lora.csv``    max_train, max_test, seed,        layer, k, variant, ntps_before, ntps_after,
                            max_length, drop_bos, batch_size, delta, lora_key, weights_before, weights_after,
                            precision, lora, lora_budget, k   n_texts, lora_weights_sha256, lora_* (the
                            (reads the extraction's last      result and budget of `ntps_nb.lora`:
                            layer; the layer grids do not     lora_lora_accuracy, lora_probe_accuracy,
                            enter its key)                    lora_gain, lora_budget_steps, ...)
            and a second                                      and (stage version 2 on) lora_predictions.csv,
            table                                             one row per test text: text_index, label,
                                                              lora_prediction, probe_prediction
=========== =============== ================================= ==============================================

The ``estimator`` setting (default "plugin"; `ntps_nb.core.estimators.ESTIMATORS`) chooses
the estimator of the theory NTPS in the ntps, estimates and diagnostics tables, and in the
intervals table where ``interval_estimator`` is "estimator" (its default, "plugin", keeps the
plug-in's shard bootstrap there: the released protocol's intervals, for comparison, at a third of
richardson's cost; the estimator's own interval is the estimates table's jackknife); every
row names its estimator (the reference variant and the PCA overlap are always "plugin"). It
enters the config hash and those stages' keys only away from "plugin", so the units computed
before the setting existed keep their keys, and their tables, which have no estimator column,
are read with "plugin" filled in. A shard estimator (``SHARD_ESTIMATORS``) needs per-shard
moments, which the extraction keeps on the interval layers only: on the other layers of the ntps
table, and in the diagnostics (which permute per-text labels), the plug-in stands in, and its
rows say "plugin". "richardson" (``HALF_ESTIMATORS``) needs only the two halves of one split of
the shards: with it (and shards) the extraction also keeps the halves' moments on every other
layer (`stages.keeps_halves`; its key says so), and the ntps table is richardson's on every layer
(its theory rows there say n_shards 2).

A config can start from another: ``extends = "default.toml"`` takes that file's [study] table
and lays its own keys over it. ``reuse_from`` (a study name or a results folder; not in the hash)
names a study whose complete unit folders lend every stage still valid under this config, so a
variant of a study (another estimator, say) reuses its LoRA results instead of retraining them
(studies/default-richardson.toml does so for the default study).

``unit.json`` holds the settings, config hash, timings, each stage's key, whether it was
computed or reused and when, how long and where it was computed (``ran_on``), and what was
skipped and why. Unit folders written before stages existed (the committed default study) are
taken over stage by stage where their keys still match (`adopt_unit_folder`), so their LoRA
results are never retrained.

The unit folder is written under a temporary name and renamed into place when everything
succeeded (`ntps_nb.cache.atomic_path`), so a crash loses at most the stage in progress and a
rerun skips every complete unit. Several processes can run one study at once: each claims a
unit before computing it (`UnitClaim`) and passes over the units other live processes hold.
Every row carries its provenance (SPEC section 9) and the config hash: `combine` refuses to put
rows computed with different settings into one table.

Modules: `config` (the TOML, `StudyConfig`, `load_config`), `stages` (a unit's stages, their
keys and store), `runner` (claims, status, `run_study`, `combine`), `report` (summaries,
controls, Markdown), `cli` (``python -m ntps_nb study run|status|combine|summary``).

The analysis (`summarise`) is pure pandas on the combined tables and calls `ntps_nb.core.stats`
for every statistic.
"""

from ntps_nb.study.config import (CSV_FLOAT_FORMAT, RESULTS_ROOT, STUDY_VERSION, TABLES, DatasetFile, StudyConfig,
                                  StudySettingsError, load_config, resolve_layers, unit_name)
from ntps_nb.study.stages import _extraction_settings  # noqa: F401  (benchmarks/check_device_agreement.py)
from ntps_nb.study import stages  # noqa: F401
from ntps_nb.study.stages import (STAGES, Stage, StageStore, adopt_unit_folder, run_unit, stage_keys, stage_states,
                                  stage_store, unit_compute_seconds, unit_folder_stages, write_unit)
from ntps_nb.study.runner import (UnitClaim, combine, load_results, load_units, outdated_stages, run_study,
                                  stage_status, study_status, unit_status)
from ntps_nb.study.report import (TARGET_ALIASES, TARGETS, Headline, correlation_summary, diagnostics_summary,
                                  estimates_markdown, estimates_summary, fixed_ntps, headline_points, interval_points,
                                  lora_summary, ntps_with_intervals,
                                  pretraining_contrast, probe_targets, resolve_targets, structure_controls,
                                  structure_markdown, summarise, summary_markdown)
from ntps_nb.study.cli import register_cli

__all__ = [
    "CSV_FLOAT_FORMAT", "DatasetFile", "RESULTS_ROOT", "STAGES", "STUDY_VERSION", "TABLES", "TARGETS",
    "TARGET_ALIASES", "Stage", "StageStore", "StudyConfig", "StudySettingsError", "UnitClaim", "adopt_unit_folder",
    "Headline", "combine", "correlation_summary", "diagnostics_summary", "estimates_markdown", "estimates_summary",
    "fixed_ntps", "headline_points", "interval_points",
    "load_config", "load_results", "load_units", "lora_summary", "ntps_with_intervals", "outdated_stages",
    "pretraining_contrast", "probe_targets", "register_cli", "resolve_layers", "resolve_targets", "run_study",
    "run_unit", "stage_keys",
    "stage_states", "stage_status", "stage_store", "structure_controls", "structure_markdown", "study_status",
    "summarise", "summary_markdown", "unit_compute_seconds", "unit_folder_stages", "unit_name", "unit_status",
    "write_unit",
]
