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

One unit of work is (model, dataset, settings). A unit extracts the moments and pooled features
of the train split (`ntps_nb.extract.extract_cached`) and the pooled features of the test split,
then writes tidy tables into ``data/results/<study>/units/<model>__<dataset>/``:

- ``ntps.csv``: NTPS of both variants (theory at every configured k, reference at the released
  19 fractions) and the PCA-overlap peer, per layer;
- ``probes.csv``: held-out and in-sample (the paper's protocol) probes per layer;
- ``peers.csv``: LogME, H-score, kNN, RankMe per layer of the peer grid;
- ``intervals.csv``: shard-bootstrap intervals (method "basic") on the interval grid;
- ``diagnostics.csv``: perturbation / permutation / solver diagnostics on a coarse grid;
- ``lora.csv`` when LoRA is configured and `ntps_nb.lora` provides it;
- ``unit.json``: settings, config hash, timings, and what was skipped and why.

The folder is written under a temporary name and renamed into place when everything succeeded
(`ntps_nb.cache.atomic_path`), so a crash loses at most the unit in progress and a rerun skips
every complete unit. Several processes can run one study at once: each claims a unit before
computing it (`UnitClaim`) and passes over the units other live processes hold. Every row
carries its provenance (SPEC section 9) and the config hash: `combine` refuses to put rows
computed with different settings into one table.

The analysis (`summarise`) is pure pandas on the combined tables and calls `ntps_nb.core.stats`.
"""

from ntps_nb.study.config import (CSV_FLOAT_FORMAT, RESULTS_ROOT, STUDY_VERSION, TABLES, StudyConfig,
                                  StudySettingsError, load_config, resolve_layers, unit_name)
from ntps_nb.study.config import _say, _versions  # noqa: F401  (used by benchmarks and tests)
from ntps_nb.study.stages import _extraction_settings, _with_provenance  # noqa: F401
from ntps_nb.study.stages import (STAGES, Stage, StageStore, adopt_unit_folder, run_unit, stage_keys, stage_states,
                                  stage_store, unit_folder_stages, write_unit)
from ntps_nb.study.runner import (UnitClaim, combine, load_results, load_units, run_study, stage_status,
                                  study_status, unit_status)
from ntps_nb.study.report import (TARGETS, correlation_summary, diagnostics_summary, fixed_ntps, lora_summary,
                                  ntps_with_intervals, pretraining_contrast, probe_targets, structure_controls,
                                  structure_markdown, summarise, summary_markdown)
from ntps_nb.study.cli import register_cli

__all__ = [
    "CSV_FLOAT_FORMAT", "RESULTS_ROOT", "STUDY_VERSION", "TABLES", "TARGETS", "StudyConfig", "StudySettingsError",
    "UnitClaim", "combine", "correlation_summary", "diagnostics_summary", "fixed_ntps", "load_config",
    "load_results", "load_units", "lora_summary", "ntps_with_intervals", "pretraining_contrast", "probe_targets",
    "register_cli", "resolve_layers", "run_study", "run_unit", "STAGES", "Stage", "StageStore", "adopt_unit_folder",
    "stage_keys", "stage_states", "stage_status", "stage_store", "unit_folder_stages", "structure_controls", "structure_markdown",
    "study_status", "summarise", "summary_markdown", "unit_name", "unit_status", "write_unit",
]
