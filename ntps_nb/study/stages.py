"""One unit of a study as stages: extraction -> NTPS, probes, peers, intervals, diagnostics; LoRA.

Each stage has a content key over exactly the settings its numbers depend on (`Stage.settings`,
besides the model and the dataset) and the keys of the stages it reads (`Stage.inputs`). Its
result is stored atomically under ``<study>/stages/<unit>/<stage>-<key>/`` (`StageStore`): a table
at full precision and a ``record.json``. A unit computes only the stages whose key has no entry,
so a changed analysis setting (``n_boot``, say) recomputes the intervals and nothing else: no
forward pass when the extraction is kept (the extraction cache, ``cache_extractions`` or a
``cache`` folder) and no LoRA training step.

The extraction stage's entry is its record (cache key, seconds, truncation); the arrays live in
the extraction cache when it is on. Without it, a stage that must be recomputed reruns the
forward pass; the stages whose keys did not change are still reused.

A unit folder written before stages existed (``unit.json`` and its tables) is recognised by
`adopt_unit_folder`: every stage whose key under the folder's recorded settings equals the key
under the current ones takes its table from there (LoRA above all: no retraining). So are the unit
folders of another study named by ``reuse_from`` (a variant of that study, e.g. another estimator).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import json
import os
import platform
import re
import shutil
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from ntps_nb.cache import atomic_path, content_key
from ntps_nb.core.backends import analysis_backend
from ntps_nb.core.quadratic import INTERACTION_HALF
from ntps_nb.core.threads import analysis_processes, analysis_threads, available_cores
from ntps_nb.study.config import (_ADDED_LATER, CSV_FLOAT_FORMAT, STUDY_VERSION, StudyConfig, StudySettingsError, _json,
                                  _readable, _say, _versions, dataset_identity, load_unit_dataset, resolve_layers,
                                  unit_name, with_estimator)

#: Settings that choose the texts of a unit (with the model and the dataset).
SAMPLE = ("max_train", "max_test", "seed")
#: Settings that decide how every text is read by the model (each forward pass depends on them).
READING = ("max_length", "drop_bos", "batch_size", "precision")
#: Settings that stages took up after results were stored under their keys: each enters a stage's
#: key only away from its `ntps_nb.study.config._ADDED_LATER` value (what those results were
#: computed with), so taking it up left them valid. estimator: every stage before it was the plug-in;
#: interval_variants: every intervals stage before it bootstrapped both variants; estimate_interval:
#: every estimates stage before it wrote the jackknife-t interval.
#: (interval_estimator keys the intervals stage through the estimator it bootstraps: `stage_keys`.)
ADDED_TO_STAGES = ("estimator", "interval_variants", "estimate_interval", "estimate_rotation_flag",
                   "estimate_stationary_flag", "estimate_rotation_widening", "estimate_widening_level",
                   "estimate_stationary_widening")
#: What the extraction keeps beyond its settings, decided by the estimator: with one of
#: `ntps_nb.core.estimators.HALF_ESTIMATORS` and shards, the moments of the two halves of the shards
#: on every layer without per-shard moments (`keeps_halves`). It enters the extraction's key only
#: when true, so the keys of the units without halves stand.
HALVES_SETTING = "halves"
#: How the "quadratic" estimate interval reads its Student t: on the Satterthwaite degrees of
#: freedom of its variance (`ntps_nb.core.quadratic.satterthwaite_df`; an earlier version read it on S - 1).
#: It enters the estimates stage's key only with ``estimate_interval = "quadratic"``, so that tables
#: computed before are not read as the current interval's, and the other units' keys stand.
QUADRATIC_DF_SETTING = ("quadratic_df", "satterthwaite")
#: ... and from how many shards of each half of richardson's split its T-hat is read (at most
#: `ntps_nb.core.quadratic.INTERACTION_HALF`; an earlier version took every shard, the same at 10 shards,
#: not at 20): also in the estimates stage's key only with ``estimate_interval = "quadratic"``.
QUADRATIC_INTERACTION_SETTING = "interaction_half"
#: Coverage level of the estimates stage's jackknife intervals (`ntps_nb.core.estimators.ntps_estimate`).
ESTIMATE_LEVEL = 0.90


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a unit: the config fields its numbers depend on, the stages it reads, the unit
    table it writes (None: none) and that table's columns after the provenance columns.

    ``version`` enters the stage's key: bump it when what the stage computes changes (a new
    estimator, say), and exactly that stage and the stages reading it are recomputed.
    ``extras`` names further unit tables the stage writes beside ``table`` (LoRA's per-text
    predictions), stored and reused with it."""

    name: str
    settings: tuple[str, ...]
    inputs: tuple[str, ...]
    table: str | None
    columns: tuple[str, ...]
    version: int = 1
    extras: tuple[str, ...] = ()


#: The stages in the order a unit computes them.
#: The columns each stage's table holds after the provenance columns (the package docstring's table);
#: ``lora_*``: every result and budget field of `ntps_nb.lora`, prefixed.
NTPS_COLUMNS = ("variant", "estimator", "k", "fraction", "k_U", "m", "r_U", "r_V", "ntps", "excess_loss",
                "lower_bound", "upper_bound", "layer", "k_V", "precision")
#: Probes: the configured protocols on every probe layer, and (version 2 on) the cross-validated
#: logistic probe (protocol "heldout_cv") on the last one; "kappa_chance" is (accuracy - 1/C) / (1 - 1/C)
#: (tables of version 1 call it "kappa").
PROBES_COLUMNS = ("layer", "protocol", "evaluated_on", "classes_in_train", "n_eval", "d", "accuracy", "kappa_chance",
                  "chance", "majority_rate", "mse", "mse_per_text", "lstsq_accuracy", "logreg_C", "ridge", "solver",
                  "converged", "n_iter", "balanced_accuracy", "cohen_kappa", "train_accuracy", "C_grid", "cv_folds",
                  "cv_scoring", "cv_score", "class_weight")
PEERS_COLUMNS = ("layer", "logme", "h_score", "h_score_lw", "knn_accuracy", "rankme", "knn_k", "knn_mode")
INTERVALS_COLUMNS = ("statistic", "variant", "estimator", "k", "fraction", "k_U", "m", "r_V", "ntps", "lower",
                     "upper", "se_bootstrap", "se_jackknife", "bias_bootstrap", "n_valid", "n_shards", "n_texts",
                     "n_boot", "level", "method", "centred", "layer")
DIAGNOSTICS_COLUMNS = ("variant", "estimator", "k", "fraction", "k_U", "k_V", "m", "precision", "r_U", "r_V",
                       "ntps", "perturb_max_dev", "perturb_std", "perturb_rank_changes", "perm_mean", "perm_std",
                       "p_value", "p_side", "perm_z", "solver_max_dev", "n_perturb", "perturb_scale", "n_permutations",
                       "layer")
#: The estimator's own estimate with its delete-one-shard jackknife interval and reliability flag
#: (`ntps_nb.core.estimators.ntps_estimate`; any further column it returns follows these).
ESTIMATES_COLUMNS = ("variant", "estimator", "k", "estimate", "se", "lower", "upper", "level", "reliability",
                     "reliable", "n_texts", "n_shards", "layer")
LORA_COLUMNS = ("layer", "k", "variant", "ntps_before", "ntps_after", "delta", "lora_key", "weights_before",
                "weights_after", "n_texts", "lora_weights_sha256", "lora_*")
#: LoRA's second table (stage version 2 on): the class LoRA and the held-out probe predict for every
#: test text (`ntps_nb.lora.predictions_table`), from which `ntps_nb.core.gain.crossfit_gain`
#: measures the gain and the probe-accuracy baseline on disjoint halves of the test split.
LORA_PREDICTIONS_COLUMNS = ("text_index", "label", "lora_prediction", "probe_prediction")
#: The columns of each extra table (`Stage.extras`) after the provenance columns.
EXTRA_COLUMNS = {"lora_predictions": LORA_PREDICTIONS_COLUMNS}

#: The stages in the order a unit computes them.
STAGES: tuple[Stage, ...] = (
    Stage("extraction", SAMPLE + READING + ("layers", "probes", "probe_layers", "peers", "peer_layers", "shards",
                                            "interval_layers", "diagnostics", "diagnostic_layers"), (), None, ()),
    Stage("ntps", ("k", "peers", "peer_layers", "estimator"), ("extraction",), "ntps", NTPS_COLUMNS),
    # version 2: the cross-validated probe on the last layer, kappa renamed kappa_chance
    Stage("probes", ("probes", "probe_layers", "seed"), ("extraction",), "probes", PROBES_COLUMNS, version=2),
    Stage("peers", ("peers", "peer_layers"), ("extraction",), "peers", PEERS_COLUMNS),
    # the theory rows bootstrap the plug-in or, with interval_estimator "estimator", the study's
    # estimator: the key names the one bootstrapped (`stage_keys`), not the two settings
    Stage("intervals", ("shards", "interval_layers", "n_boot", "interval_method", "seed", "k", "interval_estimator",
                        "estimator", "interval_variants"), ("extraction",), "intervals", INTERVALS_COLUMNS),
    # the estimator's estimate, jackknife interval and reliability flag on the interval layers;
    # version 2: the flag also asks for resolved eigengaps at k (`estimators.GAP_MIN`) and an interval
    # meeting [0, 1]; gap columns added. Version 3: and an estimate inside [0, 1] by `estimators.BOUND_SE`
    # standard errors (column at_bound), refreshed from a version-2 table (`REFRESHES`). Version 4: reliable only
    # for the estimators the flag was calibrated for (`estimators.CALIBRATED_ESTIMATORS`), refreshed from 3 or 2
    Stage("estimates", ("estimator", "k", "interval_layers", "shards", "seed", "estimate_interval",
                        "estimate_rotation_flag", "estimate_stationary_flag", "estimate_rotation_widening",
                        "estimate_widening_level", "estimate_stationary_widening"),
          ("extraction",),
          "estimates", ESTIMATES_COLUMNS, version=4),
    # version 2: the label-null p-value written as p_value with p_side (version 1 wrote perm_p)
    Stage("diagnostics", ("diagnostics", "diagnostic_layers", "diagnostic_k", "diagnostic_fractions", "n_perturb",
                          "n_permutations", "seed", "estimator"), ("extraction",), "diagnostics", DIAGNOSTICS_COLUMNS,
          version=2),
    # LoRA reads the extraction's last layer where it holds it (the base model's side), but its
    # numbers depend only on which texts are read and how: not on the layer grids, so changing
    # them does not retrain. Version 2: the per-text predictions of LoRA and of the probe are kept
    # (table lora_predictions); version 1 results have none, and are retrained.
    Stage("lora", SAMPLE + READING + ("lora", "lora_budget", "k"), (), "lora", LORA_COLUMNS, version=2,
          extras=("lora_predictions",)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def _estimates_from_version_2(table: pd.DataFrame) -> pd.DataFrame:
    """An estimates table of stage version 2 at version 3: the flag's bound condition
    (`ntps_nb.core.estimators.flag_at_bound`) applied to its own estimate, se and reliable columns."""
    from ntps_nb.core.estimators import flag_at_bound

    return flag_at_bound(table)


def _estimates_from_version_3(table: pd.DataFrame) -> pd.DataFrame:
    """An estimates table of stage version 3 at version 4: ``reliable`` kept only on the rows of the estimators
    the flag was calibrated for (`ntps_nb.core.estimators.CALIBRATED_ESTIMATORS`), as `ntps_estimate` now gives it."""
    from ntps_nb.core.estimators import CALIBRATED_ESTIMATORS

    return table.assign(reliable=table["reliable"].astype(bool) & table["estimator"].isin(CALIBRATED_ESTIMATORS))


#: Stages whose table of an earlier version is brought to the current version from that table's own
#: values, with no extraction: stage name -> {earlier version: the function of its table}. A unit
#: holding such a result (in its stage store or its unit folder, under the key of that version and
#: the same settings) is refreshed instead of recomputed; its record names the version refreshed from.
REFRESHES: dict[str, dict[int, Callable[[pd.DataFrame], pd.DataFrame]]] = {"estimates": {
    3: _estimates_from_version_3, 2: lambda table: _estimates_from_version_3(_estimates_from_version_2(table))}}
#: The stages computed from the extraction (everything but the extraction itself).
ANALYSIS_STAGES = STAGE_NAMES[1:]
#: Every table a unit can write: the stages' tables and their extras, in stage order.
UNIT_TABLES = tuple(name for stage in STAGES for name in ((stage.table,) if stage.table else ()) + stage.extras)
#: Provenance columns every unit table starts with (`_with_provenance`).
PROVENANCE = ("study", "model", "pretrained", "quantized", "dataset", "n_train", "n_test", "n_classes", "max_length",
              "drop_bos", "seed", "package_version", "config_hash")


def _setting_values(cfg: StudyConfig) -> dict[str, Any]:
    """Every field of ``cfg`` as JSON values (tuples as lists), precision included."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return json.loads(json.dumps(values, default=list))


def stage_keys(cfg: StudyConfig, model: str, dataset: str, *,
               versions: dict[str, int] | None = None) -> dict[str, str]:
    """The content key of every stage of unit (``model``, ``dataset``) under ``cfg``, in stage order.

    A key covers the study version, the stage's `Stage.version` (or ``versions[name]``), the
    model, the dataset (a file's sha256 too: `ntps_nb.study.config.dataset_identity`), the stage's `Stage.settings` and the keys of its `Stage.inputs`: nothing
    else (not the study's name, not where it runs). A setting of `ADDED_TO_STAGES` enters only
    away from the value the stored results were computed with (``estimator`` other than "plugin").
    The extraction's key also names the halves (`HALVES_SETTING`) where the unit keeps them (`keeps_halves`).

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.
    versions : dict of str to int, optional
        Stage versions to key under instead of the current `Stage.version` (for units computed
        by an earlier version).

    Returns
    -------
    dict of str to str
        Stage name to its hex content key, in `STAGES` order.
    """
    values = _setting_values(cfg)
    keys: dict[str, str] = {}
    for stage in STAGES:
        settings = {name: values[name] for name in stage.settings
                    if not (name in ADDED_TO_STAGES and values[name] == _json(_ADDED_LATER[name]))}
        if stage.name == "intervals":  # keyed by the estimator it bootstraps (as before interval_estimator)
            settings.pop("interval_estimator", None)
            settings.pop("estimator", None)
            if interval_estimator(cfg) != _ADDED_LATER["estimator"]:
                settings["estimator"] = interval_estimator(cfg)
        if stage.name == "extraction" and keeps_halves(cfg):
            settings[HALVES_SETTING] = True
        for name in cfg.inert_settings():  # e.g. the widening's level where the widening is off
            settings.pop(name, None)
        if stage.name == "estimates" and values["estimate_interval"] == "quadratic":
            settings[QUADRATIC_DF_SETTING[0]] = QUADRATIC_DF_SETTING[1]
            settings[QUADRATIC_INTERACTION_SETTING] = INTERACTION_HALF
        keys[stage.name] = content_key({
            "stage": stage.name, "version": (versions or {}).get(stage.name, stage.version),
            "study_version": STUDY_VERSION, "model": model, "dataset": dataset_identity(cfg, dataset),
            "settings": settings, "inputs": {name: keys[name] for name in stage.inputs}})
    return keys


def keeps_halves(cfg: StudyConfig) -> bool:
    """Whether a unit's extraction keeps the moments of the two halves of the shards.

    It does for an estimator of `ntps_nb.core.estimators.HALF_ESTIMATORS` ("richardson") with
    ``shards`` >= 2: on every layer without per-shard moments (all but the interval layers) the ntps
    stage then computes that estimator from the two halves (split by `ntps_nb.core.estimators.split_halves`
    with the study's seed), the value the per-shard moments would give, at two accumulators per layer.

    Parameters
    ----------
    cfg : StudyConfig

    Returns
    -------
    bool
    """
    from ntps_nb.core.estimators import HALF_ESTIMATORS

    return cfg.estimator in HALF_ESTIMATORS and bool(cfg.shards) and int(cfg.shards) >= 2


def stage_enabled(cfg: StudyConfig, stage: str) -> bool:
    """Whether ``cfg`` asks for the stage at all (a disabled stage writes no table).

    Parameters
    ----------
    cfg : StudyConfig
    stage : str
        A name of `STAGE_NAMES`.

    Returns
    -------
    bool
        Always True for extraction and ntps; the others follow their settings (intervals and
        estimates need both ``shards`` and ``interval_layers``).
    """
    intervals = bool(cfg.shards) and cfg.interval_layers not in (None, False, ())
    return {"extraction": True, "ntps": True, "probes": bool(cfg.probes), "peers": bool(cfg.peers),
            "intervals": intervals, "estimates": intervals, "diagnostics": bool(cfg.diagnostics),
            "lora": bool(cfg.lora)}[stage]


@dataclasses.dataclass
class StageResult:
    """A stage's stored result: its table (None when it wrote none), its record and its extra
    tables (`Stage.extras`) by name."""

    table: pd.DataFrame | None
    record: dict[str, Any]
    extra: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)


class StageStore:
    """The stage results of one unit: ``<folder>/<stage>-<key>/`` holding ``record.json`` and,
    when the stage wrote a table, ``table.csv`` at full precision (floats round-trip exactly).
    Each entry is written atomically (`ntps_nb.cache.atomic_path`)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, stage: str, key: str) -> Path:
        return self.folder / f"{stage}-{key}"

    def has(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / "record.json").is_file()

    def keys(self, stage: str) -> list[str]:
        """The keys stored for ``stage`` (current or not).

        Parameters
        ----------
        stage : str
            A stage name.

        Returns
        -------
        list of str
            Sorted keys of the complete entries (those with a ``record.json``).
        """
        if not self.folder.is_dir():
            return []
        return sorted(p.name[len(stage) + 1:] for p in self.folder.iterdir()
                      if p.name.startswith(f"{stage}-") and (p / "record.json").is_file())

    def load(self, stage: str, key: str) -> StageResult | None:
        """The stored result of ``stage`` under ``key``, or None when there is none.

        Parameters
        ----------
        stage : str
            A stage name.
        key : str
            The stage's content key (`stage_keys`).

        Returns
        -------
        StageResult or None
            The table (None when the stage wrote none; text columns read back as text) and the
            record.
        """
        entry = self.path(stage, key)
        if not (entry / "record.json").is_file():
            return None
        record = read_unit_record(entry / "record.json")
        table = None
        if (entry / "table.csv").is_file():  # floats read back bit for bit; text stays text (a key "12e4" too)
            table = read_table(entry / "table.csv", dtype={name: object for name in record.get("text_columns", [])})
        extra = {name: read_table(entry / f"extra-{name}.csv") for name in record.get("extra_tables", [])}
        return StageResult(table, record, extra)

    def save(self, stage: str, key: str, table: pd.DataFrame | None, record: dict[str, Any],
             extra: dict[str, pd.DataFrame] | None = None) -> StageResult:
        """Store a stage's result; returns it as `load` reads it back, so a stage's table is the
        same whether it was just computed or reused (None and NaN alike are missing values).

        Parameters
        ----------
        stage : str
            A stage name.
        key : str
            The stage's content key.
        table : DataFrame or None
            The stage's table, if it has one.
        record : dict
            JSON-serialisable facts of the computation (``stage`` and ``key`` are added).
        extra : dict of str to DataFrame, optional
            The stage's extra tables (`Stage.extras`), numeric columns only; written beside the
            table and named in the record (``extra_tables``).

        Returns
        -------
        StageResult
        """
        extra = dict(extra or {})
        record = {"stage": stage, "key": key, **record, **({"extra_tables": sorted(extra)} if extra else {})}
        if table is not None:
            record["text_columns"] = [name for name in table.columns if not pd.api.types.is_numeric_dtype(table[name])
                                      and not pd.api.types.is_bool_dtype(table[name])
                                      and table[name].dropna().map(lambda v: isinstance(v, str)).all()
                                      and table[name].notna().any()]
        with atomic_path(self.path(stage, key), directory=True) as tmp:
            if table is not None:
                table.to_csv(tmp / "table.csv", index=False)  # shortest repr of every float: exact
            for name, frame in extra.items():
                frame.to_csv(tmp / f"extra-{name}.csv", index=False)
            (tmp / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
            _readable(tmp)
        return self.load(stage, key)


def stage_store(cfg: StudyConfig, model: str, dataset: str) -> StageStore:
    """Where the stages of a unit are kept: ``<study folder>/stages/<unit>/``.

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.

    Returns
    -------
    StageStore
        The store over that folder (the folder need not exist yet).
    """
    return StageStore(cfg.folder / "stages" / unit_name(model, dataset))


# -- units written before stages ------------------------------------------------------------------


def config_from_settings(cfg: StudyConfig, settings: dict[str, Any]) -> StudyConfig | None:
    """``cfg`` with the settings a unit recorded (``unit.json``'s ``settings``), or None when they
    are not this package's (another study version, or keys it does not know).

    Parameters
    ----------
    cfg : StudyConfig
        The config whose other fields (name, folder, ...) are kept.
    settings : dict
        The recorded settings, ``study_version`` included; settings added to the package later
        and absent from the record take the value they had before they were added.

    Returns
    -------
    StudyConfig or None
    """
    settings = dict(settings)
    if settings.pop("study_version", None) != STUDY_VERSION:
        return None
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    if set(settings) - known:
        return None
    for key, before in _ADDED_LATER.items():  # left out of the record at the value it had then
        settings.setdefault(key, before)
    settings = {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
    return dataclasses.replace(cfg, **settings)


def _strip_provenance(frame: pd.DataFrame) -> pd.DataFrame:
    """The inverse of `_with_provenance`: the result columns of a unit table."""
    frame = frame.drop(columns=[c for c in PROVENANCE if c in frame.columns])
    return frame.rename(columns={f"{c}_result": c for c in PROVENANCE if f"{c}_result" in frame.columns})


def unit_folder_stages(cfg: StudyConfig, model: str, dataset: str,
                       folder: str | os.PathLike | None = None) -> dict[str, str]:
    """What a complete unit folder (``unit.json`` and its tables, written with or without stages)
    holds for each stage under ``cfg``: "valid" (its key under the folder's recorded settings is
    the key under ``cfg``, and the folder has its result), "stale" (another key), "skipped" (LoRA
    the unit skipped, e.g. on a random-initialised model) or nothing (no such folder, an
    incomplete one, one of another study version, or a stage it has no result of).

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.
    folder : str or PathLike, optional
        The unit folder (default ``cfg.unit_folder(model, dataset)``).

    Returns
    -------
    dict of str to str
        Stage name to "valid", "stale" or "skipped"; stages without a result are absent (the
        dict is empty when the folder is not a usable unit).
    """
    folder = Path(folder) if folder is not None else cfg.unit_folder(model, dataset)
    meta = _complete_unit_meta(folder, model, dataset)
    if meta is None:
        return {}
    then = config_from_settings(cfg, meta.get("settings") or {})
    if then is None:
        return {}
    new = stage_keys(cfg, model, dataset)
    # the keys the unit recorded; a unit from before stages was computed by every stage's version 1
    recorded = {name: entry.get("key") for name, entry in (meta.get("stages") or {}).items()}
    old = {**stage_keys(then, model, dataset, versions=dict.fromkeys(STAGE_NAMES, 1)), **recorded}
    out = {}
    for stage in STAGES:
        has_result = True
        if stage.name == "lora" and stage_enabled(then, "lora"):
            if str(meta.get("lora", "")).startswith("skipped"):
                out["lora"] = "skipped"
                continue
            has_result = meta.get("lora", "done") == "done" and (folder / "lora.csv").is_file()
        elif stage.table is not None and stage_enabled(then, stage.name):
            has_result = (folder / f"{stage.table}.csv").is_file()
        if has_result:
            out[stage.name] = "valid" if old[stage.name] == new[stage.name] else "stale"
            if out[stage.name] == "valid" and meta.get("lora", "done") == "done" and not all(
                    (folder / f"{extra}.csv").is_file() for extra in stage.extras):
                del out[stage.name]  # a current key without its extra tables: an incomplete result
    return out


def adopt_unit_folder(cfg: StudyConfig, model: str, dataset: str, store: StageStore | None = None,
                      folder: str | os.PathLike | None = None) -> list[str]:
    """Map a complete unit folder into the stage store: every stage `unit_folder_stages` finds
    "valid" takes the folder's table (LoRA included, so a committed LoRA result is never
    retrained). Returns the stages adopted. Reads the folder, never writes it; a stage already in
    the store is left alone.

    The tables keep the folder's precision (``CSV_FLOAT_FORMAT``), so the unit tables written
    from them are the same text as the folder's.

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.
    store : StageStore, optional
        Where to adopt into (default `stage_store`).
    folder : str or PathLike, optional
        The unit folder (default ``cfg.unit_folder(model, dataset)``).

    Returns
    -------
    list of str
        The stages newly saved into the store, in `STAGES` order.
    """
    folder = Path(folder) if folder is not None else cfg.unit_folder(model, dataset)
    store = store or stage_store(cfg, model, dataset)
    valid = [name for name, state in unit_folder_stages(cfg, model, dataset, folder).items() if state == "valid"]
    if not valid:
        return []
    meta = read_unit_record(folder / "unit.json")
    keys = stage_keys(cfg, model, dataset)
    source = {"adopted_from": str(folder), "config_hash": meta.get("config_hash")}
    adopted = []
    for stage in STAGES:
        key = keys[stage.name]
        if stage.name not in valid or store.has(stage.name, key):
            continue
        if stage.name == "extraction":
            store.save("extraction", key, None, {**source, "finished": meta.get("finished"), "kept": None,
                                                 **_extraction_facts_of_unit(meta)})
        else:
            table_path = folder / f"{stage.table}.csv"
            table = _strip_provenance(read_table(table_path)) if table_path.is_file() else None
            status = {"lora": meta.get("lora", "done")} if stage.name == "lora" else {}
            extras = {name: _strip_provenance(read_table(folder / f"{name}.csv")) for name in stage.extras
                      if (folder / f"{name}.csv").is_file()}
            store.save(stage.name, key, table, {**source, **_computed_when(meta, stage.name), **status}, extra=extras)
        adopted.append(stage.name)
    return adopted


def stage_states(cfg: StudyConfig, model: str, dataset: str) -> dict[str, str]:
    """Per stage of a unit: "complete" (stored under its current key, or valid in the unit folder),
    "not kept" (the extraction ran, but its arrays are not in the extraction cache: a stage that
    must be recomputed runs the forward pass again), "stale" (stored only under other keys),
    "missing", "skipped" (LoRA the unit skipped, e.g. on a random-initialised model) or "off" (the
    config does not ask for it).

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.

    Returns
    -------
    dict of str to str
        Stage name to its state, one entry per stage of `STAGES`.
    """
    keys = stage_keys(cfg, model, dataset)
    store = stage_store(cfg, model, dataset)
    in_folder = unit_folder_stages(cfg, model, dataset)
    if cfg.reuse_folder is not None:  # what the study reused from lends its valid stages too
        lent = unit_folder_stages(cfg, model, dataset, cfg.reuse_folder / "units" / unit_name(model, dataset))
        own = {name: state for name, state in in_folder.items() if state == "valid" or name not in lent}
        in_folder = {**lent, **own}
    out = {}
    for stage in STAGES:
        name = stage.name
        if not stage_enabled(cfg, name):
            out[name] = "off"
        elif store.has(name, keys[name]) or in_folder.get(name) == "valid":
            out[name] = "complete"
            if name == "extraction":
                record = store.load(name, keys[name])
                kept = record.record.get("kept") if record is not None else None
                if not (kept and (Path(kept) / "extraction.json").is_file()):
                    out[name] = "not kept"
        elif in_folder.get(name) == "skipped":
            out[name] = "skipped"
        elif store.keys(name) or in_folder.get(name) == "stale":
            out[name] = "stale"
        else:
            out[name] = "missing"
    return out


def _computed_when(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """Seconds and date (where recorded, place and extraction version) of the run that computed a stage, as a unit's
    unit.json records them.

    A unit written with stage records keeps, for a stage it reused, the seconds and date of the run
    that computed it (its ``timings_s`` are the last run's: a reuse takes milliseconds) and, since stages record
    them, where it ran (``ran_on``) and from moments of which extraction version (``extract_version``); a unit
    written before stage records has only ``timings_s`` and its finishing date.
    """
    record = (meta.get("stages") or {}).get(name) or {}
    if "seconds" in record and "finished" in record:
        return {"seconds": record["seconds"], "finished": record["finished"],
                **{key: record[key] for key in ("ran_on", "extract_version") if key in record}}
    return {"seconds": (meta.get("timings_s") or {}).get(name), "finished": meta.get("finished")}


def unit_compute_seconds(meta: dict[str, Any]) -> float | None:
    """Seconds a unit's results took to compute, read from its ``unit.json``.

    A run reuses what is stored, so the ``seconds`` of a run that took stored stages (or refreshed one from its
    table) are not what the results cost. This sums, from the unit's stage records, the extraction's seconds (the
    train texts' pass and, where recorded, the test texts') and each analysis stage's, as the run that computed
    each recorded them. Loading the model is not in it. A unit written before stage records holds only its one
    run's ``seconds``, which are returned.

    Parameters
    ----------
    meta : dict
        A unit's ``unit.json``, as `run_unit` writes it.

    Returns
    -------
    float or None
        The seconds, or None where the unit records none.
    """
    records = {name: record for name, record in (meta.get("stages") or {}).items()
               if name != "extraction" and isinstance(record, dict)}
    if not any("seconds" in record for record in records.values()):
        return meta.get("seconds")
    parts = [meta.get("extraction_seconds"), meta.get("extraction_seconds_test"),
             *(record.get("seconds") for record in records.values())]
    return round(sum(float(part) for part in parts if part is not None), 3)


def _extraction_facts_of_unit(meta: dict[str, Any]) -> dict[str, Any]:
    extraction = (meta.get("stages") or {}).get("extraction") or {}
    return {**{key: extraction[key] for key in ("ran_on",) if key in extraction},
            "cache_key": meta.get("extraction_key"), "seconds": meta.get("extraction_seconds"),
            "test_seconds": meta.get("extraction_seconds_test"),
            "n_truncated": meta.get("n_truncated_train"), "mean_length": meta.get("mean_length_train"),
            "extract_version": meta.get("extract_version"), "token_precision": meta.get("token_precision_train"),
            "float64_layers": meta.get("float64_layers_train")}


# -- computing a unit -----------------------------------------------------------------------------


def _with_provenance(frame: pd.DataFrame, provenance: dict[str, Any]) -> pd.DataFrame:
    """Provenance columns first; a result column of the same name that disagrees is kept renamed."""
    frame = frame.copy()
    for key, value in provenance.items():
        if key in frame.columns:
            same = frame[key].astype(str).eq(str(value)).all()
            if same:
                frame = frame.drop(columns=key)
            else:
                frame = frame.rename(columns={key: f"{key}_result"})
    front = pd.DataFrame({key: [value] * len(frame) for key, value in provenance.items()}, index=frame.index)
    return pd.concat([front, frame], axis=1)


def _k_filter(sweep: pd.DataFrame, k: Any) -> pd.DataFrame:
    if k == "all":
        return sweep
    return sweep[sweep["k"].isin([int(v) for v in k])]


def _extraction_settings(cfg: StudyConfig, layers: list[int], *, train: bool, pooled: list[int],
                         shard_layers: list[int]) -> dict[str, Any]:
    """`ntps_nb.extract.extract`'s settings of a unit's train (``train``) or test extraction: per-shard
    moments on ``shard_layers`` and, where `keeps_halves`, the two halves' moments on the other layers."""
    settings = dict(layers=layers, batch_size=cfg.batch_size, max_length=cfg.max_length, drop_bos=cfg.drop_bos,
                    precision=cfg.precision, pooled_layers=pooled, progress=False)
    if train:
        settings.update(shards=cfg.shards if shard_layers else None, shard_layers=shard_layers or None,
                        shard_seed=cfg.seed, token_moments=True)
        half_layers = [layer for layer in layers if layer not in shard_layers] if keeps_halves(cfg) else []
        if half_layers:  # the halves are unions of the shards: the shards group the texts even without layers
            settings.update(shards=cfg.shards, shard_layers=shard_layers, half_layers=half_layers,
                            half_seed=cfg.seed)
    else:  # the test split only feeds the held-out probes: pooled features suffice
        settings.update(token_moments=False)
    return settings



def _keeps_moments_on_device(u: "_Unit", settings: dict[str, Any]) -> bool:
    """Whether the unit's extraction keeps its moments on the GPU for the unit's analysis there
    (`ntps_nb.extract.keeps_moments_on_device`, for the layers of ``settings``)."""
    from ntps_nb.extract import keeps_moments_on_device

    model = u.loaded[0]
    return keeps_moments_on_device(u.analysis_device, next(model.parameters()).device,
                                   getattr(u.loaded[2], "hidden_size", None), len(settings["layers"]), settings)


@dataclasses.dataclass
class _Unit:
    """What the stages of one unit read: the config, the model, the texts, the layer grids, and
    the extractions once they are made."""

    cfg: StudyConfig
    loaded: tuple
    ds: dict
    train: Any
    test: Any
    layers: list[int]
    probe_grid: list[int]
    peer_grid: list[int]
    interval_grid: list[int]
    diag_grid: list[int]
    log: Callable[[str], None]
    ex: Any = None
    ex_test: Any = None
    # where the analysis stages compute (`ntps_nb.core.backends.analysis_backend`): None is the numpy
    # core, a torch device the torch backend (`resolve_analysis_device` of the config's analysis_device)
    analysis_device: Any = None
    # the diagnostics' host solver comparison when it was started before the intervals stage
    # (`_early_host_solvers`); None: the diagnostics stage starts its own
    host_solvers: Any = None


def resolve_analysis_device(setting: str | None, model_device: Any) -> str | None:
    """The ``device=`` the analysis stages pass to the core: None (the numpy core) or a torch device.

    Parameters
    ----------
    setting : the config's ``analysis_device``: "auto" (the torch backend on the model's device when
        that is a GPU, the numpy core otherwise), "numpy" (or None), or a torch device name ("cuda",
        "cuda:1", "cpu" for the torch backend on the CPU).
    model_device : the device the model's parameters are on (``torch.device`` or its name).

    Returns
    -------
    None for the numpy core, else the torch device name.

    Raises
    ------
    ValueError for a setting that is neither of these or names a device torch cannot use here.
    """

    if setting is None or setting == "numpy":
        return None
    if setting == "auto":
        name = str(model_device)
        return name if name.startswith("cuda") else None
    if not isinstance(setting, str):
        raise ValueError(f'analysis_device must be "auto", "numpy" or a torch device name, got {setting!r}')
    analysis_backend(setting)  # refuses a device torch cannot use, with the reason
    return setting


def _estimator_after_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``estimator`` column moved right after ``variant`` (where every stage table has it)."""
    columns = [c for c in frame.columns if c != "estimator"]
    at = columns.index("variant") + 1
    return frame[columns[:at] + ["estimator"] + columns[at:]]


def _shard_layers(u: _Unit) -> dict[int, list]:
    """The per-shard moments of the layers that have them (the interval layers), by layer."""
    from ntps_nb.core.intervals import layer_shards

    return layer_shards(u.ex.shards) if u.ex.shards else {}


def _plugin_only(estimator: str, layers: list[int], why: str) -> dict[str, str]:
    """A stage record's note that the plug-in stood in for ``estimator`` on ``layers``."""
    return {"estimator": f"plug-in on layers {layers}: estimator {estimator!r} {why}"} if layers else {}


def _ntps_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    """Theory NTPS at the config's k by the config's estimator, the reference variant (always the
    plug-in: the released algorithm) and the PCA-overlap peer on the peer layers. A shard
    estimator is computed where the extraction kept shards (the interval layers), and one of
    `ntps_nb.core.estimators.HALF_ESTIMATORS` also where it kept the two halves' moments (the
    other layers, `keeps_halves`: the halves as two shards give the value of the shards); on the
    layers with neither the plug-in stands in, its rows say so (estimator "plugin") and so does
    the record. The split into halves is the study seed's."""
    from ntps_nb.core.estimators import DEVICE_ESTIMATORS, HALF_ESTIMATORS, SHARD_ESTIMATORS
    from ntps_nb.core.intervals import layer_shards
    from ntps_nb.core.peers import pca_overlap_sweep
    from ntps_nb.core.score import ntps_sweep, warnings_named

    estimator = u.cfg.estimator
    shards = _shard_layers(u) if estimator in SHARD_ESTIMATORS else {}
    if estimator in HALF_ESTIMATORS and u.ex.halves:
        shards = {**layer_shards(u.ex.halves), **shards}
    device = u.analysis_device
    sweep = partial(ntps_sweep, device=device)  # a torch device: the backend's sweep
    rows, stand_in = [], []
    for layer in u.layers:
        m = u.ex.moments[layer]
        with warnings_named(f"layer {layer}"):  # a NextTokenTieWarning or RoundedMomentsWarning names its layer
            if estimator == "plugin" or (estimator in SHARD_ESTIMATORS and layer not in shards):
                stand_in += [layer] if estimator != "plugin" else []
                theory = sweep(m, variant="theory")
            elif estimator in DEVICE_ESTIMATORS:  # richardson: the torch backend's on a device
                theory = sweep(shards.get(layer, m), variant="theory", estimator=estimator, seed=u.cfg.seed)
            else:  # the other estimators' sweeps are numpy's
                theory = ntps_sweep(shards.get(layer, m), variant="theory", estimator=estimator, seed=u.cfg.seed)
        reference = sweep(m, variant="reference")
        rows += [_k_filter(theory, u.cfg.k).assign(layer=layer), reference.assign(layer=layer)]
        if layer in u.peer_grid and m.Shh is not None:
            rows.append(_k_filter(pca_overlap_sweep(m, device=device), u.cfg.k).assign(layer=layer,
                                                                                     estimator="plugin"))
    why = ("needs per-shard moments, which the extraction keeps on the interval layers only" if estimator
           not in HALF_ESTIMATORS else "needs per-shard or half-sample moments, which the extraction did not keep there")
    return _estimator_after_variant(pd.concat(rows, ignore_index=True)), _plugin_only(estimator, stand_in, why)


def _probes_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    """The configured probe protocols on every probe layer and, with a test split, the
    cross-validated logistic probe (`ntps_nb.core.probes.cv_logistic_probe`, protocol
    "heldout_cv": C chosen on the train split only; balanced accuracy and Cohen's kappa beside
    accuracy) on the last probe layer. The 1/C-corrected accuracy is the column kappa_chance."""
    from sklearn.exceptions import ConvergenceWarning

    from ntps_nb.core.probes import cv_logistic_probe, probe_layers

    if not u.probe_grid:
        return None, {}
    features = {layer: (u.ex.pooled[layer], u.ex_test.pooled[layer] if u.ex_test is not None else None)
                for layer in u.probe_grid}
    with warnings.catch_warnings():
        # saga's ConvergenceWarning under the paper's max_iter is expected (the in-sample protocol)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        table = probe_layers(features, u.ex.labels, u.ex_test.labels if u.ex_test is not None else None,
                             n_classes=u.train.n_classes, protocol=list(u.cfg.probes), seed=u.cfg.seed,
                             device=u.analysis_device, n_jobs=None,  # host fits: the analysis's share of cores
                             progress=False)
    table = table.rename(columns={"kappa": "kappa_chance"})
    last = max(u.probe_grid)
    if "heldout" not in u.cfg.probes or u.ex_test is None:
        return table, {"heldout_cv": "not computed: no held-out probes"}
    counts = np.bincount(np.asarray(u.ex.labels), minlength=u.train.n_classes)
    if counts[counts > 0].min() < 2:  # cross-validation needs two train texts of every class present
        return table, {"heldout_cv": f"skipped: a class has {int(counts[counts > 0].min())} train text"}
    cv = cv_logistic_probe(u.ex.pooled[last], u.ex.labels, u.ex_test.pooled[last], u.ex_test.labels,
                           n_classes=u.train.n_classes, seed=u.cfg.seed, device=u.analysis_device)
    table = pd.concat([table, pd.DataFrame([{"layer": last, **cv.row}])], ignore_index=True)
    return table, {"heldout_cv": f"layer {last}, C = {cv.row['logreg_C']:g}"}


def _peers_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    from ntps_nb.core.peers import peer_scores

    if not u.peer_grid:
        return None, {}
    with warnings.catch_warnings():
        _ignore_recorded_as_nan()
        table = pd.DataFrame([peer_scores(u.ex.pooled[layer], u.ex.labels, layer=layer, device=u.analysis_device)
                              for layer in u.peer_grid])
    return table, {}


def interval_estimator(cfg: StudyConfig) -> str:
    """The estimator whose shard bootstrap the intervals stage computes for the theory variant:
    the plug-in, or the study's ``estimator`` where ``interval_estimator`` is "estimator".

    Parameters
    ----------
    cfg : StudyConfig

    Returns
    -------
    str
        One of `ntps_nb.core.estimators.ESTIMATORS`.
    """
    return cfg.estimator if cfg.interval_estimator == "estimator" else "plugin"


def _intervals_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    from ntps_nb.core.intervals import layer_shards, ntps_interval_sweep

    if not u.interval_grid:
        return None, {}
    shards = layer_shards(u.ex.shards)
    device = u.analysis_device
    rows = []
    with warnings.catch_warnings():
        _ignore_recorded_as_nan()
        for layer in u.interval_grid:
            for variant in u.cfg.interval_variants:  # the reference variant is the released algorithm: plug-in
                estimator = interval_estimator(u.cfg) if variant == "theory" else "plugin"
                # the torch backend's interval sweeps are the plug-in's; other estimators' are numpy's
                # (no progress bar: the unit's log says where the stage is)
                sweep = ntps_interval_sweep(shards[layer], variant=variant, n_boot=u.cfg.n_boot, seed=u.cfg.seed,
                                            method=u.cfg.interval_method, estimator=estimator, progress=False,
                                            device=device if estimator == "plugin" else None)
                if variant == "theory":
                    sweep = _k_filter(sweep, u.cfg.k)
                rows.append(sweep.assign(layer=layer))
    return pd.concat(rows, ignore_index=True), {}


def estimates_shortfall(cfg: StudyConfig) -> str | None:
    """Why a study's estimates stage cannot run on its shards, or None when it can (or has no shards,
    where the stage is off): the estimator's delete-one-shard jackknife interval needs
    `ntps_nb.core.estimators.min_shards` shards (4 where the estimator splits them into halves).

    Parameters
    ----------
    cfg : `StudyConfig`
        The study.

    Returns
    -------
    str or None
        The reason, in words, or None.
    """
    from ntps_nb.core.estimators import min_shards

    fewest = min_shards(cfg.estimator)
    no_layers = cfg.interval_layers is None or cfg.interval_layers is False or cfg.interval_layers == ()
    if not cfg.shards or no_layers or cfg.shards >= fewest:
        return None
    return (f"a jackknife interval of {cfg.estimator} needs at least {fewest} shards, the study has {cfg.shards} "
            f"(set shards = {fewest} or more for estimates.csv)")


def _estimates_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    """`ntps_nb.core.estimators.ntps_estimate` of the theory NTPS on every interval layer at the
    config's k (those up to the layer's r_V): the config's estimator, its delete-one-shard
    jackknife standard error and `ESTIMATE_LEVEL` interval, and its reliability flag. A layer on
    which the estimator fails is left out and named in the record. With an analysis device (for
    the estimators that have a torch path) r_V and the estimates are solved there, from the shards
    combined on the device. For an estimator the flag was not calibrated for (outside
    `ntps_nb.core.estimators.CALIBRATED_ESTIMATORS`) no row is reliable, and the unit says why once, in its log
    and record (``estimates_flag``), not with a warning per layer."""
    from ntps_nb.core.backends import analysis_backend
    from ntps_nb.core.estimators import (CALIBRATED_ESTIMATORS, DEVICE_ESTIMATORS, FlagNotCalibratedWarning,
                                         ntps_estimate)
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import theory_geometry, warnings_named

    if not u.interval_grid:
        return None, {}
    shortfall = estimates_shortfall(u.cfg)
    if shortfall:
        return None, {"estimates": f"skipped: {shortfall}"}
    shards = _shard_layers(u)
    device = u.analysis_device if u.cfg.estimator in DEVICE_ESTIMATORS else None  # the others: numpy only
    backend = analysis_backend(device)
    rows, failed = [], {}
    note = {}
    if u.cfg.estimator not in CALIBRATED_ESTIMATORS:  # said once for the unit, in its log and record, not per layer
        note = {"estimates_flag": f"reliable is False on every row: the flag was calibrated for "
                                  f"{', '.join(CALIBRATED_ESTIMATORS)} only, not for {u.cfg.estimator} "
                                  "(docs/estimator.md, 'The reliability flag is the default estimator's')"}
        u.log(f"    estimates: {note['estimates_flag']}")
    with warnings.catch_warnings():
        _ignore_recorded_as_nan()
        warnings.filterwarnings("ignore", category=FlagNotCalibratedWarning)
        for layer in u.interval_grid:
            try:
                # on a device r_V comes from the shards combined there, as the row's own full solve
                r_V = (theory_geometry(Moments.combine(shards[layer])) if backend is None
                       else backend.pooled_geometry_torch(shards[layer], device=device)).r_V
                ks = np.arange(1, r_V + 1) if u.cfg.k == "all" else np.array([k for k in u.cfg.k if k <= r_V], int)
                if ks.size == 0:
                    continue
                with warnings_named(f"layer {layer}"):  # a RoundedMomentsWarning names its layer
                    frame = ntps_estimate(shards[layer], ks, estimator=u.cfg.estimator, level=ESTIMATE_LEVEL,
                                          seed=u.cfg.seed, device=device, interval=u.cfg.estimate_interval,
                                          rotation_flag=u.cfg.estimate_rotation_flag,
                                          stationary_flag=u.cfg.estimate_stationary_flag,
                                          rotation_widening=u.cfg.estimate_rotation_widening,
                                          widening_level=u.cfg.estimate_widening_level,
                                          stationary_widening=(u.cfg.estimate_stationary_widening
                                                               and u.cfg.estimate_stationary_flag),
                                          progress=False)
            except (ValueError, np.linalg.LinAlgError) as error:
                failed[str(layer)] = str(error)
                u.log(f"    estimates: layer {layer} left out: {error}")
                continue
            rows.append(frame.assign(variant="theory", layer=layer))
    record = {**note, **({"estimates_failed": failed} if failed else {})}
    if not rows:
        return None, record
    table = pd.concat(rows, ignore_index=True)
    known = [c for c in ESTIMATES_COLUMNS if c in table.columns]
    return table[known + [c for c in table.columns if c not in known]], record


class _HostSolvers:
    """The diagnostics' host eigensolver comparison (``solver_max_dev``) of every (layer, variant)
    job, computed in worker processes while the device computes the rest (analysis on a GPU): the
    host LAPACK factorisations were most of the stage's time there (d = 4096: minutes). Processes,
    not threads: scipy's LAPACK wrappers keep the GIL (`HostSolverProcesses`). The workers share
    the BLAS bound in force (`ntps_nb.analysis_threads`) less one core, left to the thread that
    drives the device, each taking an equal part."""

    def __init__(self, u: _Unit, plan: tuple[str, list[tuple]]):
        # plan: `_diagnostic_jobs`'s (estimator, jobs); the host comparison serves the device jobs
        self.u, self.plan, self.pool, self.futures = u, plan, None, {}
        self.jobs = _device_jobs(plan[1])
        self.computing = bool(self.jobs)

    def __enter__(self) -> "_HostSolvers":
        if not self.computing or self.pool is not None:  # nothing to do, or started already
            return self
        from ntps_nb.core.diagnostics import SOLVER_CONFIGS, HostSolverProcesses

        tasks = [(layer, variant, grid, config) for layer, variant, grid in self.jobs
                 for config in SOLVER_CONFIGS[variant]]  # one factorisation each: the workers stay busy alike
        self.pool = HostSolverProcesses.beside_device(len(tasks))
        for layer, variant, grid, config in tasks:
            self.futures.setdefault((layer, variant), []).append(
                self.pool.submit(self.u.ex.moments[layer], variant, config, **grid))
        return self

    def fill(self, frame: pd.DataFrame, layer: int, variant: str) -> pd.DataFrame:
        """A device job's ``frame`` (the plug-in's rows) with its ``solver_max_dev`` from the host values."""
        from ntps_nb.core.diagnostics import solver_deviations

        spread = solver_deviations([variant], {variant: {"ntps": frame["ntps"].to_numpy(np.float64)}},
                                   {variant: [future.result() for future in self.futures[layer, variant]]}, None)
        return frame.assign(solver_max_dev=spread[variant])

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            # values nobody read (a stage before the diagnostics failed or was interrupted): stop at once
            unread = any(not future.done() for futures in self.futures.values() for future in futures)
            self.pool.close(cancel=unread or exc_info[0] is not None)
            self.pool, self.computing = None, False


@contextlib.contextmanager
def _said_by_the_ntps_stage() -> Iterator[None]:
    """A block that computes NTPS again from moments the ntps stage has swept (the diagnostics' r_V and their
    unperturbed rows) says nothing of the sample: the interpolation, next-token tie and rounded-moments warnings
    were said there, named by layer."""
    from ntps_nb.core.score import InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning

    with warnings.catch_warnings():
        for category in (InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def _diagnostic_jobs(u: _Unit) -> tuple[str, list[tuple]]:
    """The diagnostics stage's estimator and jobs: (layer, variant, grid, device or None) for each
    diagnostic layer and variant, the theory k grid cut at the layer's r_V."""
    from ntps_nb.core.estimators import SHARD_ESTIMATORS
    from ntps_nb.core.score import ntps_sweep

    estimator = "plugin" if u.cfg.estimator in SHARD_ESTIMATORS else u.cfg.estimator
    device = u.analysis_device
    sweep = partial(ntps_sweep, device=device)  # a torch device: the backend's sweep
    # the torch backend's diagnostics are the plug-in's; a pooled estimator's theory rows are numpy's
    theory_device = device if estimator == "plugin" else None
    jobs = []
    for layer in u.diag_grid:
        with _said_by_the_ntps_stage():
            r_V = int(sweep(u.ex.moments[layer])["r_V"].iloc[0])
        ks = [k for k in u.cfg.diagnostic_k if k <= r_V] or [1]
        jobs += [(layer, "theory", dict(k=ks), theory_device),
                 (layer, "reference", dict(fraction=list(u.cfg.diagnostic_fractions)), device)]
    return estimator, jobs


def _device_jobs(jobs: list[tuple]) -> list[tuple]:
    """The (layer, variant, grid) of the diagnostics jobs that run on a device (their host solver
    comparison is computed apart, `_HostSolvers`)."""
    return [(layer, variant, grid) for layer, variant, grid, on in jobs if on is not None]


def _starts_host_solvers_early(u: _Unit) -> bool:
    """Whether the diagnostics' host solver comparison starts before the intervals stage: with the
    analysis on a CUDA device the intervals and estimates keep the GPU busy and the CPU mostly idle,
    so the host LAPACK factorisations (at d = 4096 ~100-150 s a layer, most of the diagnostics'
    time) run beside them instead of after them. Not with a CPU analysis: the workers would compete
    with it for the cores."""
    device = u.analysis_device
    return device is not None and str(device).startswith("cuda") and bool(u.diag_grid)


def _early_host_solvers(u: _Unit) -> "_HostSolvers | None":
    """The diagnostics' `_HostSolvers`, started now (their worker processes run while later stages compute),
    or None where they do not start early (`_starts_host_solvers_early`) or have no device job."""
    if not _starts_host_solvers_early(u):
        return None
    host = _HostSolvers(u, _diagnostic_jobs(u))
    return host.__enter__() if host.computing else None


def _diagnostics_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict]:
    """Perturbation, label-permutation and solver diagnostics (`ntps_nb.core.diagnostics`) on
    the diagnostic layers: the theory rows by the config's estimator where it is a pooled one (a
    shard estimator cannot be evaluated on permuted per-text labels: the plug-in stands in, its
    rows say so and so does the record), the reference rows by the plug-in."""
    from ntps_nb.core.diagnostics import ntps_diagnostics

    if not u.diag_grid:
        return None, {}
    # the host comparison started before the intervals stage (`_early_host_solvers`), with its plan, or here
    host_solvers = u.host_solvers if u.host_solvers is not None else _HostSolvers(u, _diagnostic_jobs(u))
    estimator, jobs = host_solvers.plan
    rows = []
    with warnings.catch_warnings(), _said_by_the_ntps_stage(), host_solvers as host:
        _ignore_recorded_as_nan()
        for layer, variant, grid, on in jobs:
            options = dict(estimator=estimator) if variant == "theory" else {}
            frame = ntps_diagnostics(u.ex.moments[layer], u.ex.pooled[layer], u.ex.labels, variant=variant,
                                     n_perturb=u.cfg.n_perturb, n_permutations=u.cfg.n_permutations,
                                     seed=u.cfg.seed, layer=layer, device=on, solvers=on is None, progress=False,
                                     **grid, **options)
            rows.append(frame if on is None else host.fill(frame, layer, variant))
    why = "needs per-shard moments, and the diagnostics permute per-text labels of the pooled features"
    stand_in = list(u.diag_grid) if estimator != u.cfg.estimator else []
    return pd.concat(rows, ignore_index=True), _plugin_only(u.cfg.estimator, stand_in, why)


def _lora_stage(u: _Unit) -> tuple[pd.DataFrame | None, dict, dict[str, pd.DataFrame]]:
    if not u.cfg.lora:
        return None, {"lora": "not configured"}, {}
    status, table, predictions = _run_lora(u.cfg, u.loaded, u.ds, u.log, u.ex, u.ex_test)
    return table, {"lora": status}, ({"lora_predictions": predictions} if predictions is not None else {})


@contextlib.contextmanager
def _interpolation_warnings_once(where: str) -> Iterator[None]:
    """Issue each distinct `ntps_nb.core.score.InterpolationWarning` of the block once, saying how often
    it arose ``where``, and the block's other warnings as they came
    (`ntps_nb.core.score.GatheredInterpolationWarnings`): a sweep over 31 layers below the rank of Sxx
    said the same paragraph 31 times, burying the study's progress lines. A
    `ntps_nb.core.score.NextTokenTieWarning` or `RoundedMomentsWarning` is said with ``where`` before it
    (`warnings_named`)."""
    from collections import Counter

    from ntps_nb.core.score import GatheredInterpolationWarnings, InterpolationWarning, warnings_named

    gathered = GatheredInterpolationWarnings()
    with warnings_named(where), gathered.at():  # tie and rounding warnings name the stage and unit too
        yield
    for message, count in Counter(gathered.messages.get(None, [])).items():  # in the order they first arose
        said = f" (said once for the {count} times it arose in {where})" if count > 1 else ""
        warnings.warn(InterpolationWarning(message + said), stacklevel=3)


def _ignore_recorded_as_nan() -> None:
    """Warnings of the package's own scores that the tables record anyway (a NaN, a count of
    resamples left out): expected on small or degenerate units, so not repeated on the console."""
    from ntps_nb.core.peers import PeerConvergenceWarning, PeerUndefinedWarning
    from ntps_nb.core.stats import DegenerateSampleWarning

    for category in (PeerUndefinedWarning, PeerConvergenceWarning, DegenerateSampleWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".* resamples had undefined geometry", category=RuntimeWarning)


#: Each stage's computation: (table or None, record) or, for a stage with `Stage.extras`,
#: (table, record, extra tables by name).
_COMPUTE: dict[str, Callable[[_Unit], tuple]] = {
    "ntps": _ntps_stage, "probes": _probes_stage, "peers": _peers_stage, "intervals": _intervals_stage,
    "estimates": _estimates_stage, "diagnostics": _diagnostics_stage, "lora": _lora_stage,
}


def _earlier_result(cfg: StudyConfig, model: str, dataset: str, name: str,
                    store: StageStore) -> tuple[int, str, StageResult] | None:
    """The newest result of stage ``name`` that `REFRESHES` can bring to the current version.

    Looks under the key the stage had at each refreshable version (same settings, same inputs) in
    the stage store, then in the complete unit folder (its recorded key for the stage must be that
    key).

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.
    name : str
        A stage name.
    store : StageStore
        The unit's stage store.

    Returns
    -------
    (version, key, result) of the earlier result with a table, or None when there is none.
    """
    folder = cfg.unit_folder(model, dataset)
    meta = _complete_unit_meta(folder, model, dataset)
    for version in sorted(REFRESHES.get(name, {}), reverse=True):
        key = stage_keys(cfg, model, dataset, versions={name: version})[name]
        found = store.load(name, key)
        table_path = folder / f"{STAGES[STAGE_NAMES.index(name)].table}.csv"
        if (found is None and meta is not None and ((meta.get("stages") or {}).get(name) or {}).get("key") == key
                and table_path.is_file()):
            found = StageResult(_strip_provenance(read_table(table_path)),
                                {"adopted_from": str(folder), **_computed_when(meta, name)})
        if found is not None and found.table is not None:
            return version, key, found
    return None


def run_unit(cfg: StudyConfig, model_name: str, dataset_name: str, loaded: tuple | None = None,
             *, cache: str | os.PathLike | None = None, log: Callable[[str], None] = _say,
             store: StageStore | None = None, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Every table of one (model, dataset) unit; returns {table: frame, "unit": meta dict}.

    Stage by stage (`STAGES`): a stage whose key (`stage_keys`) is in the ``store`` (default
    `stage_store`) is read from there, one with a result of an earlier version that `REFRESHES`
    updates is refreshed from it, any other is computed and stored, so a changed setting
    recomputes only the stages that depend on it. A complete unit folder from before stages is
    mapped into the store first (`adopt_unit_folder`). The extraction runs only when a stage has
    to be computed.

    ``loaded`` is ``(model, tokenizer, info)`` from `ntps_nb.models.load_model` (loaded here if None).
    ``cache``: an extraction cache folder (`ntps_nb.extract.extract_cached`); None caches only when
    the config sets ``cache_extractions`` (the default cache folder then).

    Parameters
    ----------
    cfg : StudyConfig
    model_name, dataset_name : str
        The unit's model and dataset names.
    loaded : tuple, optional
        ``(model, tokenizer, info)``, as above.
    cache : str or PathLike, optional
        Extraction cache folder, as above.
    log : callable
        Receives one progress line at a time.
    store : StageStore, optional
        The stage store (default `stage_store`).
    only : sequence of str, optional
        Compute only these of the stages that are not stored under their current keys; every
        other such stage keeps what the complete unit folder holds: `write_unit` copies its tables
        as they are, and ``unit.json`` keeps its recorded entry (so `stage_states` still calls it
        stale). For a unit with several outdated stages of which one is wanted now (e.g. the
        estimates of a new flag without retraining LoRA results of an old stage version).

    Returns
    -------
    dict
        Stage name (ntps, probes, peers, intervals, estimates, diagnostics, lora) to its DataFrame with the
        unit's provenance columns, for every stage that has a table; and ``"unit"`` to the unit's
        metadata dict (settings, stage keys, timings, layers, model info, environment), as
        written to ``unit.json`` by `write_unit` (with ``only``, ``"held"`` names the stages kept
        from the folder). Its ``timings_s``, ``seconds``, ``finished`` and ``environment`` are this run's,
        except where the run read no extraction (every stage stored or refreshed from its table) and the
        unit folder holds a complete unit: those keep the folder's values, the run that computed the unit,
        and this run's go under ``last_run``. What each stage cost, when and where it was computed is in its
        record (``stages``: ``seconds``, ``finished``, ``ran_on``, and ``extract_version``, the rules of the moments it
        read, which a stage reused from an earlier pass keeps; `unit_compute_seconds` sums the seconds).
    """
    from ntps_nb import __version__
    from ntps_nb import extract as extraction
    from ntps_nb.cache import cache_dir
    from ntps_nb.extract import as_text_set

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        if timings[name] >= 1:
            log(f"    {model_name} x {dataset_name}: {name} {timings[name]:.1f} s")

    keys = stage_keys(cfg, model_name, dataset_name)
    store = store if store is not None else stage_store(cfg, model_name, dataset_name)
    adopted = adopt_unit_folder(cfg, model_name, dataset_name, store)
    if adopted:
        log(f"    {model_name} x {dataset_name}: reusing {', '.join(adopted)} of the unit folder computed before")
    if cfg.reuse_folder is not None:
        lent = cfg.reuse_folder / "units" / unit_name(model_name, dataset_name)
        adopted = adopt_unit_folder(cfg, model_name, dataset_name, store, folder=lent)
        if adopted:
            log(f"    {model_name} x {dataset_name}: reusing {', '.join(adopted)} of {lent}")

    if loaded is None:
        from ntps_nb.models import load_model

        loaded = load_model(model_name, seed=cfg.seed, device=cfg.device)
    model, tok, info = loaded
    lap("load_model")
    ds, dinfo = load_unit_dataset(cfg, dataset_name)  # a registry name or the study's own file
    train, test = as_text_set(ds["train"]), as_text_set(ds["test"])
    lap("load_dataset")

    available = list(range(info.n_hidden_states))
    layers = resolve_layers(cfg.layers, available, "layers")
    u = _Unit(cfg, loaded, ds, train, test, layers,
              probe_grid=resolve_layers(cfg.probe_layers, layers, "probe_layers") if cfg.probes else [],
              peer_grid=resolve_layers(cfg.peer_layers, layers, "peer_layers") if cfg.peers else [],
              interval_grid=resolve_layers(cfg.interval_layers, layers, "interval_layers") if cfg.shards else [],
              diag_grid=resolve_layers(cfg.diagnostic_layers, layers, "diagnostic_layers") if cfg.diagnostics else [],
              log=log)
    u.analysis_device = resolve_analysis_device(cfg.analysis_device, next(model.parameters()).device)
    pooled = sorted(set(u.probe_grid) | set(u.peer_grid) | set(u.diag_grid))
    todo = [name for name in ANALYSIS_STAGES if not store.has(name, keys[name])]
    held: list[str] = []
    if only is not None:
        check_stage_names(only)
        before = _complete_unit_meta(cfg.unit_folder(model_name, dataset_name), model_name, dataset_name)
        held = [name for name in todo if name not in only]
        if held and before is None:
            raise StudySettingsError(f"{model_name} x {dataset_name}: stages {held} are not stored under their current "
                                     "keys and there is no complete unit folder to keep them from; run the unit whole")
        todo = [name for name in todo if name in only]
    # results of an earlier version brought up to date from their own tables read no extraction
    refreshable = {name: found for name in todo if stage_enabled(cfg, name)
                   and (found := _earlier_result(cfg, model_name, dataset_name, name, store)) is not None}
    reading = [name for name in todo if stage_enabled(cfg, name) and name not in refreshable]  # off: reads nothing
    kept = cache is not None or cfg.cache_extractions

    def run_extraction(data, settings):
        settings = {**settings, "keep_on_device": _keeps_moments_on_device(u, settings)}
        if not kept:
            metadata = {"model": info.as_dict(), "dataset": dinfo}
            return extraction.extract(model, tok, data, **settings, metadata=metadata)
        return extraction.extract_cached(model, tok, info, data, cache=cache, dataset_info=dinfo, **settings)

    # where this run computes (each stage it computes records it: a unit's stages may come from several runs)
    ran_on = _ran_on(model, cfg)
    if reading:  # some stage needs the extractions (LoRA reads them too: the base model's side)
        u.ex = run_extraction(train, _extraction_settings(cfg, layers, train=True, pooled=pooled,
                                                           shard_layers=u.interval_grid))
        lap("extract_train")
        if "heldout" in cfg.probes and u.probe_grid and {"probes", "lora"} & set(reading):
            u.ex_test = run_extraction(test, _extraction_settings(cfg, u.probe_grid, train=False, pooled=u.probe_grid,
                                                                  shard_layers=[]))
        lap("extract_test")
        where = Path(cache) if cache is not None else cache_dir("extractions")
        cache_key = u.ex.metadata.get("cache_key")
        store.save("extraction", keys["extraction"], None, {
            "cache_key": cache_key, "kept": str(where / cache_key) if kept and cache_key else None,
            "seconds": u.ex.metadata.get("seconds"), "n_truncated": u.ex.metadata.get("n_truncated"),
            "test_seconds": u.ex_test.metadata.get("seconds") if u.ex_test is not None else None, "ran_on": ran_on,
            "mean_length": u.ex.metadata.get("mean_length"), "finished": _now(),
            "tokenizer_sha256": info.tokenizer_sha256, "extract_version": u.ex.metadata.get("extract_version"),
            "token_precision": u.ex.metadata.get("token_precision"),
            "float64_layers": u.ex.metadata.get("float64_layers")})
    else:
        log(f"    {model_name} x {dataset_name}: every stage it computes reads nothing new: no extraction")
    extraction_record = (store.load("extraction", keys["extraction"]) or StageResult(None, {})).record
    from ntps_nb.models import check_same_tokenizer

    check_same_tokenizer(extraction_record.get("tokenizer_sha256"), info.tokenizer_sha256,
                         f"{model_name} x {dataset_name}: the stored extraction stage (run the unit where the "
                         "tokenizer matches, or remove its stages)")

    provenance = {
        "study": cfg.name, "model": model_name, "pretrained": bool(info.pretrained), "quantized": bool(info.quantized),
        "dataset": dataset_name, "n_train": len(train.texts), "n_test": len(test.texts), "n_classes": train.n_classes,
        "max_length": cfg.max_length, "drop_bos": cfg.drop_bos, "seed": cfg.seed, "package_version": __version__,
        "config_hash": cfg.config_hash,
    }
    tables: dict[str, Any] = {}
    # the extraction is read (from the extraction cache where it is kept, else by a forward pass)
    # whenever a stage is computed; the other stages say whether they were computed or reused
    stage_meta: dict[str, Any] = {"extraction": {"key": keys["extraction"], "read": bool(reading)}}
    if "ran_on" in extraction_record:
        stage_meta["extraction"]["ran_on"] = extraction_record["ran_on"]
    lora_status = "not configured"
    # the analysis's BLAS/OpenMP pools get this process's share of its cores (torch's threads, of the
    # forward passes and LoRA, stay as `run_study` set them)
    with analysis_threads(cfg.analysis_threads) as n_threads, contextlib.ExitStack() as cleanup:
        for name in ANALYSIS_STAGES:
            if name in held:  # kept from the unit folder as it is (`write_unit` copies its tables)
                stage_meta[name] = {**before.get("stages", {}).get(name, {"key": None}), "computed": False, "held": True}
                if name == "lora":
                    lora_status = before.get("lora", lora_status)
                continue
            result = store.load(name, keys[name]) if name not in todo else None
            if name == "intervals" and "diagnostics" in todo and stage_enabled(cfg, "diagnostics"):
                u.host_solvers = _early_host_solvers(u)  # beside the GPU's intervals and estimates
                if u.host_solvers is not None:
                    cleanup.push(u.host_solvers.__exit__)  # sees the exception: a failure stops the workers at once
            if result is None and name in refreshable:
                version, earlier_key, earlier = refreshable[name]
                table = REFRESHES[name][version](earlier.table)
                record = {**earlier.record, "refreshed_from": {"version": version, "key": earlier_key},
                          "refreshed": _now()}
                result = store.save(name, keys[name], table, record, extra=earlier.extra)
                log(f"    {model_name} x {dataset_name}: {name} refreshed from its version-{version} table")
            elif result is None:
                t0 = time.perf_counter()
                with _interpolation_warnings_once(f"the {name} stage of {model_name} x {dataset_name}"):
                    table, record, *more = _COMPUTE[name](u)
                extra = more[0] if more else {}
                record = {**record, "seconds": round(time.perf_counter() - t0, 3), "finished": _now(), "ran_on": ran_on}
                if u.ex is not None:  # the extraction rules of the moments it read (a later pass may have others)
                    record["extract_version"] = u.ex.metadata.get("extract_version")
                if name == "lora" and str(record.get("lora", "")).startswith("skipped"):
                    result = StageResult(table, record)  # deciding to skip again is instant: not stored
                else:
                    result = store.save(name, keys[name], table, record, extra=extra)
            if name == "lora":
                lora_status = result.record.get("lora", "done" if result.table is not None else lora_status)
            if result.table is not None:  # a table stored before the estimator setting was the plug-in's
                tables[name] = _with_provenance(with_estimator(result.table, name), provenance)
            for extra_name, frame in result.extra.items():
                tables[extra_name] = _with_provenance(frame, provenance)
            # a reused stage keeps the seconds and date of the run that computed it (timings_s: this run's)
            stage_meta[name] = {"key": keys[name], "computed": name in todo and name not in refreshable,
                                "seconds": result.record.get("seconds"), "finished": result.record.get("finished")}
            # where it was computed, from moments of which extraction version; the table it was refreshed from
            for said in ("ran_on", "extract_version", "refreshed_from"):
                if said in result.record:
                    stage_meta[name][said] = result.record[said]
            if str(result.record.get(name, "")).startswith("skipped"):  # why the stage wrote no table
                stage_meta[name]["skipped"] = result.record[name]
            if "estimates_flag" in result.record:  # why no row of the study's estimator is reliable
                stage_meta[name]["flag"] = result.record["estimates_flag"]
            lap(name)

    this_run = {"timings_s": timings, "seconds": round(sum(timings.values()), 3), "finished": _now(),
                "environment": _environment(ran_on, cfg, n_threads)}
    earlier = _complete_unit_meta(cfg.unit_folder(model_name, dataset_name), model_name, dataset_name)
    if not reading and earlier is not None:
        # a run that read no extraction took stored stages or refreshed them from their tables: the unit keeps
        # when, how long and where it was computed, and this run is its last_run
        run = {**{name: earlier[name] for name in this_run if name in earlier}, "last_run": this_run}
    else:
        run = this_run
    tables["unit"] = {
        **provenance, "complete": True, "settings": cfg.settings(), **run, "lora": lora_status, "stages": stage_meta,
        "extraction_key": extraction_record.get("cache_key"), "extraction_seconds": extraction_record.get("seconds"),
        "extraction_seconds_test": extraction_record.get("test_seconds"),
        "layers": layers, "probe_layers": u.probe_grid, "peer_layers": u.peer_grid,
        "interval_layers": u.interval_grid, "diagnostic_layers": u.diag_grid, "model_info": info.as_dict(),
        "n_truncated_train": extraction_record.get("n_truncated"),
        "mean_length_train": extraction_record.get("mean_length"),
        # which extraction rules formed the moments (absent: a unit extracted before they were recorded)
        "extract_version": extraction_record.get("extract_version"),
        "token_precision_train": extraction_record.get("token_precision"),
        # the layers a float32 pass formed again in float64 (`ntps_nb.extract.token_rounding`; absent before version 5)
        "float64_layers_train": extraction_record.get("float64_layers"),
    }
    if cfg.dataset_file(dataset_name) is not None:  # the file read (`ntps_nb.study.runner.unit_status` checks it)
        tables["unit"]["dataset_file"] = cfg.dataset_file(dataset_name)._asdict()
    if held:
        tables["unit"]["held"] = held
    return tables


def check_stage_names(names: Sequence[str]) -> None:
    """Raise a `StudySettingsError` naming the analysis stages when ``names`` holds another name.

    Parameters
    ----------
    names : sequence of str
        Stage names asked for (``run_unit``'s ``only``, ``run_study``'s ``stages``).

    Returns
    -------
    None
    """
    unknown = sorted(set(names) - set(ANALYSIS_STAGES))
    if unknown:
        raise StudySettingsError(f"unknown stage(s) {unknown}; the stages are {list(ANALYSIS_STAGES)}")


def read_unit_record(path: str | os.PathLike) -> dict[str, Any]:
    """A unit's ``unit.json`` (or a stage's ``record.json``), with an error that names it where it is no JSON.

    Parameters
    ----------
    path : str or PathLike
        The record file.

    Returns
    -------
    dict
        Its contents.

    Raises
    ------
    StudySettingsError
        When the file is not valid JSON (a merge conflict in committed results, or a damaged file).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise StudySettingsError(f"{path} is not valid JSON ({error}): a merge conflict or a damaged file; restore "
                                 "it (git checkout -- <file>) or delete its folder to compute it again") from error


#: A line git writes into a file whose merge conflicts (``<<<<<<< ours``, ``=======``, ``>>>>>>> theirs``).
CONFLICT_MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", flags=re.MULTILINE)


def read_table(path: str | os.PathLike, **options: Any) -> pd.DataFrame:
    """A study table (a unit's, a stage's or a combined one), with an error that names it where it cannot be read.

    Parameters
    ----------
    path : str or PathLike
        The CSV file.
    **options
        Passed to ``pandas.read_csv``.

    Returns
    -------
    DataFrame

    Raises
    ------
    StudySettingsError
        When it holds git's merge-conflict markers (pandas would read them as rows of NaN), or
        pandas cannot parse it (a damaged file).
    """
    remedy = "restore it (git checkout -- <file>, or resolve the conflict) or compute it again"
    text = Path(path).read_text()
    conflict = CONFLICT_MARKER.search(text)
    if conflict:
        line = text.count("\n", 0, conflict.start()) + 1
        raise StudySettingsError(f"{path} holds a git merge-conflict marker at line {line}: {remedy}")
    try:
        return pd.read_csv(io.StringIO(text), **options)
    except ValueError as error:  # pandas' ParserError and EmptyDataError
        raise StudySettingsError(f"{path} cannot be read as a table ({type(error).__name__}: {error}): {remedy}") \
            from error


def _complete_unit_meta(folder: Path, model: str, dataset: str) -> dict[str, Any] | None:
    """The ``unit.json`` of a unit folder when it is complete and of this unit, else None."""
    path = folder / "unit.json"
    if not path.is_file():
        return None
    meta = read_unit_record(path)
    if not meta.get("complete") or meta.get("model") != model or meta.get("dataset") != dataset:
        return None
    return meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")



def _run_lora(cfg: StudyConfig, loaded: tuple, ds, log, ex=None,
              ex_test=None) -> tuple[str, pd.DataFrame | None, pd.DataFrame | None]:
    """LoRA of one unit with `ntps_nb.lora` (imported lazily): the gain over the held-out probe and
    NTPS of the last layer before and after merging, as rows, and the per-text predictions of LoRA
    and the probe (`ntps_nb.lora.predictions_table`); or the reason it was skipped (and two Nones).

    The base model's side (pooled features for the probe, moments for NTPS before) comes from the
    unit's own extractions ``ex`` / ``ex_test`` where they hold the last layer, so only the merged
    model is extracted again (on long texts that saves ~40 minutes of CPU per unit)."""
    model, tok, info = loaded
    if not info.pretrained:
        return "skipped: LoRA runs on pretrained models only (the random controls are not fine-tuned)", None, None
    try:
        import importlib

        lora = importlib.import_module("ntps_nb.lora")
    except ModuleNotFoundError as error:
        if error.name not in ("ntps_nb.lora", "peft"):
            raise
        return f"skipped: {error.name} is not available", None, None
    budget = dict(cfg.lora_budget)
    result = lora.finetune_lora(loaded, ds["train"], ds["test"], max_length=cfg.max_length, drop_bos=cfg.drop_bos,
                                seed=cfg.seed, progress=False, **budget)
    last = info.n_hidden_states - 1
    base_features = None
    if ex is not None and ex_test is not None and ex.pooled and ex_test.pooled and last in ex.pooled and last in ex_test.pooled:
        base_features = (ex.pooled[last], ex_test.pooled[last])
    before = ex.moments if ex is not None and last in ex.moments else None
    gain = lora.lora_gain(result, ds["train"], ds["test"], base=loaded, progress=False, seed=cfg.seed,
                          precision=cfg.precision, batch_size=cfg.batch_size, base_features=base_features)
    ks = [k for k in (cfg.k if cfg.k != "all" else (1, 2, 4, 8, 16, 32, 64)) if k <= 64]
    before_after = lora.ntps_before_after(result, ds["train"], k=ks, base=loaded, layers=[last],
                                          batch_size=cfg.batch_size, precision=cfg.precision, before=before,
                                          progress=False)
    gain_row = {key: value for key, value in gain.items() if np.isscalar(value) or value is None}
    table = before_after.drop(columns=[c for c in ("model", "max_length", "drop_bos") if c in before_after.columns])
    table = table.assign(**{f"lora_{key}": value for key, value in gain_row.items()
                            if key not in ("model", "max_length", "drop_bos", "n_classes", "seed")})
    log(f"    LoRA: accuracy {gain.get('lora_accuracy', float('nan')):.3f}, gain {gain.get('gain', float('nan')):+.3f}")
    return "done", table, gain["predictions"]



def write_unit(folder: Path, tables: dict[str, Any]) -> Path:
    """Write a unit's tables and ``unit.json`` atomically: the folder appears complete or not at all.

    Parameters
    ----------
    folder : Path
        The unit folder (replaced if it exists).
    tables : dict
        As returned by `run_unit`: each frame is written as ``<name>.csv`` (floats with
        ``CSV_FLOAT_FORMAT``) and ``tables["unit"]`` as ``unit.json``.

    Returns
    -------
    Path
        ``folder``.
    """
    held = [stage for stage in STAGES if stage.name in tables["unit"].get("held", ())]
    with atomic_path(folder, directory=True) as tmp:
        for stage in held:  # the stages `run_unit(..., only=...)` kept: their tables as the folder has them
            for name in (stage.table, *stage.extras):
                if name and (folder / f"{name}.csv").is_file() and name not in tables:
                    shutil.copyfile(folder / f"{name}.csv", tmp / f"{name}.csv")
        for name, frame in tables.items():
            if name == "unit":
                continue
            frame.to_csv(tmp / f"{name}.csv", index=False, float_format=CSV_FLOAT_FORMAT)
        (tmp / "unit.json").write_text(json.dumps(tables["unit"], indent=1, sort_keys=True, default=str))
        _readable(tmp)
    return folder



def _ran_on(model, cfg: StudyConfig) -> dict[str, str]:
    """Where a run computes: the device the model runs on (with the GPU's name), the host and the analysis's
    device. Each stage a run computes records it as ``ran_on`` (a unit's stages may come from several runs)."""
    import torch

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "host": platform.node(),
            "analysis_device": resolve_analysis_device(cfg.analysis_device, device) or "numpy"}


def _environment(ran_on: dict[str, str], cfg: StudyConfig, analysis_threads: int) -> dict[str, Any]:
    """Where and with what a unit was computed (its ``unit.json``): ``ran_on`` (`_ran_on`), the threads and the
    package versions; none of it enters the hash. ``analysis_threads`` is the bound the analysis ran under;
    ``analysis_processes`` the processes its cores were divided among when the bound was the default share (None
    when the config set it)."""
    import torch

    return {**ran_on, "torch_threads": torch.get_num_threads(), "analysis_threads": analysis_threads,
            "analysis_processes": None if cfg.analysis_threads is not None else analysis_processes(),
            "cores": available_cores(), **_versions()}

