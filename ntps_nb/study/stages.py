"""One unit of a study: its extractions, the tables computed from them, and the unit folder."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ntps_nb.cache import atomic_path
from ntps_nb.study.config import (CSV_FLOAT_FORMAT, StudyConfig, _readable, _say, _versions, resolve_layers)


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


def _environment(model, cfg: StudyConfig) -> dict[str, Any]:
    """Where and with what a unit was computed (its ``unit.json``): the device the model ran on (with
    the GPU's name), the host, the threads and the package versions; none of it enters the hash."""
    import torch

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "host": platform.node(),
            "torch_threads": torch.get_num_threads(), "analysis_threads": cfg.analysis_threads, **_versions()}
