"""A study's settings: the TOML file (``[study]`` table) read into a frozen `StudyConfig`, the
layer grids resolved against a model, and the small helpers every part of the study shares.

Besides the registry's names, a study takes your own model and your own data::

    [study]
    name = "mine"
    models = ["smollm2-135m", "HuggingFaceTB/SmolLM2-360M", "../checkpoints/my-model"]
    datasets = ["trec6"]

    [[datasets]]
    name = "tickets"            # the dataset column of every table, and the unit's folder name
    path = "data/tickets.csv"   # CSV, TSV or parquet; relative to this TOML file's folder
    text = "message"            # the text column (default "text")
    label = "team"              # the label column (default "label")
    split = "part"              # optional: a column of "train" / "test"

A model is a registry name (`ntps_nb.models.known_models`, optionally with ``:random``), a
folder (relative to the TOML file's folder, or absolute) or a Hugging Face id ``owner/name``.
A data file is read through `ntps_nb.datasets.read_dataset_file` (so through
`ntps_nb.datasets.from_pandas` and its checks) when the config is loaded; without a ``split``
column it is split stratified with seed 42 (as the registry's datasets without a test split),
the test share being the study's ``max_test / (max_train + max_test)`` (0.3 when either is
unbounded), then subsampled like any dataset. The file's sha256 enters every stage key of its
units (`dataset_identity`): editing the file makes them stale.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import platform
import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ntps_nb.cache import content_key

#: The tables every unit writes (``lora`` only when LoRA ran; ``estimates`` from the units computed
#: since the estimates stage exists).
TABLES = ("ntps", "probes", "peers", "intervals", "diagnostics", "estimates")
#: The tables whose rows name the estimator of NTPS that produced them (column ``estimator``).
ESTIMATOR_TABLES = ("ntps", "intervals", "diagnostics", "estimates")
#: Significant digits kept in the CSVs: enough for every comparison, small enough for git.
CSV_FLOAT_FORMAT = "%.7g"
#: Where results go unless a config says otherwise (relative to the repository root).
RESULTS_ROOT = Path(__file__).resolve().parents[2] / "data" / "results"
#: Bump when what a unit computes changes, so old units are not mistaken for current ones.
STUDY_VERSION = 1


def _say(message: str) -> None:
    print(message, flush=True)  # progress lines reach nohup logs as they happen


class StudySettingsError(ValueError):
    """A study config is malformed, or results computed with different settings would mix."""


# -- configuration -------------------------------------------------------------------------------


#: Settings added after units were committed, with the value those units were computed with: a
#: setting at that value is left out of `StudyConfig.settings` (so of the config hash).
_ADDED_LATER = {"precision": "float32", "estimator": "plugin", "interval_estimator": "plugin",
                "interval_variants": ("theory", "reference"), "estimate_interval": "jackknife",
                "estimate_rotation_flag": False, "estimate_stationary_flag": False,
                "estimate_rotation_widening": False, "estimate_widening_level": 0.90,
                "estimate_stationary_widening": False}


#: Values of ``interval_estimator``: the shard bootstrap of the plug-in, or of the study's ``estimator``.
INTERVAL_ESTIMATORS = ("plugin", "estimator")
#: Variants whose shard bootstrap the intervals stage can compute (``interval_variants``).
INTERVAL_VARIANTS = ("theory", "reference")


class DatasetFile(NamedTuple):
    """A study's own dataset: a ``[[datasets]]`` table of the TOML, its file's sha256 when read."""

    name: str
    path: str  # absolute
    text: str
    label: str
    split: str | None
    sha256: str


#: The keys of a ``[[datasets]]`` table (name and path required).
DATASET_FILE_KEYS = ("name", "path", "text", "label", "split")
#: A Hugging Face model id: ``owner/name``.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid (models x datasets) and the settings every unit shares.

    Layer grids accept "all", "last", "grid:N" (N evenly spaced hidden states, the first and the
    last included) or a list of hidden-state indices (0 = embeddings; negative indices count from
    the end, -1 = the last hidden state). ``k`` is "all" (every k = 1..r_V
    of the theory variant) or a list of integers. ``estimator`` is the estimator of the theory
    NTPS in the ntps, estimates and diagnostics tables (`ntps_nb.core.estimators.ESTIMATORS`;
    "plugin", the default, is the NTPS of the sample's moments; see `ntps_nb.study`), and in the
    intervals table where ``interval_estimator`` is "estimator" (its default, "plugin", bootstraps
    the plug-in: the estimator's own interval is the estimates table's jackknife).
    ``interval_variants`` names the variants the intervals stage bootstraps (both by default; the
    theory variant alone where the released algorithm's replicates cost too much at a large d).
    ``estimate_interval`` is the estimates table's interval: "jackknife", "rotation"
    (`ntps_nb.core.rotation`) or "quadratic" (`ntps_nb.core.quadratic`; the estimator "richardson");
    unset, `ntps_estimate`'s own choice for the study's estimator and shards
    (`ntps_nb.core.estimators.resolve_interval`: "quadratic" for "richardson" with at least 4 shards, else
    "jackknife"). ``estimate_rotation_flag`` gives the estimates table's ``reliable`` the flag's rotation
    condition (`ntps_estimate`'s ``rotation_flag``; true unless set), ``estimate_stationary_flag`` its
    stationary condition and the ``stationary_distance`` column (``stationary_flag``; true unless set), and
    ``estimate_rotation_widening`` widens its reliable rows' interval over the rotation sets of the pairs at k
    (``rotation_widening``; true unless set), its rotation sets at ``estimate_widening_level`` (``widening_level``;
    `ntps_nb.core.rotation.WIDENING_LEVEL` unless set); ``estimate_stationary_widening`` joins its reliable rows'
    interval with NTPS at the principal angles a selective test cannot separate from 0 or 1
    (``stationary_widening``, `ntps_nb.core.estimators.stationary_widening`; with the stationary condition only:
    where ``estimate_stationary_flag`` is false it is inert, out of the hash). The defaults are `ntps_estimate`'s,
    the ones calibrated on the estimator map (docs/estimator.md). The committed studies were computed with
    "jackknife", without the rotation and stationary conditions and without the widening, and their configs say so
    (``estimate_interval = "jackknife"``, ``estimate_rotation_flag = false``, ``estimate_stationary_flag = false``,
    ``estimate_rotation_widening = false``): at those values the settings stay out of the config hash
    (`_ADDED_LATER`; ``estimate_widening_level`` stays out at 0.90, the level the widening had before the
    setting), so those studies' keys stand.
    """

    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    max_train: int | None = 2000
    max_test: int | None = 1000
    seed: int = 0
    max_length: int = 256
    batch_size: int = 16
    drop_bos: bool = True
    precision: str = "float32"  # the extraction's products; see `settings` for why float32 is the default here
    layers: Any = "all"
    k: Any = "all"
    estimator: str = "plugin"  # of the theory NTPS (ntps_nb.core.estimators.ESTIMATORS); see `load_config`
    probes: tuple[str, ...] = ("heldout", "paper_in_sample")
    probe_layers: Any = "all"
    peers: bool = True
    peer_layers: Any = "all"
    shards: int = 20
    interval_layers: Any = (-1,)
    n_boot: int = 200
    interval_method: str = "basic"
    # the estimator the shard bootstrap of the intervals stage resamples: "plugin" (the released
    # protocol's intervals, kept for comparison; the study estimator's own interval is the estimates
    # stage's jackknife) or "estimator" (the study's ``estimator``: richardson's bootstrap costs ~3x)
    interval_estimator: str = "plugin"
    # the variants the intervals stage bootstraps: both (the released protocol), or one. At a large
    # hidden size the released algorithm's replicates cost most of a unit (Llama-3-8B shape on an
    # H200: 90 s a layer against the theory variant's 39 s); a study can keep its point values (the
    # ntps table) and bootstrap the theory variant alone
    interval_variants: tuple[str, ...] = ("theory", "reference")
    # the estimates table's interval (`ntps_nb.core.estimators.ntps_estimate`'s ``interval``): the
    # jackknife-t interval, or "rotation", that interval widened over the rotation of nearly tied
    # eigenvector pairs at k (`ntps_nb.core.rotation`; docs/estimator.md), or "quadratic", its variance
    # without the jackknife's excess on the error's quadratic part (`ntps_nb.core.quadratic`). None (unset):
    # ntps_estimate's choice for the estimator and shards, resolved when the config is made
    estimate_interval: str | None = None
    # the estimates table's flag with its rotation condition (`ntps_nb.core.rotation.rotation_stability`):
    # a row is reliable only where NTPS's range over the rotations of the pairs at k that the shards
    # cannot reject stays inside its interval (docs/estimator.md), as ntps_estimate's default; the
    # committed studies set it false, the flag their units were computed with
    estimate_rotation_flag: bool = True
    # ... and with its stationary condition (`ntps_nb.core.estimators.STATIONARY_SE`): a row is reliable only
    # where the data place NTPS away from its stationary points, where the interval is not calibrated
    estimate_stationary_flag: bool = True
    # the reliable rows' interval widened over the rotations of the pairs at k a test conditioned on the eigengap
    # condition cannot reject (`ntps_nb.core.rotation.rotation_widening`), as ntps_estimate's default; the
    # committed studies set it false, the interval their units were computed with
    estimate_rotation_widening: bool = True
    # ... its rotation sets at this level (ntps_estimate's ``widening_level``, its default unless set; the interval
    # stays at its own); in the hash only where the widening is on
    estimate_widening_level: float | None = None
    # the reliable rows' interval joined with NTPS at the principal angles a test conditioned on the stationary
    # condition cannot separate from 0 or 1 (`ntps_nb.core.estimators.stationary_widening`), as ntps_estimate's
    # default; in the hash only where the stationary condition is on
    estimate_stationary_widening: bool = True
    diagnostics: bool = True
    diagnostic_layers: Any = (-1,)
    diagnostic_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    diagnostic_fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
    n_perturb: int = 5
    n_permutations: int = 20
    lora: bool = False
    lora_budget: dict = dataclasses.field(default_factory=dict)
    cache_extractions: bool = False  # shards: 4 float64 d x d per interval layer (10.6 MB SmolLM2, 13.1 Gemma-3)
    # BLAS/OpenMP threads of the numpy/scipy/sklearn part; None: this process's share of its cores
    # (`ntps_nb.core.threads.default_threads`: its cores // the worker processes the run started)
    analysis_threads: int | None = None
    torch_threads: int | None = 1  # torch intra-op threads of the forward passes (None: torch's default)
    device: str = "cpu"  # where the models run ("cpu", "cuda", "cuda:1"); recorded per unit, not in the hash
    # where the analysis stages compute (`resolve_analysis_device`): "auto" (the torch backend on the
    # model's device when that is a GPU, else the numpy core), "numpy", or a torch device ("cuda",
    # "cpu" for torch on the CPU); recorded per unit, not in the hash: the theory numbers agree to 1e-9
    # on well-conditioned problems; the reference variant where it is ill-posed, ties of eigenvalues
    # (which either backend breaks its way) and logistic-probe predictions of texts on the decision
    # boundary (each solver stops at its own tolerance) may differ
    analysis_device: str = "auto"
    results_dir: str | None = None
    # another study's results folder (a study name under data/results, or a path) whose complete unit
    # folders lend their still-valid stages (`ntps_nb.study.stages.adopt_unit_folder`): a variant of a
    # study reuses its LoRA results instead of retraining; not in the hash
    reuse_from: str | None = None
    source: str | None = None  # the TOML file, for messages only
    # the datasets of ``datasets`` that are files ([[datasets]] tables); part of the grid, and of
    # their own units' stage keys (`dataset_identity`), not of the study-wide settings
    dataset_files: tuple[DatasetFile, ...] = ()

    def __post_init__(self) -> None:
        if self.estimate_interval is None:  # ntps_estimate's own choice, recorded as the interval it is
            from ntps_nb.core.estimators import resolve_interval

            object.__setattr__(self, "estimate_interval",
                               resolve_interval(None, self.estimator, int(self.shards or 0)))
        if self.estimate_widening_level is None:  # ntps_estimate's default, recorded as the level it is
            from ntps_nb.core.rotation import WIDENING_LEVEL

            object.__setattr__(self, "estimate_widening_level", WIDENING_LEVEL)

    def inert_settings(self) -> frozenset[str]:
        """The settings that decide no number under the values of the others, left out of the config hash
        (`settings`) and of every stage's key (`ntps_nb.study.stages.stage_keys`) so that they do not make a unit
        stale: the widening's level (``estimate_widening_level``) where the widening is off, and the stationary
        widening (``estimate_stationary_widening``) where the stationary condition it is conditioned on is off.

        Returns
        -------
        frozenset of str
            Field names of this config.
        """
        inert = set() if self.estimate_rotation_widening else {"estimate_widening_level"}
        if not self.estimate_stationary_flag:
            inert.add("estimate_stationary_widening")
        return frozenset(inert)

    def settings(self) -> dict[str, Any]:
        """Everything that changes a unit's numbers (not the grid, not where results go).

        Returns
        -------
        dict
            The fields that decide the numbers as JSON values, plus ``study_version``; a setting
            added after units were committed is left out while it has the value those units
            were computed with.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("name", "models", "datasets", "results_dir", "reuse_from", "source",
                                 "cache_extractions", "analysis_threads", "torch_threads", "device", "analysis_device",
                                 "dataset_files")}
        out["study_version"] = STUDY_VERSION
        for name in self.inert_settings():
            del out[name]
        # Keys added after units were committed enter the hash only away from the value those units
        # were computed with, so that adding the key did not make them stale. precision: every unit
        # before it was computed on a CPU with float32 products (the then default of "auto");
        # estimator: every unit before it was computed by the plug-in.
        for key, before in _ADDED_LATER.items():
            if key in out and _json(out[key]) == _json(before):
                del out[key]
        return json.loads(json.dumps(out, default=list))

    @property
    def config_hash(self) -> str:
        """Content key of `settings`: the column `combine` checks."""
        return content_key(self.settings(), length=12)

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) if self.results_dir else RESULTS_ROOT / self.name

    @property
    def reuse_folder(self) -> Path | None:
        """The results folder of ``reuse_from`` (None without one): a path, or a study name under
        the results root."""
        if not self.reuse_from:
            return None
        path = Path(self.reuse_from)
        return path if path.is_absolute() or len(path.parts) > 1 else RESULTS_ROOT / self.reuse_from

    def units(self) -> list[tuple[str, str]]:
        """The grid: every (model, dataset) pair, model by model.

        Returns
        -------
        list of (str, str)
        """
        return [(model, dataset) for model in self.models for dataset in self.datasets]

    def unit_folder(self, model: str, dataset: str) -> Path:
        """Where a unit's tables go: ``<study folder>/units/<unit_name>``.

        Parameters
        ----------
        model, dataset : str

        Returns
        -------
        Path
        """
        return self.folder / "units" / unit_name(model, dataset)

    def dataset_file(self, dataset: str) -> DatasetFile | None:
        """The file behind ``dataset`` when it is one of the study's own, else None (a registry name)."""
        return next((entry for entry in self.dataset_files if entry.name == dataset), None)

    @property
    def file_test_size(self) -> float:
        """The test share of the seeded split of a data file without a split column."""
        if self.max_train is None or self.max_test is None:
            return 0.3
        return self.max_test / (self.max_train + self.max_test)


def dataset_identity(cfg: StudyConfig, dataset: str) -> Any:
    """What a stage key holds for ``dataset``: a registry name as it is; a file as its name,
    sha256 and columns (editing the file, or reading other columns, changes every key).

    Parameters
    ----------
    cfg : StudyConfig
    dataset : str
        A dataset name of the study.

    Returns
    -------
    str or dict
        The name itself for a registry dataset; for a file, a dict with keys name, sha256,
        text, label and split.
    """
    entry = cfg.dataset_file(dataset)
    if entry is None:
        return dataset
    return {"name": entry.name, "sha256": entry.sha256, "text": entry.text, "label": entry.label,
            "split": entry.split}


def load_unit_dataset(cfg: StudyConfig, dataset: str) -> tuple[Any, dict[str, Any]]:
    """The subsampled train/test splits of a unit's dataset and its provenance.

    A registry name goes through `ntps_nb.datasets.load_dataset`; a file through
    `ntps_nb.datasets.read_dataset_file`, refused when it changed since the config was read
    (its stage keys hold the sha256 read then).

    Parameters
    ----------
    cfg : StudyConfig
        Gives ``max_train``, ``max_test``, ``seed`` (and ``file_test_size`` for a file).
    dataset : str
        A dataset name of the study.

    Returns
    -------
    ds : DatasetDict
        The ``train`` and ``test`` splits, subsampled to at most ``max_train`` / ``max_test``.
    info : dict
        Provenance (`ntps_nb.datasets.dataset_info` for a registry name, the file's record with
        its name for a file; ``{"error": ...}`` when a registry provenance could not be read).

    Raises
    ------
    StudySettingsError
        When the dataset file's sha256 differs from the one read with the config.
    """
    from ntps_nb.datasets import SPLIT_SEED, dataset_info, load_dataset, read_dataset_file, subsample

    entry = cfg.dataset_file(dataset)
    if entry is None:
        ds = load_dataset(dataset, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed)
        try:
            info = dataset_info(dataset)
        except Exception as error:  # provenance only; never fail a unit for it
            info = {"error": repr(error)}
        return ds, info
    ds = read_dataset_file(entry.path, entry.text, entry.label, entry.split, test_size=cfg.file_test_size,
                           seed=SPLIT_SEED)
    info = {**json.loads(ds["train"].info.description), "name": entry.name}
    if info["source"]["sha256"] != entry.sha256:
        raise StudySettingsError(
            f"dataset {entry.name!r}: {entry.path} changed since {cfg.source or 'the config'} was read (sha256 "
            f"{info['source']['sha256'][:12]}, read as {entry.sha256[:12]}); load the config again")
    return subsample(ds, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed), info


def unit_name(model: str, dataset: str) -> str:
    """Folder name of a unit: ``<model>__<dataset>`` with path-unsafe characters replaced.

    Parameters
    ----------
    model, dataset : str

    Returns
    -------
    str
        Every character other than letters, digits, ``-``, ``_`` and ``.`` becomes ``-``.
    """
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "-" for c in s)  # noqa: E731
    return f"{safe(model)}__{safe(dataset)}"


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _json(value: Any) -> Any:
    """``value`` as its JSON round trip (tuples become lists): how settings are compared and keyed."""
    return json.loads(json.dumps(value, default=list))


#: Longest chain of ``extends`` (a config extending one that extends another ...).
MAX_EXTENDS = 8


def _read_toml(path: Path) -> dict[str, Any]:
    """A study TOML's tables; a file that is not TOML is a `StudySettingsError` that names it."""
    with open(path, "rb") as handle:
        try:
            return tomllib.load(handle)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise StudySettingsError(f"{path} is not a valid TOML file: {error}") from error


def _extended(table: dict[str, Any], path: Path, depth: int = 0) -> dict[str, Any]:
    """A ``[study]`` table with its ``extends`` resolved: the keys of the TOML it names (relative to
    ``path``'s folder) with this table's keys on top; ``extends`` itself is dropped. Relative paths
    among the inherited keys (results_dir, reuse_from) resolve against the config being loaded."""
    if "extends" not in table:
        return table
    if depth >= MAX_EXTENDS:
        raise StudySettingsError(f"{path}: more than {MAX_EXTENDS} configs extend one another (a cycle?)")
    base_path = (path.parent / str(table["extends"])).resolve()
    if not base_path.is_file():
        raise StudySettingsError(f"{path}: extends {table['extends']!r}, but there is no file {base_path}")
    base = _read_toml(base_path)
    if set(base) - {"study"}:
        raise StudySettingsError(f"{path}: extends {base_path}, which has tables besides [study] ({sorted(base)}); "
                                 "extend a config without [[datasets]]")
    rest = {key: value for key, value in table.items() if key != "extends"}
    return {**_extended(base.get("study", {}), base_path, depth + 1), **rest}


def load_config(path: str | os.PathLike, **overrides: Any) -> StudyConfig:
    """Read a study TOML (its ``[study]`` table) into a `StudyConfig`; ``overrides`` replace keys.

    Parameters
    ----------
    path : str or PathLike
        The TOML file.
    **overrides
        `StudyConfig` fields that replace the file's values.

    Returns
    -------
    StudyConfig

    Raises
    ------
    FileNotFoundError
        When there is no file at ``path``.
    StudySettingsError
        When the file has no ``[study]`` table or settings the study does not accept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study config at {path}")
    raw = _read_toml(path)
    if "study" not in raw:
        raise StudySettingsError(f"{path} has no [study] table (it has {sorted(raw)})")
    extra = sorted(set(raw) - {"study", "datasets"})
    if extra:
        raise StudySettingsError(f"{path}: unknown table(s) {extra}; a study has [study] and [[datasets]]")
    table = {**_extended(raw["study"], path), **overrides}
    known = {f.name for f in dataclasses.fields(StudyConfig)} - {"source", "dataset_files"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise StudySettingsError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    if "datasets" not in overrides:  # [[datasets]] tables join the [study] list (an override replaces both)
        table["datasets"] = list(table.get("datasets", [])) + list(raw.get("datasets", []))
    for key in ("name", "models", "datasets"):
        if key not in table:
            raise StudySettingsError(f"{path}: [study] needs {key!r}")
    if not table["models"] or not table["datasets"]:
        raise StudySettingsError(f"{path}: models and datasets must be non-empty lists")
    protocols = ["heldout", "paper_in_sample"]
    unknown_probes = sorted(set(table.get("probes", [])) - set(protocols))
    if unknown_probes:
        raise StudySettingsError(f"{path}: unknown probe protocol(s) {unknown_probes}; known: {protocols}")
    if table.get("precision", "float32") not in ("float32", "float64"):
        raise StudySettingsError(f"{path}: precision must be float32 or float64 (a study records one, not 'auto')")
    if table.get("interval_method", "basic") not in ("percentile", "basic", "bca"):
        raise StudySettingsError(f"{path}: interval_method must be percentile, basic or bca")
    check_estimator(table.get("estimator", "plugin"), str(path))
    if table.get("interval_estimator", "plugin") not in INTERVAL_ESTIMATORS:
        raise StudySettingsError(f"{path}: interval_estimator must be one of {', '.join(INTERVAL_ESTIMATORS)} "
                                 f"(the plug-in's bootstrap, or the study estimator's), "
                                 f"got {table.get('interval_estimator')!r}")
    from ntps_nb.core.rotation import INTERVALS

    if table.get("estimate_interval") is not None and table["estimate_interval"] not in INTERVALS:
        raise StudySettingsError(f"{path}: estimate_interval must be one of {', '.join(INTERVALS)} (the interval "
                                 f"of ntps_estimate), got {table.get('estimate_interval')!r}")
    if table.get("estimate_interval") == "quadratic" and table.get("estimator", "plugin") != "richardson":
        raise StudySettingsError(f"{path}: estimate_interval = 'quadratic' needs estimator = 'richardson' (the "
                                 f"interval is derived for it), got estimator = {table.get('estimator', 'plugin')!r}")
    for name, what in (("estimate_rotation_flag", "the flag's rotation condition"),
                       ("estimate_stationary_flag", "the flag's stationary condition"),
                       ("estimate_rotation_widening", "the reliable rows' interval widened over the rotation sets"),
                       ("estimate_stationary_widening", "the reliable rows' interval joined with NTPS at the angles "
                                                        "the data cannot separate from 0 or 1")):
        if not isinstance(table.get(name, False), bool):
            raise StudySettingsError(f"{path}: {name} must be true or false ({what}), got {table.get(name)!r}")
    level = table.get("estimate_widening_level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < level < 1.0):
        raise StudySettingsError(f"{path}: estimate_widening_level must be a number in (0, 1) (the level of the "
                                 f"rotation sets the widening joins with a reliable row's interval), got {level!r}")
    variants = table.get("interval_variants", INTERVAL_VARIANTS)
    if (not isinstance(variants, (list, tuple)) or not variants or not all(isinstance(v, str) for v in variants)
            or len(set(variants)) != len(variants)
            or not set(variants) <= set(INTERVAL_VARIANTS)):
        raise StudySettingsError(f"{path}: interval_variants must be a non-empty list of distinct variants of "
                                 f"{list(INTERVAL_VARIANTS)}, got {variants!r}")
    table["interval_variants"] = [name for name in INTERVAL_VARIANTS if name in variants]  # one order, one key
    threads = table.get("analysis_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise StudySettingsError(f"{path}: analysis_threads must be a positive integer or absent (this process's "
                                 f"share of its cores), got {threads!r}")
    _check_values(table, path)
    table = {key: _tuple(value) for key, value in table.items()}
    if table.get("results_dir") and not Path(table["results_dir"]).is_absolute():
        table["results_dir"] = str((path.parent / table["results_dir"]).resolve())
    reuse = Path(table["reuse_from"]) if table.get("reuse_from") else None
    if reuse is not None and len(reuse.parts) > 1 and not reuse.is_absolute():  # a path; a bare name is a study
        table["reuse_from"] = str((path.parent / reuse).resolve())
    table["models"] = tuple(_model_reference(model, path) for model in table["models"])
    specs = [_dataset_spec(entry, path) for entry in table["datasets"]]
    names = [spec if isinstance(spec, str) else spec["name"] for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StudySettingsError(f"{path}: dataset name(s) {repeated} appear more than once")
    table["datasets"] = tuple(names)
    cfg = StudyConfig(**table, source=str(path))
    files = tuple(_read_dataset_file(spec, cfg) for spec in specs if not isinstance(spec, str))
    return dataclasses.replace(cfg, dataset_files=files)


#: Settings that are counts: the smallest value each takes, and whether it may be absent (None: no limit).
_COUNTS = {"max_train": (1, True), "max_test": (1, True), "seed": (0, False), "max_length": (1, False),
           "batch_size": (1, False), "n_boot": (1, False), "n_perturb": (0, False), "n_permutations": (0, False),
           "torch_threads": (1, True)}
#: Settings that are true or false.
_SWITCHES = ("drop_bos", "peers", "diagnostics", "lora", "cache_extractions")
#: Settings that name hidden states (`resolve_layers`; whether a layer exists is known once the model is).
_LAYER_SPECS = ("layers", "probe_layers", "peer_layers", "interval_layers", "diagnostic_layers")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _layer_spec_problem(spec: Any) -> str | None:
    """Why ``spec`` is no layer spec `resolve_layers` reads, or None."""
    if spec in ("all", "last") or spec is None or spec is False or _is_int(spec):
        return None
    if isinstance(spec, str):
        count = spec[len("grid:"):] if spec.startswith("grid:") else ""
        return None if count.isdigit() and int(count) >= 1 else "a string must be 'all', 'last' or 'grid:N' (N >= 1)"
    if isinstance(spec, (list, tuple)):
        return None if all(_is_int(layer) for layer in spec) else "a list must hold hidden-state indices (integers)"
    return "it must be 'all', 'last', 'grid:N', a hidden-state index or a list of them"


def _check_values(table: dict[str, Any], path: Path) -> None:
    """The settings' types and ranges, checked when the config is read rather than when a unit meets them."""
    name = table["name"]
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise StudySettingsError(f"{path}: name must be a folder name (the results go to data/results/<name>), "
                                 f"got {name!r}")
    for key, (minimum, optional) in _COUNTS.items():
        value = table.get(key)
        if key in table and not ((optional and value is None) or (_is_int(value) and value >= minimum)):
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise StudySettingsError(f"{path}: {key} must be {what}{' or absent' if optional else ''}, got {value!r}")
    shards = table.get("shards")
    if "shards" in table and not (shards is None or (_is_int(shards) and (shards == 0 or shards >= 2))):
        raise StudySettingsError(f"{path}: shards must be 0 (no intervals) or an integer >= 2 (groups of train texts "
                                 f"whose moments give the intervals), got {shards!r}")
    for key in _SWITCHES:
        if key in table and not isinstance(table[key], bool):
            raise StudySettingsError(f"{path}: {key} must be true or false, got {table[key]!r}")
    for key in _LAYER_SPECS:
        problem = _layer_spec_problem(table[key]) if key in table else None
        if problem:
            raise StudySettingsError(f"{path}: {key} = {table[key]!r}: {problem}")
    k = table.get("k", "all")
    if k != "all" and not (isinstance(k, (list, tuple)) and k and all(_is_int(v) and v >= 1 for v in k)):
        raise StudySettingsError(f"{path}: k must be 'all' or a non-empty list of integers >= 1, got {k!r}")
    ks = table.get("diagnostic_k", ())
    if not (isinstance(ks, (list, tuple)) and all(_is_int(v) and v >= 1 for v in ks)):
        raise StudySettingsError(f"{path}: diagnostic_k must be a list of integers >= 1, got {ks!r}")
    fractions = table.get("diagnostic_fractions", ())
    if not (isinstance(fractions, (list, tuple))
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions)):
        raise StudySettingsError(f"{path}: diagnostic_fractions must be a list of numbers in (0, 1], got {fractions!r}")


def check_estimator(estimator: Any, where: str = "the study config") -> str:
    """The study's ``estimator`` setting, or a `StudySettingsError` that lists the estimators.

    Parameters
    ----------
    estimator : Any
        The value of the setting.
    where : str
        What the setting comes from (the config file), for the message.

    Returns
    -------
    str
        ``estimator``, one of `ntps_nb.core.estimators.ESTIMATORS`.

    Raises
    ------
    StudySettingsError
        When it is not one of them.
    """
    from ntps_nb.core.estimators import ESTIMATORS

    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise StudySettingsError(f"{where}: estimator must be one of {', '.join(ESTIMATORS)} "
                                 f"(ntps_nb.core.estimators.ESTIMATORS), got {estimator!r}")
    return estimator


def with_estimator(frame: Any, table: str) -> Any:
    """A unit or study table with its ``estimator`` column: tables written before the study had
    the setting lack it (or, combined with newer ones, leave it empty) and were computed by the
    plug-in, so "plugin" is filled in there. Other tables are returned as they are.

    Parameters
    ----------
    frame : DataFrame
        The table.
    table : str
        Its name (`TABLES`); only those of `ESTIMATOR_TABLES` have the column.

    Returns
    -------
    DataFrame
        ``frame`` itself when nothing is missing, else a copy with ``estimator`` (placed after
        ``variant`` when it is new) holding "plugin" where it was missing.
    """
    if table not in ESTIMATOR_TABLES:
        return frame
    if "estimator" not in frame.columns:
        frame = frame.copy()
        at = list(frame.columns).index("variant") + 1 if "variant" in frame.columns else len(frame.columns)
        frame.insert(at, "estimator", "plugin")
    elif frame["estimator"].isna().any():
        frame = frame.assign(estimator=frame["estimator"].fillna("plugin"))
    return frame


def _model_reference(model: Any, path: Path) -> str:
    """A model of the config as `ntps_nb.models.load_model` takes it: a registry name, a folder
    (relative ones resolved against the TOML file's folder) or a Hub id; anything else is refused."""
    if not isinstance(model, str) or not model.strip():
        raise StudySettingsError(f"{path}: a model must be a non-empty string, got {model!r}")
    from ntps_nb.models import known_models

    suffix = ":random" if model.endswith(":random") else ""
    base = model[: len(model) - len(suffix)]
    if base in known_models():  # first, as load_model looks it up
        return model
    folder = Path(base).expanduser()
    folder = folder if folder.is_absolute() else path.parent / folder
    if folder.is_dir():
        return str(folder.resolve()) + suffix
    if HUB_ID.match(base):
        return model
    raise StudySettingsError(
        f"{path}: model {model!r} is neither a known name ({', '.join(known_models())}, each also with ':random'), "
        f"nor a folder (looked for {folder}), nor a Hugging Face id 'owner/name'")


def _dataset_spec(entry: Any, path: Path) -> str | dict[str, Any]:
    """A registry name as it is, or a ``[[datasets]]`` table checked and with its path resolved."""
    from ntps_nb.datasets import _lookup

    if isinstance(entry, str):
        try:
            _lookup(entry)
        except ValueError as error:
            raise StudySettingsError(f"{path}: {error}; or give your own file as a [[datasets]] table with name, "
                                     "path, text and label") from None
        return entry
    if not isinstance(entry, dict):
        raise StudySettingsError(f"{path}: a dataset is a registry name or a table, got {entry!r}")
    unknown = sorted(set(entry) - set(DATASET_FILE_KEYS))
    missing = [key for key in ("name", "path") if key not in entry]
    if unknown or missing:
        raise StudySettingsError(f"{path}: [[datasets]] table {entry!r}: unknown key(s) {unknown}, missing {missing} "
                                 f"(keys: {', '.join(DATASET_FILE_KEYS)}; name and path required)")
    name = entry["name"]
    try:
        _lookup(name)
    except ValueError:
        pass
    else:
        raise StudySettingsError(f"{path}: dataset name {name!r} of {entry['path']} is a registry dataset's; "
                                 "give your file another name")
    for key in ("name", "path", "text", "label", "split"):
        if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
            raise StudySettingsError(f"{path}: [[datasets]] {key} must be a non-empty string, got {entry[key]!r}")
    file = Path(entry["path"]).expanduser()
    return {"text": "text", "label": "label", "split": None, **entry,
            "path": str((file if file.is_absolute() else path.parent / file).resolve())}


def _read_dataset_file(spec: dict[str, Any], cfg: StudyConfig) -> DatasetFile:
    """Read a data file once (`ntps_nb.datasets.read_dataset_file`): its errors, with the
    config's name and the dataset's, are the config's; its sha256 is kept."""
    from ntps_nb.datasets import SPLIT_SEED, read_dataset_file

    try:
        ds = read_dataset_file(spec["path"], spec["text"], spec["label"], spec["split"],
                               test_size=cfg.file_test_size, seed=SPLIT_SEED)
    except (ValueError, FileNotFoundError) as error:
        raise StudySettingsError(f"{cfg.source}: dataset {spec['name']!r}: {error}") from error
    sha256 = json.loads(ds["train"].info.description)["source"]["sha256"]
    return DatasetFile(spec["name"], spec["path"], spec["text"], spec["label"], spec["split"], sha256)


def resolve_layers(spec: Any, available: Sequence[int], what: str = "layers") -> list[int]:
    """Hidden-state indices of a layer spec ("all", "last", "grid:N", or a list; negatives count from the end).

    Parameters
    ----------
    spec : str, int, list of int, or None
        "all", "last", "grid:N" (N evenly spaced layers, first and last included), one index or
        a list of them; None, False or () select none.
    available : sequence of int
        The hidden-state indices there are.
    what : str
        Setting name used in the error message.

    Returns
    -------
    list of int
        Sorted distinct indices (a negative index resolved against ``available``).

    Raises
    ------
    StudySettingsError
        When a listed layer is not available.
    """
    available = sorted(int(layer) for layer in available)
    if spec == "all":
        return available
    if spec == "last":
        return [available[-1]]
    if isinstance(spec, str) and spec.startswith("grid:"):  # N evenly spaced layers, first and last included
        count = int(spec[len("grid:"):])
        picks = np.unique(np.round(np.linspace(0, len(available) - 1, max(count, 1))).astype(int))
        return [available[i] for i in picks]
    if spec in (None, False) or spec == ():
        return []
    chosen = []
    for layer in (spec if isinstance(spec, (list, tuple)) else [spec]):
        layer = int(layer)
        resolved = available[layer] if layer < 0 else layer
        if resolved not in available:
            raise StudySettingsError(f"{what}: layer {layer} does not exist (hidden states {available[0]}..{available[-1]})")
        chosen.append(resolved)
    return sorted(set(chosen))


def _readable(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; results are meant to be shared."""
    path.chmod(0o755 if path.is_dir() else 0o644)
    if path.is_dir():
        for child in path.iterdir():
            child.chmod(0o644)



def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "pandas", "scikit-learn", "torch", "transformers", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out

