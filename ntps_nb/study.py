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

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ntps_nb.cache import atomic_path, content_key

#: The tables every unit writes (``lora`` only when LoRA ran).
TABLES = ("ntps", "probes", "peers", "intervals", "diagnostics")
#: Significant digits kept in the CSVs: enough for every comparison, small enough for git.
CSV_FLOAT_FORMAT = "%.7g"
#: Where results go unless a config says otherwise (relative to the repository root).
RESULTS_ROOT = Path(__file__).resolve().parents[1] / "data" / "results"
#: Bump when what a unit computes changes, so old units are not mistaken for current ones.
STUDY_VERSION = 1


def _say(message: str) -> None:
    print(message, flush=True)  # progress lines reach nohup logs as they happen


class StudySettingsError(ValueError):
    """A study config is malformed, or results computed with different settings would mix."""


# -- configuration -------------------------------------------------------------------------------


_ADDED_LATER = {"precision": "float32"}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid (models x datasets) and the settings every unit shares.

    Layer grids accept "all", "last", "grid:N" (N evenly spaced hidden states, the first and the
    last included) or a list of hidden-state indices (0 = embeddings; negative indices count from
    the end, -1 = the last hidden state). ``k`` is "all" (every k = 1..r_V
    of the theory variant) or a list of integers.
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
    probes: tuple[str, ...] = ("heldout", "paper_in_sample")
    probe_layers: Any = "all"
    peers: bool = True
    peer_layers: Any = "all"
    shards: int = 20
    interval_layers: Any = (-1,)
    n_boot: int = 200
    interval_method: str = "basic"
    diagnostics: bool = True
    diagnostic_layers: Any = (-1,)
    diagnostic_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    diagnostic_fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
    n_perturb: int = 5
    n_permutations: int = 20
    lora: bool = False
    lora_budget: dict = dataclasses.field(default_factory=dict)
    cache_extractions: bool = False  # shards: 4 float64 d x d per interval layer (10.6 MB SmolLM2, 13.1 Gemma-3)
    analysis_threads: int | None = 1  # BLAS threads of the numpy/scipy/sklearn part (None: library default)
    torch_threads: int | None = 1  # torch intra-op threads of the forward passes (None: torch's default)
    device: str = "cpu"  # where the models run ("cpu", "cuda", "cuda:1"); recorded per unit, not in the hash
    results_dir: str | None = None
    source: str | None = None  # the TOML file, for messages only

    def settings(self) -> dict[str, Any]:
        """Everything that changes a unit's numbers (not the grid, not where results go)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("name", "models", "datasets", "results_dir", "source", "cache_extractions",
                             "analysis_threads", "torch_threads", "device")}
        out["study_version"] = STUDY_VERSION
        # Keys added after units were committed enter the hash only away from the value those units
        # were computed with, so that adding the key did not make them stale. precision: every unit
        # before it was computed on a CPU with float32 products (the then default of "auto").
        for key, before in _ADDED_LATER.items():
            if out[key] == before:
                del out[key]
        return json.loads(json.dumps(out, default=list))

    @property
    def config_hash(self) -> str:
        """Content key of `settings`: the column `combine` checks."""
        return content_key(self.settings(), length=12)

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) if self.results_dir else RESULTS_ROOT / self.name

    def units(self) -> list[tuple[str, str]]:
        return [(model, dataset) for model in self.models for dataset in self.datasets]

    def unit_folder(self, model: str, dataset: str) -> Path:
        return self.folder / "units" / unit_name(model, dataset)


def unit_name(model: str, dataset: str) -> str:
    """Folder name of a unit: ``<model>__<dataset>`` with path-unsafe characters replaced."""
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "-" for c in s)  # noqa: E731
    return f"{safe(model)}__{safe(dataset)}"


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_config(path: str | os.PathLike, **overrides: Any) -> StudyConfig:
    """Read a study TOML (its ``[study]`` table) into a `StudyConfig`; ``overrides`` replace keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study config at {path}")
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    if "study" not in raw:
        raise StudySettingsError(f"{path} has no [study] table (it has {sorted(raw)})")
    table = {**raw["study"], **overrides}
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise StudySettingsError(f"{path}: unknown key(s) {unknown}; known: {sorted(known - {'source'})}")
    for key in ("name", "models", "datasets"):
        if key not in table:
            raise StudySettingsError(f"{path}: [study] needs {key!r}")
    if not table["models"] or not table["datasets"]:
        raise StudySettingsError(f"{path}: models and datasets must be non-empty lists")
    unknown_probes = sorted(set(table.get("probes", [])) - {"heldout", "paper_in_sample"})
    if unknown_probes:
        raise StudySettingsError(f"{path}: unknown probe protocol(s) {unknown_probes}")
    if table.get("precision", "float32") not in ("float32", "float64"):
        raise StudySettingsError(f"{path}: precision must be float32 or float64 (a study records one, not 'auto')")
    if table.get("interval_method", "basic") not in ("percentile", "basic", "bca"):
        raise StudySettingsError(f"{path}: interval_method must be percentile, basic or bca")
    table = {key: _tuple(value) for key, value in table.items()}
    if table.get("results_dir") and not Path(table["results_dir"]).is_absolute():
        table["results_dir"] = str((path.parent / table["results_dir"]).resolve())
    return StudyConfig(**table, source=str(path))


def resolve_layers(spec: Any, available: Sequence[int], what: str = "layers") -> list[int]:
    """Hidden-state indices of a layer spec ("all", "last", "grid:N", or a list; negatives count from the end)."""
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


# -- one unit ------------------------------------------------------------------------------------


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
    settings = dict(layers=layers, batch_size=cfg.batch_size, max_length=cfg.max_length, drop_bos=cfg.drop_bos,
                    precision=cfg.precision, pooled_layers=pooled, progress=False)
    if train:
        settings.update(shards=cfg.shards if shard_layers else None, shard_layers=shard_layers or None,
                        shard_seed=cfg.seed, token_moments=True)
    else:  # the test split only feeds the held-out probes: pooled features suffice
        settings.update(token_moments=False)
    return settings


def run_unit(cfg: StudyConfig, model_name: str, dataset_name: str, loaded: tuple | None = None,
             *, cache: str | os.PathLike | None = None, log: Callable[[str], None] = _say) -> dict[str, pd.DataFrame]:
    """Compute every table of one (model, dataset) unit; returns {table: frame, "unit": meta frame}.

    ``loaded`` is ``(model, tokenizer, info)`` from `ntps_nb.models.load_model` (loaded here if None).
    ``cache``: an extraction cache folder (`ntps_nb.extract.extract_cached`); None caches only when
    the config sets ``cache_extractions`` (the default cache folder then).
    """
    from ntps_nb.datasets import dataset_info, load_dataset
    from ntps_nb import extract as extraction
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

    if loaded is None:
        from ntps_nb.models import load_model

        loaded = load_model(model_name, seed=cfg.seed, device=cfg.device)
    model, tok, info = loaded
    lap("load_model")
    ds = load_dataset(dataset_name, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed)
    train, test = as_text_set(ds["train"]), as_text_set(ds["test"])
    try:
        dinfo = dataset_info(dataset_name)
    except Exception as error:  # provenance only; never fail a unit for it
        dinfo = {"error": repr(error)}
    lap("load_dataset")

    available = list(range(info.n_hidden_states))
    layers = resolve_layers(cfg.layers, available, "layers")
    probe_grid = resolve_layers(cfg.probe_layers, layers, "probe_layers") if cfg.probes else []
    peer_grid = resolve_layers(cfg.peer_layers, layers, "peer_layers") if cfg.peers else []
    interval_grid = resolve_layers(cfg.interval_layers, layers, "interval_layers") if cfg.shards else []
    diag_grid = resolve_layers(cfg.diagnostic_layers, layers, "diagnostic_layers") if cfg.diagnostics else []
    pooled = sorted(set(probe_grid) | set(peer_grid) | set(diag_grid))

    def run_extraction(data, settings):
        if cache is None and not cfg.cache_extractions:
            metadata = {"model": info.as_dict(), "dataset": dinfo}
            return extraction.extract(model, tok, data, **settings, metadata=metadata)
        return extraction.extract_cached(model, tok, info, data, cache=cache, dataset_info=dinfo, **settings)

    ex = run_extraction(train, _extraction_settings(cfg, layers, train=True, pooled=pooled, shard_layers=interval_grid))
    lap("extract_train")
    heldout = "heldout" in cfg.probes and bool(probe_grid)
    ex_test = (run_extraction(test, _extraction_settings(cfg, probe_grid, train=False, pooled=probe_grid, shard_layers=[]))
               if heldout else None)
    lap("extract_test")

    with _blas_threads(cfg.analysis_threads):
        return _analyse_unit(cfg, model_name, dataset_name, loaded, ds, train, test, ex, ex_test, layers, probe_grid,
                             peer_grid, interval_grid, diag_grid, timings, lap, log)


@contextlib.contextmanager
def _blas_threads(n: int | None):
    """Cap BLAS threads for the eigensolves: on a shared 2-core machine, 2 spinning BLAS threads per
    process made the NTPS sweeps ~15x slower than one thread (measured: 40 s vs 2.2 s, d=576)."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def _analyse_unit(cfg, model_name, dataset_name, loaded, ds, train, test, ex, ex_test, layers, probe_grid, peer_grid,
                  interval_grid, diag_grid, timings, lap, log) -> dict[str, Any]:
    """Every table of a unit from its extractions (the numpy/scipy/sklearn part, and LoRA)."""
    from ntps_nb import __version__
    from ntps_nb.core.diagnostics import ntps_diagnostics
    from ntps_nb.core.intervals import layer_shards, ntps_interval_sweep
    from ntps_nb.core.peers import pca_overlap_sweep, peer_scores
    from ntps_nb.core.probes import probe_layers
    from ntps_nb.core.score import ntps_sweep

    model, tok, info = loaded
    provenance = {
        "study": cfg.name, "model": model_name, "pretrained": bool(info.pretrained), "quantized": bool(info.quantized),
        "dataset": dataset_name, "n_train": len(train.texts), "n_test": len(test.texts), "n_classes": train.n_classes,
        "max_length": cfg.max_length, "drop_bos": cfg.drop_bos, "seed": cfg.seed, "package_version": __version__,
        "config_hash": cfg.config_hash,
    }
    tables: dict[str, pd.DataFrame] = {}

    rows = []
    for layer in layers:
        m = ex.moments[layer]
        theory = _k_filter(ntps_sweep(m, variant="theory"), cfg.k)
        reference = ntps_sweep(m, variant="reference")
        rows += [theory.assign(layer=layer), reference.assign(layer=layer)]
        if layer in peer_grid and m.Shh is not None:
            rows.append(_k_filter(pca_overlap_sweep(m), cfg.k).assign(layer=layer))
    tables["ntps"] = _with_provenance(pd.concat(rows, ignore_index=True), provenance)
    lap("ntps")

    if probe_grid:
        features = {layer: (ex.pooled[layer], ex_test.pooled[layer] if ex_test is not None else None)
                    for layer in probe_grid}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # saga's ConvergenceWarning under the paper's max_iter is expected
            probes = probe_layers(features, ex.labels, ex_test.labels if ex_test is not None else None,
                                  n_classes=train.n_classes, protocol=list(cfg.probes), seed=cfg.seed)
        tables["probes"] = _with_provenance(probes, provenance)
    lap("probes")

    if peer_grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peers = pd.DataFrame([peer_scores(ex.pooled[layer], ex.labels, layer=layer) for layer in peer_grid])
        tables["peers"] = _with_provenance(peers, provenance)
    lap("peers")

    if interval_grid:
        shards = layer_shards(ex.shards)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for layer in interval_grid:
                for variant in ("theory", "reference"):
                    sweep = ntps_interval_sweep(shards[layer], variant=variant, n_boot=cfg.n_boot, seed=cfg.seed,
                                                method=cfg.interval_method)
                    if variant == "theory":
                        sweep = _k_filter(sweep, cfg.k)
                    rows.append(sweep.assign(layer=layer))
        tables["intervals"] = _with_provenance(pd.concat(rows, ignore_index=True), provenance)
    lap("intervals")

    if diag_grid:
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for layer in diag_grid:
                r_V = int(ntps_sweep(ex.moments[layer])["r_V"].iloc[0])
                ks = [k for k in cfg.diagnostic_k if k <= r_V] or [1]
                for variant, grid in (("theory", dict(k=ks)), ("reference", dict(fraction=list(cfg.diagnostic_fractions)))):
                    rows.append(ntps_diagnostics(ex.moments[layer], ex.pooled[layer], ex.labels, variant=variant,
                                                 n_perturb=cfg.n_perturb, n_permutations=cfg.n_permutations,
                                                 seed=cfg.seed, layer=layer, **grid))
        tables["diagnostics"] = _with_provenance(pd.concat(rows, ignore_index=True), provenance)
    lap("diagnostics")

    lora_status = "not configured"
    if cfg.lora:
        lora_status, lora_table = _run_lora(cfg, (model, tok, info), ds, log, ex, ex_test)
        if lora_table is not None:
            tables["lora"] = _with_provenance(lora_table, provenance)
    lap("lora")

    meta = {
        **provenance, "complete": True, "settings": cfg.settings(), "timings_s": timings,
        "seconds": round(sum(timings.values()), 3), "lora": lora_status,
        "extraction_key": ex.metadata.get("cache_key"), "extraction_seconds": ex.metadata.get("seconds"),
        "layers": layers, "probe_layers": probe_grid, "peer_layers": peer_grid, "interval_layers": interval_grid,
        "diagnostic_layers": diag_grid, "model_info": info.as_dict(), "environment": _environment(model, cfg),
        "n_truncated_train": ex.metadata.get("n_truncated"), "mean_length_train": ex.metadata.get("mean_length"),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tables["unit"] = meta  # type: ignore[assignment]
    return tables


def _run_lora(cfg: StudyConfig, loaded: tuple, ds, log, ex=None, ex_test=None) -> tuple[str, pd.DataFrame | None]:
    """LoRA of one unit with `ntps_nb.lora` (imported lazily): the gain over the held-out probe and
    NTPS of the last layer before and after merging, as rows; or the reason it was skipped.

    The base model's side (pooled features for the probe, moments for NTPS before) comes from the
    unit's own extractions ``ex`` / ``ex_test`` where they hold the last layer, so only the merged
    model is extracted again (on long texts that saves ~40 minutes of CPU per unit)."""
    model, tok, info = loaded
    if not info.pretrained:
        return "skipped: LoRA runs on pretrained models only (the random controls are not fine-tuned)", None
    try:
        import importlib

        lora = importlib.import_module("ntps_nb.lora")
    except ModuleNotFoundError as error:
        if error.name not in ("ntps_nb.lora", "peft"):
            raise
        return f"skipped: {error.name} is not available", None
    budget = dict(cfg.lora_budget)
    result = lora.finetune_lora(loaded, ds["train"], ds["test"], max_length=cfg.max_length, drop_bos=cfg.drop_bos,
                                seed=cfg.seed, progress=False, **budget)
    last = info.n_hidden_states - 1
    base_features = None
    if ex is not None and ex_test is not None and ex.pooled and ex_test.pooled and last in ex.pooled and last in ex_test.pooled:
        base_features = (ex.pooled[last], ex_test.pooled[last])
    before = ex.moments if ex is not None and last in ex.moments else None
    gain = lora.lora_gain(result, ds["train"], ds["test"], base=loaded, progress=False, seed=cfg.seed,
                          precision=cfg.precision, base_features=base_features)
    ks = [k for k in (cfg.k if cfg.k != "all" else (1, 2, 4, 8, 16, 32, 64)) if k <= 64]
    before_after = lora.ntps_before_after(result, ds["train"], k=ks, base=loaded, layers=[last],
                                          batch_size=cfg.batch_size, precision=cfg.precision, before=before,
                                          progress=False)
    gain_row = {key: value for key, value in gain.items() if np.isscalar(value) or value is None}
    table = before_after.drop(columns=[c for c in ("model", "max_length", "drop_bos") if c in before_after.columns])
    table = table.assign(**{f"lora_{key}": value for key, value in gain_row.items()
                            if key not in ("model", "max_length", "drop_bos", "n_classes", "seed")})
    log(f"    LoRA: accuracy {gain.get('lora_accuracy', float('nan')):.3f}, gain {gain.get('gain', float('nan')):+.3f}")
    return "done", table


def write_unit(folder: Path, tables: dict[str, Any]) -> Path:
    """Write a unit's tables and ``unit.json`` atomically: the folder appears complete or not at all."""
    with atomic_path(folder, directory=True) as tmp:
        for name, frame in tables.items():
            if name == "unit":
                continue
            frame.to_csv(tmp / f"{name}.csv", index=False, float_format=CSV_FLOAT_FORMAT)
        (tmp / "unit.json").write_text(json.dumps(tables["unit"], indent=1, sort_keys=True, default=str))
        _readable(tmp)
    return folder


def _readable(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; results are meant to be shared."""
    path.chmod(0o755 if path.is_dir() else 0o644)
    if path.is_dir():
        for child in path.iterdir():
            child.chmod(0o644)


class UnitClaim:
    """A unit a process is computing: ``units/.<unit>.claim`` (created exclusively) holds its
    host, pid and start time, so several processes started on the same study share the grid
    without computing a unit twice. A claim whose process is gone (same host, pid not alive) is
    stale and taken over; a claim from another host is respected (remove the file by hand if that
    machine is gone)."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def take(cls, cfg: StudyConfig, model: str, dataset: str) -> "UnitClaim | None":
        """The claim, or None when another live process holds it."""
        path = cfg.folder / "units" / f".{unit_name(model, dataset)}.claim"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"host": platform.node(), "pid": os.getpid(),
                             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not cls._stale(path):
                    return None
                path.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
            return cls(path)
        return None

    @classmethod
    def holder(cls, cfg: StudyConfig, model: str, dataset: str) -> dict | None:
        """The live claim's record (host, pid, started) of a unit, or None."""
        path = cfg.folder / "units" / f".{unit_name(model, dataset)}.claim"
        if not path.is_file() or cls._stale(path):
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):  # being written right now, or unreadable: leave it
            return False
        if holder.get("host") != platform.node():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def unit_status(cfg: StudyConfig, model: str, dataset: str) -> str:
    """"complete" (same settings), "stale" (complete, other settings) or "missing"."""
    meta_path = cfg.unit_folder(model, dataset) / "unit.json"
    if not meta_path.is_file():
        return "missing"
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        return "missing"
    return "complete" if meta.get("config_hash") == cfg.config_hash else "stale"


def study_status(cfg: StudyConfig | str | os.PathLike, *, k: int = 8) -> pd.DataFrame:
    """One row per unit of the grid, read from the unit folders (nothing combined or computed).

    Columns: model, dataset, status ("complete", "stale", "running" (claimed by a live process),
    "missing"), minutes, finished (or, while running, who started it when), n_train,
    mean_length (tokens), and for complete units the headline numbers at the last layer: held-out
    probe accuracy, theory NTPS at ``k`` (or the largest k of the grid below it), and the LoRA
    accuracy and gain where LoRA ran.
    """
    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    rows = []
    for model, dataset in cfg.units():
        folder = cfg.unit_folder(model, dataset)
        row: dict[str, Any] = {"model": model, "dataset": dataset, "status": unit_status(cfg, model, dataset)}
        claim = UnitClaim.holder(cfg, model, dataset)
        if row["status"] == "missing" and claim is not None:
            row["status"] = "running"
            row["finished"] = f"started {claim.get('started')} (pid {claim.get('pid')} on {claim.get('host')})"
        if row["status"] not in ("missing", "running"):
            meta = json.loads((folder / "unit.json").read_text())
            row.update(minutes=round(meta.get("seconds", float("nan")) / 60, 1), finished=meta.get("finished"),
                       n_train=meta.get("n_train"), mean_length=meta.get("mean_length_train"))
        if row["status"] == "complete":
            probes = pd.read_csv(folder / "probes.csv")
            held = probes[probes["protocol"] == "heldout"]
            last = held["layer"].max()
            row["heldout_accuracy"] = float(held.loc[held["layer"] == last, "accuracy"].iloc[0])
            scores = pd.read_csv(folder / "ntps.csv")
            theory = scores[(scores["variant"] == "theory") & (scores["layer"] == scores["layer"].max())]
            below = theory[theory["k"] <= k]
            if len(below):
                chosen = below.loc[below["k"].idxmax()]
                row[f"ntps_theory_k{k}"] = float(chosen["ntps"])
            lora_path = folder / "lora.csv"
            if lora_path.is_file():
                lora = pd.read_csv(lora_path)
                row["lora_accuracy"] = float(lora["lora_lora_accuracy"].iloc[0])
                row["lora_gain"] = float(lora["lora_gain"].iloc[0])
        rows.append(row)
    table = pd.DataFrame(rows)
    if "n_train" in table:
        table["n_train"] = table["n_train"].astype("Int64")
    return table


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_study(cfg: StudyConfig | str | os.PathLike, *, units_limit: int | None = None, replace_stale: bool = False,
              models: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
              cache: str | os.PathLike | None = None, log: Callable[[str], None] = _say) -> pd.DataFrame:
    """Run every missing unit of a study (model by model, loading each model once), then `combine`.

    A unit already complete with the same settings is skipped; one complete with other settings
    is an error unless ``replace_stale``. ``units_limit`` caps the units computed in this call;
    ``models`` / ``datasets`` restrict it to part of the grid. The study tables are combined when
    every unit is complete.
    Several processes may run the same study at once: each claims a unit before computing it
    (`UnitClaim`) and passes over units another live process holds (status "elsewhere").
    Returns one row per unit: model, dataset, status ("skipped", "done", "elsewhere"), seconds.
    """
    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    units = cfg.units()
    for given, known, what in ((models, cfg.models, "model"), (datasets, cfg.datasets, "dataset")):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise StudySettingsError(f"{what}(s) {unknown} are not in study {cfg.name!r} (it has {list(known)})")
    restricted = models is not None or datasets is not None
    units = [(m, d) for (m, d) in units if (models is None or m in models) and (datasets is None or d in datasets)]
    status = {unit: unit_status(cfg, *unit) for unit in units}
    stale = [unit_name(*u) for u, s in status.items() if s == "stale"]
    if stale and not replace_stale:
        raise StudySettingsError(
            f"{len(stale)} unit(s) of study {cfg.name!r} were computed with other settings ({stale[:4]}...); "
            f"the config hash is now {cfg.config_hash}. Rerun with --replace-stale to recompute them, or give the "
            "study a new name")
    todo = [u for u in units if status[u] != "complete"]
    if todo:
        _check_device(cfg.device)
    if cfg.torch_threads is not None and todo:
        import torch

        # On a shared 2-core machine two spinning OpenMP threads per process made a 40-text
        # extraction ~7x slower than one thread (227 s vs 31 s, SmolLM2, measured here).
        torch.set_num_threads(int(cfg.torch_threads))
    if units_limit is not None:
        todo = todo[:max(0, int(units_limit))]
    log(f"study {cfg.name}: {len(units)} units, {len(units) - sum(s != 'complete' for s in status.values())} complete, "
        f"{len(todo)} to run now -> {cfg.folder}")
    rows = [{"model": m, "dataset": d, "status": "skipped", "seconds": 0.0} for (m, d) in units
            if status[(m, d)] == "complete"]
    done_before = len(rows)
    loaded_name, loaded = None, None
    started = time.perf_counter()
    computed = 0
    for i, (model_name, dataset_name) in enumerate(todo, start=1):
        claim = UnitClaim.take(cfg, model_name, dataset_name)
        if claim is None or unit_status(cfg, model_name, dataset_name) == "complete":
            if claim is not None:  # finished by another process since this one looked
                claim.release()
            log(f"    {model_name} x {dataset_name}: {'complete' if claim else 'being computed by another process'}, "
                "skipped")
            rows.append({"model": model_name, "dataset": dataset_name, "status": "elsewhere", "seconds": 0.0})
            continue
        try:
            if loaded_name != model_name:
                from ntps_nb.models import load_model

                loaded, loaded_name = None, None  # free the previous model first
                loaded, loaded_name = load_model(model_name, seed=cfg.seed, device=cfg.device), model_name
            t0 = time.perf_counter()
            tables = run_unit(cfg, model_name, dataset_name, loaded, cache=cache, log=log)
            write_unit(cfg.unit_folder(model_name, dataset_name), tables)
        finally:
            claim.release()
        seconds = time.perf_counter() - t0
        computed += 1
        rows.append({"model": model_name, "dataset": dataset_name, "status": "done", "seconds": round(seconds, 2)})
        elapsed = time.perf_counter() - started
        eta = elapsed / computed * (len(todo) - i)
        log(f"[{done_before + i}/{len(units)}] {model_name} x {dataset_name}: {_fmt_seconds(seconds)} "
            f"(elapsed {_fmt_seconds(elapsed)}, eta {_fmt_seconds(eta)})")
    missing = [unit_name(*u) for u in cfg.units() if unit_status(cfg, *u) != "complete"]
    if not missing:
        combine(cfg, log=log)
    elif not restricted and units_limit is None:
        log(f"{len(missing)} unit(s) still missing or running in another process ({missing[:4]}...): "
            "the study tables are combined when the last one lands")
    return pd.DataFrame(rows)


# -- combine -------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "pandas", "scikit-learn", "torch", "transformers", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _check_device(device: str) -> None:
    """Refuse a device torch cannot use before any unit is claimed (not halfway through a model load)."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as error:
        raise StudySettingsError(f"device {device!r} is not a torch device ({error})") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise StudySettingsError(f"device {device!r} asked for, but torch sees no CUDA GPU here "
                                     f"(torch {torch.__version__}); run without --device to use the CPU")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise StudySettingsError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")


def _environment(model, cfg: StudyConfig) -> dict[str, Any]:
    """Where and with what a unit was computed (its ``unit.json``): the device the model ran on (with
    the GPU's name), the host, the threads and the package versions; none of it enters the hash."""
    import torch

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "host": platform.node(),
            "torch_threads": torch.get_num_threads(), "analysis_threads": cfg.analysis_threads, **_versions()}


def _read_units(cfg: StudyConfig) -> tuple[list[tuple[Path, dict]], dict[str, pd.DataFrame]]:
    """The complete units of a study and their tables concatenated; raises StudySettingsError when
    they (or their rows) carry different config hashes, or another hash than the config's."""
    units_dir = cfg.folder / "units"
    metas = []
    for model, dataset in cfg.units():
        path = cfg.unit_folder(model, dataset) / "unit.json"
        if path.is_file():
            metas.append((cfg.unit_folder(model, dataset), json.loads(path.read_text())))
    if not metas:
        raise FileNotFoundError(f"study {cfg.name!r} has no complete unit under {units_dir}")
    tables: dict[str, pd.DataFrame] = {}
    for name in (*TABLES, "lora"):
        parts = [pd.read_csv(folder / f"{name}.csv") for folder, _ in metas if (folder / f"{name}.csv").is_file()]
        if parts:
            tables[name] = pd.concat(parts, ignore_index=True)
    hashes = {meta.get("config_hash") for _, meta in metas}
    for name, frame in tables.items():
        hashes |= set(frame["config_hash"].astype(str).unique())
    if len(hashes) > 1:
        by_hash: dict[str, list[str]] = {}
        for folder, meta in metas:
            by_hash.setdefault(str(meta.get("config_hash")), []).append(folder.name)
        raise StudySettingsError(
            f"study {cfg.name!r} mixes results computed with different settings (config hashes {sorted(map(str, hashes))}; "
            f"units by hash: {by_hash}); the config now hashes to {cfg.config_hash}. Recompute the stale units "
            "(study run --replace-stale) instead of combining them")
    if hashes != {cfg.config_hash}:
        raise StudySettingsError(f"study {cfg.name!r}: its units were computed with config hash {hashes.pop()}, "
                                 f"but {cfg.source or 'the config'} now hashes to {cfg.config_hash}")
    return metas, tables


def load_units(cfg: StudyConfig | str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The tables of a study's complete units, concatenated in memory (nothing is written): an
    interim look at a study still running. Same settings checks as `combine`."""
    return _read_units(cfg if isinstance(cfg, StudyConfig) else load_config(cfg))[1]


def combine(cfg: StudyConfig | str | os.PathLike, *, log: Callable[[str], None] = _say) -> dict[str, pd.DataFrame]:
    """Concatenate the complete units of a study into ``<study>/<table>.csv`` and ``provenance.json``.

    Raises StudySettingsError when the units (or rows) carry different config hashes: rows
    computed with different settings never share a table.
    """
    from ntps_nb import __version__

    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    metas, tables = _read_units(cfg)
    for name, frame in tables.items():
        with atomic_path(cfg.folder / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT)
            _readable(tmp)
    provenance = {
        "study": cfg.name, "config": cfg.source, "config_hash": cfg.config_hash, "settings": cfg.settings(),
        "models": list(cfg.models), "datasets": list(cfg.datasets), "package_version": __version__,
        "units_complete": len(metas), "units_total": len(cfg.units()),
        "combined": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "versions": _versions(),
        "units": {folder.name: {"seconds": meta.get("seconds"), "timings_s": meta.get("timings_s"),
                                "finished": meta.get("finished"), "lora": meta.get("lora"),
                                "n_train": meta.get("n_train"), "n_test": meta.get("n_test")}
                  for folder, meta in metas},
    }
    with atomic_path(cfg.folder / "provenance.json") as tmp:
        tmp.write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str))
        _readable(tmp)
    log(f"combined {len(metas)}/{len(cfg.units())} units of {cfg.name!r} into {cfg.folder}")
    return tables


def load_results(cfg_or_folder: StudyConfig | str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The combined tables of a study: a config (TOML path or `StudyConfig`) or a results folder."""
    if isinstance(cfg_or_folder, StudyConfig):
        folder = cfg_or_folder.folder
    else:
        path = Path(cfg_or_folder)
        folder = load_config(path).folder if path.suffix == ".toml" else path
    tables = {name: pd.read_csv(folder / f"{name}.csv") for name in (*TABLES, "lora") if (folder / f"{name}.csv").is_file()}
    if not tables:
        raise FileNotFoundError(f"no combined tables in {folder}; run `study combine` first")
    return tables


# -- analysis ------------------------------------------------------------------------------------

#: (target column of the probe table, the direction a good score correlates with it)
TARGETS = {"accuracy": "positive", "kappa": "positive", "mse": "negative"}


def probe_targets(probes: pd.DataFrame, *, protocol: str = "heldout", layer: str | int = "last") -> pd.DataFrame:
    """One target row per (model, dataset): the probe at the model's last layer (or a given layer)."""
    table = probes[probes["protocol"] == protocol]
    if table.empty:
        raise ValueError(f"no probe rows of protocol {protocol!r}")
    if layer == "last":
        last = table.groupby("model")["layer"].transform("max")
        table = table[table["layer"] == last]
    else:
        table = table[table["layer"] == int(layer)]
    return table[["model", "dataset", "n_classes", "majority_rate", *TARGETS, "layer"]].rename(
        columns={"layer": "target_layer"}).reset_index(drop=True)


def _config_text(values) -> str:
    """"layer/k" with integers printed as integers (CSV round trips turn k into floats)."""
    out = []
    for value in values:
        value = float(value)
        out.append(str(int(value)) if value.is_integer() else f"{value:g}")
    return "/".join(out)


def _ci(x, y, method: str, n_boot: int, seed: int) -> tuple[float, float]:
    from ntps_nb.core.stats import bootstrap_ci

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = bootstrap_ci(x, y, method=method, n_boot=n_boot, seed=seed)
    return ci["low"], ci["high"]


def _lodo_null_p(frame, observed: float, *, score, target, configs, method, direction, n_perm, seed) -> float:
    """Permutation p-value of the leave-one-dataset-out rho: shuffle targets across datasets and
    redo the whole leave-one-out selection (so the selection is inside the null)."""
    from ntps_nb.core.stats import select_leave_one_dataset_out

    import itertools
    import math

    if not np.isfinite(observed):
        return float("nan")
    per_dataset = frame.groupby("dataset")[target].first()
    values = per_dataset.to_numpy()
    exact = math.factorial(values.size) <= n_perm
    if exact:  # few datasets: every ordering (the identity among them), an exact p-value
        orderings = [values[list(p)] for p in itertools.permutations(range(values.size))]
    else:
        rng = np.random.default_rng(seed)
        orderings = [rng.permutation(values) for _ in range(n_perm)]
    sign = 1.0 if direction == "positive" else -1.0
    hits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ordering in orderings:
            shuffled = dict(zip(per_dataset.index, ordering))
            permuted = frame.assign(**{target: frame["dataset"].map(shuffled)})
            try:
                rho = select_leave_one_dataset_out(permuted, score=score, target=target, configs=configs,
                                                   method=method, direction=direction)["rho"]
            except ValueError:  # a fold whose other datasets have a constant target: no selection possible
                rho = float("nan")
            hits += bool(np.isfinite(rho) and sign * rho >= sign * observed - 1e-12)
    return hits / len(orderings) if exact else (1 + hits) / (1 + len(orderings))


def _selection_rows(frame: pd.DataFrame, base: dict, *, target: str, name: str, cfg_cols: list[str], direction: str,
                    method: str, n_boot: int, n_perm: int, seed: int) -> list[dict]:
    """The rows of one score against one target: leave-one-dataset-out selection (needs 4
    datasets) with its bootstrap CI and selection-redone permutation p-value, and the paper's
    in-sample selection with the selection-aware p-value of `ntps_nb.core.stats.selection_null`.
    ``frame`` has columns dataset, ``cfg_cols``, ``ntps`` and ``target``."""
    from ntps_nb.core.stats import select_in_sample, select_leave_one_dataset_out, selection_null

    rows = []
    n = frame["dataset"].nunique()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n >= 4:
            lodo = select_leave_one_dataset_out(frame, score="ntps", target=target, configs=cfg_cols,
                                                method=method, direction=direction)
            chosen = lodo["chosen"]
            low, high = (_ci(chosen["held_out_score"], chosen["target"], method, n_boot, seed)
                         if np.isfinite(lodo["rho"]) else (np.nan, np.nan))
            p = _lodo_null_p(frame, lodo["rho"], score="ntps", target=target, configs=cfg_cols,
                             method=method, direction=direction, n_perm=n_perm, seed=seed)
            configs = chosen[cfg_cols].apply(_config_text, axis=1)
            rows.append({**base, "target": target, "score": name, "selection": "leave_one_dataset_out",
                         "rho": lodo["rho"], "ci_low": low, "ci_high": high, "p_value": p,
                         "p_kind": "permutation, selection redone", "config": ", ".join(configs.mode()[:1]),
                         "n_distinct_configs": lodo["n_distinct_configs"],
                         "n_configs": len(frame.drop_duplicates(cfg_cols))})
        best = select_in_sample(frame, score="ntps", target=target, configs=cfg_cols, method=method,
                                direction=direction)
        null = selection_null(frame, score="ntps", target=target, configs=cfg_cols, method=method,
                              direction=direction, n_perm=max(n_perm, 1000), seed=seed)
        chosen_rows = frame.merge(pd.DataFrame([best["config"]]), on=cfg_cols).sort_values("dataset")
        low, high = _ci(chosen_rows["ntps"], chosen_rows[target], method, n_boot, seed)
    rows.append({**base, "target": target, "score": name, "selection": "in_sample", "rho": best["rho"],
                 "ci_low": low, "ci_high": high, "p_value": null["pvalue"],
                 "p_kind": "selection_null (max over configs)",
                 "config": _config_text(best["config"].values()),
                 "n_configs": best["n_configs"], "null_q95": null["null_q95"]})
    return rows


def _baseline_rows(baselines: dict[str, Any], y: np.ndarray, base: dict, *, target: str, method: str, n_boot: int,
                   seed: int) -> list[dict]:
    """rho of each dataset-level baseline (no selection) with the target, CI and permutation p."""
    rows = []
    for name, values in baselines.items():
        rows.append({**base, "target": target, "score": name, "selection": "none",
                     **_rho_ci_p(np.asarray(values, dtype=float), y, method, n_boot, 10_000, seed),
                     "p_kind": "permutation", "config": "last layer" if name.startswith("peer:") else "dataset only"})
    return rows


def correlation_summary(
    tables: dict[str, pd.DataFrame], *, method: str = "spearman", protocol: str = "heldout",
    n_boot: int = 1000, n_perm: int = 200, seed: int = 0, targets: Sequence[str] = (*TARGETS, "lora_gain"),
    variants: Sequence[str] = ("theory", "reference"),
) -> pd.DataFrame:
    """Per model and target: how NTPS ranks the datasets, under honest and in-sample selection,
    beside the dataset-only baselines and the random-initialised control.

    One row per (model, target, score, selection):

    - score ``ntps_theory`` / ``ntps_reference``, selection ``leave_one_dataset_out``: the
      configuration (layer, k or fraction) chosen on the other datasets, rho of the held-out
      scores with the targets, a bootstrap CI over datasets (given the chosen configurations) and
      a permutation p-value that redoes the selection under shuffled targets;
    - same scores, selection ``in_sample`` (the paper's): the best configuration over all
      datasets, rho, and the selection-aware p-value of `ntps_nb.core.stats.selection_null`;
    - scores ``-C`` and ``majority_rate`` (no selection): dataset-only baselines (SPEC section 10);
    - peers at the last layer (no selection), when the peers table is present.

    Target ``lora_gain`` (when the tables hold a ``lora`` table): the gain of LoRA over the
    held-out probe against the theory NTPS *before* LoRA at the layer LoRA was scored at, k
    selected as above with direction "negative" (the paper: lower NTPS, larger gain); baselines
    -C, majority rate and the probe accuracy itself (headroom: a weak probe leaves more to gain).

    Targets come from the ``protocol`` probes at each model's last layer. ``pretrained`` tells
    pretrained models from their ``:random`` controls; `pretraining_contrast` pairs them.
    """
    target_rows = probe_targets(tables["probes"], protocol=protocol)
    ntps_table = tables["ntps"]
    rows = []
    for model, targets_m in target_rows.groupby("model", sort=False):
        pretrained = bool(ntps_table.loc[ntps_table["model"] == model, "pretrained"].iloc[0])
        n = targets_m["dataset"].nunique()
        base = {"model": model, "pretrained": pretrained, "n_datasets": n, "method": method,
                "target_protocol": protocol, "target_layer": int(targets_m["target_layer"].iloc[0])}
        if n < 3:
            continue
        for target in (t for t in targets if t in TARGETS):
            for variant in variants:
                cfg_cols = ["layer", "k"] if variant == "theory" else ["layer", "fraction"]
                scores = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == variant)]
                frame = scores[["dataset", *cfg_cols, "ntps"]].merge(targets_m[["dataset", target]], on="dataset")
                frame = frame.dropna(subset=["ntps"])
                if frame["dataset"].nunique() < 3:  # scores of too few datasets (e.g. units still running)
                    continue
                rows += _selection_rows(frame, base, target=target, name=f"ntps_{variant}", cfg_cols=cfg_cols,
                                        direction=TARGETS[target], method=method, n_boot=n_boot, n_perm=n_perm,
                                        seed=seed)
            baselines = {"-C": -targets_m["n_classes"].astype(float), "majority_rate": targets_m["majority_rate"]}
            if "peers" in tables:
                peers = tables["peers"]
                peers = peers[peers["model"] == model]
                peers = peers[peers["layer"] == peers["layer"].max()].set_index("dataset")
                for peer in ("logme", "h_score", "h_score_lw", "knn_accuracy", "rankme"):
                    if peer in peers.columns:
                        baselines[f"peer:{peer}"] = targets_m["dataset"].map(peers[peer])
            rows += _baseline_rows(baselines, targets_m[target].to_numpy(dtype=float), base, target=target,
                                   method=method, n_boot=n_boot, seed=seed)
        if "lora_gain" in targets and "lora" in tables:
            rows += _gain_rows(tables["lora"], targets_m, base, method=method, n_boot=n_boot, n_perm=n_perm, seed=seed)
    return pd.DataFrame(rows)


def _gain_rows(lora: pd.DataFrame, targets_m: pd.DataFrame, base: dict, *, method: str, n_boot: int, n_perm: int,
               seed: int) -> list[dict]:
    """`correlation_summary`'s ``lora_gain`` rows of one model (none with fewer than 3 datasets)."""
    rows_m = lora[(lora["model"] == base["model"]) & (lora["variant"] == "theory")].dropna(subset=["ntps_before"])
    if rows_m["dataset"].nunique() < 3:
        return []
    gains = rows_m.groupby("dataset")[["lora_gain", "lora_probe_accuracy"]].first()
    frame = rows_m[["dataset", "layer", "k", "ntps_before"]].rename(columns={"ntps_before": "ntps"})
    frame = frame.merge(gains["lora_gain"], left_on="dataset", right_index=True)
    base = {**base, "n_datasets": int(gains.shape[0]), "target_layer": int(rows_m["layer"].max())}
    out = _selection_rows(frame, base, target="lora_gain", name="ntps_theory_before", cfg_cols=["layer", "k"],
                          direction="negative", method=method, n_boot=n_boot, n_perm=n_perm, seed=seed)
    meta = targets_m.set_index("dataset").reindex(gains.index)
    baselines = {"-C": -meta["n_classes"].astype(float), "majority_rate": meta["majority_rate"],
                 "probe_accuracy": gains["lora_probe_accuracy"]}
    return out + _baseline_rows(baselines, gains["lora_gain"].to_numpy(dtype=float), base, target="lora_gain",
                                method=method, n_boot=n_boot, seed=seed)


def pretraining_contrast(tables: dict[str, pd.DataFrame], *, protocol: str = "heldout") -> pd.DataFrame:
    """Per dataset and (pretrained model, its ``:random`` control): last-layer probe targets and the
    median NTPS (theory, over layers and k) of both, and their differences. Does pretraining move
    NTPS and the probes the same way across datasets?"""
    targets = probe_targets(tables["probes"], protocol=protocol)
    ntps_table = tables["ntps"]
    theory = ntps_table[ntps_table["variant"] == "theory"].groupby(["model", "dataset"])["ntps"].median()
    targets = targets.assign(ntps_theory_median=[theory.get((m, d), np.nan) for m, d in zip(targets.model, targets.dataset)])
    rows = []
    for model in targets["model"].unique():
        control = f"{model}:random"
        if model.endswith(":random") or control not in set(targets["model"]):
            continue
        a = targets[targets["model"] == model].set_index("dataset")
        b = targets[targets["model"] == control].set_index("dataset")
        for dataset in a.index.intersection(b.index):
            row = {"model": model, "control": control, "dataset": dataset, "n_classes": int(a.loc[dataset, "n_classes"])}
            for col in ("accuracy", "kappa", "mse", "ntps_theory_median"):
                row[f"{col}_pretrained"] = a.loc[dataset, col]
                row[f"{col}_random"] = b.loc[dataset, col]
                row[f"{col}_diff"] = a.loc[dataset, col] - b.loc[dataset, col]
            rows.append(row)
    return pd.DataFrame(rows)


def fixed_ntps(tables: dict[str, pd.DataFrame], *, k: int = 8, variant: str = "theory") -> pd.DataFrame:
    """Theory NTPS of every (model, dataset) at one pre-specified configuration: each model's last
    layer and ``k`` (no selection, so no selection bias), beside the held-out probe targets of
    that layer. Columns: model, pretrained, dataset, n_classes, majority_rate, accuracy, kappa,
    mse, layer, k, ntps."""
    scores = tables["ntps"]
    scores = scores[(scores["variant"] == variant) & (scores["k"] == k)]
    if scores.empty:
        raise ValueError(f"no {variant} NTPS rows at k = {k}")
    last = scores.groupby("model")["layer"].transform("max")
    scores = scores[scores["layer"] == last][["model", "pretrained", "dataset", "layer", "k", "ntps"]]
    targets = probe_targets(tables["probes"]).drop(columns=["target_layer"])
    return scores.merge(targets, on=["model", "dataset"]).reset_index(drop=True)


def structure_controls(
    tables: dict[str, pd.DataFrame], *, k: int = 8, targets: Sequence[str] = ("accuracy", "kappa"),
    method: str = "spearman", n_boot: int = 1000, n_perm: int = 2000, seed: int = 0,
) -> pd.DataFrame:
    """What NTPS says beyond the datasets' own structure (SPEC section 10), at one pre-specified
    configuration (`fixed_ntps`: last layer, ``k``). One row per (analysis, model, target):

    - ``pretrained_minus_random``: per pretrained model with a ``:random`` control, rho across
      datasets of NTPS(pretrained) - NTPS(random) with target(pretrained) - target(random): what
      pretraining adds to the score against what it adds to the probe. CI by bootstrapping
      datasets, two-sided permutation p;
    - ``partial_given_C``: per model, the rank partial correlation of NTPS with the target
      controlling for the number of classes (`ntps_nb.core.stats.partial_correlation`), with a
      bootstrap CI (no p-value: a permutation null for a partial correlation needs a model of
      how C drives both);
    - ``across_models``: the other axis, same dataset and different models. For every dataset and
      every pair of models, is the model with the higher NTPS also the one with the better probe?
      ``rho`` is then the share of concordant pairs minus the share of discordant ones (Kendall's
      tau over pairs, ties count as neither; signed so that positive means "higher NTPS, better
      probe" for MSE too), ``n_pairs`` how many pairs, and ``p_value`` a two-sided permutation p
      that shuffles the target across models within each dataset.
      The model is ``"all"``; rows for pretrained models only (``"pretrained"``) come beside it.
    """
    from ntps_nb.core.stats import partial_correlation_ci, stratified_concordance

    fixed = fixed_ntps(tables, k=k)
    rows = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        sign = 1.0 if TARGETS[target] == "positive" else -1.0
        for model in fixed.loc[fixed["pretrained"].astype(bool), "model"].unique():
            control = f"{model}:random"
            a = fixed[fixed["model"] == model].set_index("dataset")
            b = fixed[fixed["model"] == control].set_index("dataset")
            common = a.index.intersection(b.index)
            if control not in set(fixed["model"]) or common.size < 3:
                continue
            x = (a.loc[common, "ntps"] - b.loc[common, "ntps"]).to_numpy(float)
            y = (a.loc[common, target] - b.loc[common, target]).to_numpy(float)
            row = {"analysis": "pretrained_minus_random", "model": model, "target": target, "k": k,
                   "n_datasets": int(common.size), "n_pairs": np.nan}
            rows.append({**row, **_rho_ci_p(x, y, method, n_boot, n_perm, seed)})
        for model, part in fixed.groupby("model", sort=False):
            if len(part) < 4:  # one control needs 4 datasets (e.g. a study still running)
                continue
            row = {"analysis": "partial_given_C", "model": model, "target": target, "k": k,
                   "n_datasets": int(len(part)), "n_pairs": np.nan, "p_value": np.nan}
            x, y, c = (part[col].to_numpy(float) for col in ("ntps", target, "n_classes"))
            ci = partial_correlation_ci(x, y, c, method=method, n_boot=n_boot, seed=seed)
            rows.append({**row, "rho": ci["estimate"], "ci_low": ci["low"], "ci_high": ci["high"]})
        for who in ("all", "pretrained"):
            part = fixed if who == "all" else fixed[fixed["pretrained"].astype(bool)]
            agree = stratified_concordance(part["ntps"], sign * part[target].to_numpy(float), part["dataset"],
                                           n_perm=n_perm, seed=seed)
            if agree["n_pairs"] == 0:  # a single model (of that kind): no pairs to compare
                continue
            rows.append({"analysis": "across_models", "model": who, "target": target, "k": k,
                         "n_datasets": agree["n_groups"], "n_pairs": agree["n_pairs"], "rho": agree["tau"],
                         "ci_low": np.nan, "ci_high": np.nan, "p_value": agree["pvalue"]})
    columns = ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "rho", "ci_low", "ci_high", "p_value"]
    return pd.DataFrame(rows, columns=columns)


def _rho_ci_p(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, n_perm: int, seed: int) -> dict[str, float]:
    """rho, bootstrap CI and two-sided permutation p of one score with one target (all NaN when a
    sample is constant, e.g. -C when every task is binary)."""
    from ntps_nb.core.stats import correlate, permutation_pvalue

    try:
        rho = correlate(x, y, method)
        low, high = _ci(x, y, method, n_boot, seed)
        p = permutation_pvalue(x, y, method=method, n_perm=n_perm, seed=seed)["pvalue"]
    except ValueError:  # constant differences
        rho, low, high, p = np.nan, np.nan, np.nan, np.nan
    return {"rho": rho, "ci_low": low, "ci_high": high, "p_value": p}


def ntps_with_intervals(tables: dict[str, pd.DataFrame], *, model: str, k: int, variant: str = "theory",
                        layer: str | int = "last", protocol: str = "heldout") -> pd.DataFrame:
    """One row per dataset: NTPS with its shard-bootstrap interval (``intervals.csv``) at ``layer``
    (an index, or "last": the deepest layer with intervals) and ``k``, beside the probe targets of
    that model at its last layer. Raises if the study kept no interval there."""
    intervals = tables.get("intervals")
    if intervals is None or intervals.empty:
        raise ValueError("this study has no intervals table (run it with shards and interval_layers)")
    rows = intervals[(intervals["model"] == model) & (intervals["variant"] == variant)
                     & (intervals["statistic"] == "ntps")]
    if rows.empty:
        raise ValueError(f"no {variant} intervals for model {model!r}; models: {sorted(intervals['model'].unique())}")
    chosen = int(rows["layer"].max()) if layer == "last" else int(layer)
    rows = rows[(rows["layer"] == chosen) & (rows["k"] == k)]
    if rows.empty:
        raise ValueError(f"no interval at layer {chosen}, k {k}; interval layers {sorted(intervals['layer'].unique())}")
    keep = ["dataset", "layer", "k", "variant", "ntps", "lower", "upper", "se_jackknife", "n_shards", "n_boot", "level"]
    targets = probe_targets(tables["probes"], protocol=protocol)
    targets = targets[targets["model"] == model].drop(columns=["layer"], errors="ignore")
    return rows[keep].merge(targets, on="dataset").assign(model=model).reset_index(drop=True)


def diagnostics_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The diagnostics a study recorded, one row per (model, dataset, layer, variant, configuration):
    NTPS, its spread under 1e-6 relative perturbations of the moments, and the label-permutation
    null (p-value, z-score). ``config`` names the configuration: "k=8" (theory), "f=0.5" (reference)."""
    diag = tables.get("diagnostics")
    if diag is None or diag.empty:
        raise ValueError("this study recorded no diagnostics (set diagnostics = true)")
    config = np.where(diag["variant"] == "theory", "k=" + diag["k"].astype("Int64").astype(str),
                      "f=" + diag["fraction"].round(2).astype(str))
    keep = ["model", "dataset", "n_classes", "layer", "variant", "ntps", "perturb_max_dev", "perm_mean", "perm_p",
            "perm_z", "solver_max_dev", "n_permutations"]
    return diag.assign(config=config)[keep[:5] + ["config"] + keep[5:]].reset_index(drop=True)


def lora_summary(lora: pd.DataFrame, *, k: int) -> pd.DataFrame:
    """One row per (model, dataset) of a study's LoRA table (``lora.csv``) at ``k`` (theory NTPS of
    the layer LoRA was scored at): NTPS before and after LoRA, the held-out probe and LoRA test
    accuracies, the gain (LoRA - probe) and the training budget, so gains are read with it."""
    needed = ["model", "dataset", "k", "ntps_before", "ntps_after", "lora_gain"]
    missing = [c for c in needed if c not in lora.columns]
    if missing:
        raise ValueError(f"the LoRA table lacks columns {missing}")
    rows = lora[lora["k"] == k]
    if rows.empty:
        raise ValueError(f"no LoRA rows at k = {k}; k values: {sorted(lora['k'].unique().tolist())}")
    keep = ["model", "dataset", "n_classes", "layer", "k", "ntps_before", "ntps_after", "delta",
            "lora_probe_accuracy", "lora_lora_accuracy", "lora_gain", "lora_budget_steps", "lora_budget_batch_size",
            "lora_budget_lr", "lora_budget_max_length", "n_train", "n_test"]
    out = rows[[c for c in keep if c in rows.columns]].rename(columns={
        "lora_probe_accuracy": "probe_accuracy", "lora_lora_accuracy": "lora_accuracy", "lora_gain": "gain",
        "lora_budget_steps": "steps", "lora_budget_batch_size": "batch_size", "lora_budget_lr": "lr",
        "lora_budget_max_length": "lora_max_length"})
    return out.sort_values(["model", "dataset"]).reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame, *, targets: Sequence[str] | None = None,
                     scores: Sequence[str] | None = None) -> str:
    """`correlation_summary` rows as a Markdown table (the form README's Results section quotes),
    pretrained models first, then their random controls; rho, 95% CI and p to two decimals, and
    the configuration (layer/k or layer/fraction; the most frequent one under leave-one-out).

    ``targets`` / ``scores`` keep only those values (None: all)."""
    _require_columns(summary, ["model", "pretrained", "n_datasets", "target", "score", "selection", "rho", "ci_low",
                               "ci_high", "p_value"], "summary_markdown")
    rows = summary
    if targets is not None:
        rows = rows[rows["target"].isin(list(targets))]
    if scores is not None:
        rows = rows[rows["score"].isin(list(scores))]
    if rows.empty:
        raise ValueError("no summary rows to show (check targets= and scores=)")
    order = {name: i for i, name in enumerate(dict.fromkeys(rows.sort_values("pretrained", ascending=False,
                                                                              kind="stable")["model"]))}
    rows = rows.assign(_order=rows["model"].map(order)).sort_values("_order", kind="stable")

    rows = rows.assign(selection=rows["selection"].astype(str).str.replace("_", " "))
    return _markdown(rows, {"model": "model", "n_datasets": "datasets", "target": "target", "score": "score",
                            "selection": "selection", "rho": "rho", "ci": "95% CI", "p_value": "p",
                            "config": "configuration"})


def structure_markdown(controls: pd.DataFrame) -> str:
    """`structure_controls` rows as a Markdown table (rho is Kendall's tau over model pairs for the
    ``across_models`` rows)."""
    _require_columns(controls, ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "rho", "ci_low",
                                "ci_high", "p_value"], "structure_markdown")
    rows = controls.assign(analysis=controls["analysis"].str.replace("_", " "))
    return _markdown(rows, {"analysis": "analysis", "model": "model", "target": "target", "k": "k",
                            "n_datasets": "datasets", "n_pairs": "model pairs", "rho": "rho / tau", "ci": "95% CI",
                            "p_value": "p"})


def _markdown(rows: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of ``columns`` (frame column -> header); floats to two decimals, missing
    values as "-", ``ci`` built from ci_low/ci_high."""
    def cell(row: dict, column: str) -> str:
        if column == "ci":
            low, high = row["ci_low"], row["ci_high"]
            return "-" if not (np.isfinite(low) and np.isfinite(high)) else f"[{low:.2f}, {high:.2f}]"
        value = row.get(column, "")
        if isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                return "-"
            return f"{int(value)}" if column in ("n_pairs", "k", "n_datasets") else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows.to_dict("records")]
    return "\n".join(lines)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the frame has {list(frame.columns)}")


def summarise(cfg_or_tables: Any, **kwargs: Any) -> pd.DataFrame:
    """The tidy summary README and notebooks print: `correlation_summary` of a study's combined tables.

    Accepts a config path, a `StudyConfig`, a results folder or the tables dict.
    """
    tables = cfg_or_tables if isinstance(cfg_or_tables, dict) else load_results(cfg_or_tables)
    return correlation_summary(tables, **kwargs)


# -- command line --------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (``kill``, a batch system's stop) ends the run like Ctrl-C does: as an exception, so
    the unit in progress releases its claim and its temporary folder instead of leaving them."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cli_run(args) -> int:
    overrides = {key: value for key, value in (("device", args.device), ("analysis_threads", args.analysis_threads),
                                               ("torch_threads", args.torch_threads)) if value is not None}
    cfg = load_config(args.config, **overrides)
    with _terminate_as_exit():
        table = run_study(cfg, units_limit=args.units_limit, replace_stale=args.replace_stale, models=args.models,
                          datasets=args.datasets)
    done = table[table["status"] == "done"]
    if len(done):
        print(f"computed {len(done)} unit(s): mean {done['seconds'].mean():.1f} s, total {done['seconds'].sum():.1f} s")
    return 0


def _cli_status(args) -> int:
    cfg = load_config(args.config)
    table = study_status(cfg, k=args.k)
    counts = table["status"].value_counts().to_dict()
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        print(f"study {cfg.name} ({cfg.config_hash}): {len(table)} units, "
              + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
        print(table.drop(columns=["finished"], errors="ignore").to_string(index=False, na_rep=""))
        for row in table[table["status"] == "running"].itertuples(index=False):
            print(f"running: {row.model} x {row.dataset}, {row.finished}")
    return 0


def _cli_combine(args) -> int:
    combine(load_config(args.config))
    return 0


def _cli_summary(args) -> int:
    cfg = load_config(args.config)
    tables = load_units(cfg) if args.partial else load_results(cfg)
    summary = summarise(tables, n_perm=args.n_perm, n_boot=args.n_boot, targets=args.targets)
    if args.partial:
        counts = tables["probes"].groupby("model")["dataset"].nunique()
        print(f"INTERIM: the complete units of {cfg.name!r} so far (datasets per model: {counts.to_dict()} of "
              f"{len(cfg.datasets)}); numbers will change as units land\n")
    shown = summary[summary["target"].isin(args.targets)]
    cols = ["model", "target", "score", "selection", "rho", "ci_low", "ci_high", "p_value", "config"]
    controls = structure_controls(tables, k=args.k, targets=[t for t in args.targets if t in TARGETS],
                                  n_boot=args.n_boot)
    if args.markdown:
        print(summary_markdown(summary, targets=args.targets))
        if not controls.empty:
            print(f"\nBeyond dataset structure (theory NTPS at each model's last layer, k = {args.k}):\n")
            print(structure_markdown(controls))
    else:
        with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
            print(f"study {cfg.name}: Spearman rho across datasets (targets: {summary['target_protocol'].iloc[0]} probes "
                  f"at the last layer; n_datasets = {sorted(summary['n_datasets'].unique().tolist())})")
            print(shown[cols].to_string(index=False))
            if not controls.empty:
                print(f"\nbeyond dataset structure (theory NTPS at each model's last layer, k = {args.k}; "
                      "rho is Kendall's tau over model pairs for across_models)")
                print(controls.drop(columns=["k"]).to_string(index=False))
    if args.output:
        summary.to_csv(args.output, index=False, float_format=CSV_FLOAT_FORMAT)
    return 0


def register_cli(subparsers) -> None:
    """Add ``study run|combine|summary CONFIG`` to the ``python -m ntps_nb`` parser."""
    study = subparsers.add_parser("study", help="run, combine and summarise a study grid (studies/*.toml)")
    sub = study.add_subparsers(dest="study_command", required=True)
    run = sub.add_parser("run", help="compute the missing units of a study, then combine")
    run.add_argument("config")
    run.add_argument("--units-limit", type=int, default=None, help="compute at most N units in this call")
    run.add_argument("--replace-stale", action="store_true", help="recompute units computed with other settings")
    run.add_argument("--models", nargs="+", default=None,
                     help="only these models of the grid (processes started on one study share it anyway: "
                          "each claims its units)")
    run.add_argument("--datasets", nargs="+", default=None, help="only these datasets of the grid")
    run.add_argument("--device", default=None, help='where the models run ("cuda", "cuda:1"; default cpu); '
                     "not part of the config hash, recorded in each unit's unit.json")
    run.add_argument("--analysis-threads", type=int, default=None, help="BLAS threads of the analysis (default 1)")
    run.add_argument("--torch-threads", type=int, default=None, help="torch threads of the forward passes (default 1)")
    run.set_defaults(func=_cli_run)
    stat = sub.add_parser("status", help="which units are complete, their time and headline numbers")
    stat.add_argument("config")
    stat.add_argument("--k", type=int, default=8, help="k of the theory NTPS column (last layer)")
    stat.set_defaults(func=_cli_status)
    comb = sub.add_parser("combine", help="concatenate the complete units into the study tables")
    comb.add_argument("config")
    comb.set_defaults(func=_cli_combine)
    summ = sub.add_parser("summary", help="rho of NTPS vs probes per model, with baselines and controls")
    summ.add_argument("config")
    summ.add_argument("--targets", nargs="+", default=["accuracy", "kappa", "lora_gain"],
                      choices=[*TARGETS, "lora_gain"], help="lora_gain: where the study ran LoRA")
    summ.add_argument("--n-perm", type=int, default=200)
    summ.add_argument("--n-boot", type=int, default=1000)
    summ.add_argument("--output", default=None, help="also write the full summary as CSV")
    summ.add_argument("--markdown", action="store_true", help="print a Markdown table (README's Results form)")
    summ.add_argument("--k", type=int, default=8, help="k of the fixed-configuration controls (last layer)")
    summ.add_argument("--partial", action="store_true",
                      help="an interim look: read the complete units directly (the study need not be combined)")
    summ.set_defaults(func=_cli_summary)
