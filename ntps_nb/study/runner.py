"""Running a study: units claimed by the processes that share a study, their status, the grid
run unit by unit, and the complete units combined into the study tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from ntps_nb.cache import atomic_path
from ntps_nb.core.threads import available_cores, default_threads
from ntps_nb.study.config import (CSV_FLOAT_FORMAT, StudyConfig, StudySettingsError, _readable, _say,
                                  _versions, load_config, unit_name, with_estimator)
from ntps_nb.study.stages import (STAGE_NAMES, UNIT_TABLES, check_stage_names, estimates_shortfall, read_table,
                                  read_unit_record, run_unit, stage_states, unit_compute_seconds, write_unit)


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
        """The claim, or None when another live process holds it.

        Parameters
        ----------
        cfg : StudyConfig
        model, dataset : str
            The unit's model and dataset names.

        Returns
        -------
        UnitClaim or None
            The claim on ``<study>/units/.<unit>.claim`` (created exclusively, recording host,
            pid and start time); a stale claim of a dead process on this host is taken over.
        """
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
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(record)
            except BaseException:  # interrupted (SIGTERM as an exception) while writing: leave no claim
                path.unlink(missing_ok=True)
                raise
            return cls(path)
        return None

    @classmethod
    def holder(cls, cfg: StudyConfig, model: str, dataset: str) -> dict | None:
        """The live claim's record (host, pid, started) of a unit, or None.

        Parameters
        ----------
        cfg : StudyConfig
        model, dataset : str
            The unit's model and dataset names.

        Returns
        -------
        dict or None
            None when no live claim exists; an empty dict when the claim file cannot be read.
        """
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
    """"complete" (same settings), "stale" (complete, other settings, or a data file whose
    content changed since) or "missing".

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.

    Returns
    -------
    str
        The unit folder's status, read from its ``unit.json`` (an incomplete folder is "missing").
    """
    meta_path = cfg.unit_folder(model, dataset) / "unit.json"
    if not meta_path.is_file():
        return "missing"
    meta = read_unit_record(meta_path)
    if not meta.get("complete"):
        return "missing"
    file = cfg.dataset_file(dataset)
    if file is not None and (meta.get("dataset_file") or {}).get("sha256") != file.sha256:
        return "stale"
    return "complete" if meta.get("config_hash") == cfg.config_hash else "stale"


def study_status(cfg: StudyConfig | str | os.PathLike, *, k: int = 8) -> pd.DataFrame:
    """One row per unit of the grid, read from the unit folders (nothing combined or computed).

    Columns: model, dataset, status ("complete", "stale", "running" (claimed by a live process),
    "missing"), minutes (what its results took to compute, each stage where it was computed:
    `ntps_nb.study.stages.unit_compute_seconds`), finished (or, while running, who started it when), n_train,
    mean_length (tokens), extract_version (`ntps_nb.extract.EXTRACT_VERSION` of its train
    extraction; None for a unit written before units recorded it), and for complete units the
    headline numbers at the last layer: held-out probe accuracy, theory NTPS at ``k`` (or the
    largest k of the grid below it), and the LoRA accuracy and gain where LoRA ran.

    Parameters
    ----------
    cfg : StudyConfig, or str or PathLike
        The study, or the path of its TOML config.
    k : int
        Largest k of the theory NTPS shown (column ``ntps_theory_k{k}``).

    Returns
    -------
    DataFrame
        One row per unit, in the grid's order, with the columns above (``heldout_accuracy``,
        ``ntps_theory_k{k}``, ``lora_accuracy``, ``lora_gain`` where they apply).
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
            meta = read_unit_record(folder / "unit.json")
            seconds = unit_compute_seconds(meta)
            row.update(minutes=round(seconds / 60, 1) if seconds is not None else float("nan"),
                       finished=meta.get("finished"),
                       n_train=meta.get("n_train"), mean_length=meta.get("mean_length_train"),
                       extract_version=meta.get("extract_version"))
        if row["status"] == "complete":
            probes = read_table(folder / "probes.csv")
            held = probes[probes["protocol"] == "heldout"]
            last = held["layer"].max()
            row["heldout_accuracy"] = float(held.loc[held["layer"] == last, "accuracy"].iloc[0])
            scores = read_table(folder / "ntps.csv")
            theory = scores[(scores["variant"] == "theory") & (scores["layer"] == scores["layer"].max())]
            below = theory[theory["k"] <= k]
            if len(below):
                chosen = below.loc[below["k"].idxmax()]
                row[f"ntps_theory_k{k}"] = float(chosen["ntps"])
            lora_path = folder / "lora.csv"
            if lora_path.is_file():
                lora = read_table(lora_path)
                row["lora_accuracy"] = float(lora["lora_lora_accuracy"].iloc[0])
                row["lora_gain"] = float(lora["lora_gain"].iloc[0])
        rows.append(row)
    table = pd.DataFrame(rows)
    if "n_train" in table:
        table["n_train"] = table["n_train"].astype("Int64")
    return table


def stage_status(cfg: StudyConfig | str | os.PathLike) -> pd.DataFrame:
    """One row per unit of the grid, one column per stage (`ntps_nb.study.stages.STAGES`): whether
    the stage's result under the current settings is "complete", "stale", "missing" or "off"
    (see `ntps_nb.study.stages.stage_states`). Nothing is computed or written.

    Parameters
    ----------
    cfg : StudyConfig, or str or PathLike
        The study, or the path of its TOML config.

    Returns
    -------
    DataFrame
        Columns model, dataset and one per stage name, one row per unit of the grid.
    """
    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    rows = [{"model": model, "dataset": dataset, **stage_states(cfg, model, dataset)} for model, dataset in cfg.units()]
    return pd.DataFrame(rows, columns=["model", "dataset", *STAGE_NAMES])


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def outdated_stages(cfg: StudyConfig, model: str, dataset: str) -> list[str]:
    """The stages of a unit that the installed package would compute anew: "stale" or "missing"
    under the current stage keys (`ntps_nb.study.stages.stage_states`), e.g. after a stage's
    version was raised. A complete unit with outdated stages keeps its results until
    ``run_study(..., update_stages=True)`` recomputes exactly those stages.

    Parameters
    ----------
    cfg : StudyConfig
    model, dataset : str
        The unit's model and dataset names.

    Returns
    -------
    list of str
        Stage names, in stage order (empty when every stage is current, off or skipped).
    """
    return [name for name, state in stage_states(cfg, model, dataset).items() if state in ("stale", "missing")]


def _unit_state(cfg: StudyConfig, unit: tuple[str, str], update_stages: bool,
                stages: Sequence[str] | None = None) -> str:
    """`unit_status`, and "outdated" for a complete unit with `outdated_stages` (of ``stages``, when
    given) when ``update_stages``."""
    status = unit_status(cfg, *unit)
    if status == "complete" and update_stages and [s for s in outdated_stages(cfg, *unit)
                                                    if stages is None or s in stages]:
        return "outdated"
    return status


def run_study(cfg: StudyConfig | str | os.PathLike, *, units_limit: int | None = None, replace_stale: bool = False,
              models: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
              cache: str | os.PathLike | None = None, log: Callable[[str], None] = _say,
              processes: int = 1, update_stages: bool = False, stages: Sequence[str] | None = None) -> pd.DataFrame:
    """Run every missing unit of a study (model by model, loading each model once), then `combine`.

    A unit already complete with the same settings is skipped (with ``update_stages``, unless
    the installed package computes some of its stages anew: `outdated_stages`, which are then
    recomputed and the others reused); one complete with other settings
    is an error unless ``replace_stale``. ``units_limit`` caps the units computed in this call;
    ``models`` / ``datasets`` restrict it to part of the grid. The study tables are combined when
    every unit is complete.
    Several processes may run the same study at once: each claims a unit before computing it
    (`UnitClaim`) and passes over units another live process holds (status "elsewhere").
    ``processes`` > 1 starts that many worker processes here, which share the grid that way; each
    analyses with its share of the cores (`ntps_nb.core.threads.default_threads`: the cores this
    process may use // ``processes``) unless the config sets ``analysis_threads``.
    Returns one row per unit: model, dataset, status ("skipped", "done", "elsewhere"), seconds.

    Parameters
    ----------
    cfg : StudyConfig, or str or PathLike
        The study, or the path of its TOML config.
    units_limit : int, optional
        Most units computed in this call (by each worker process when ``processes`` > 1).
    replace_stale : bool
        Recompute units complete with other settings instead of raising.
    models, datasets : sequence of str, optional
        Restrict the run to these models / datasets of the grid (each must be in the config).
    cache : str or PathLike, optional
        Extraction cache folder, passed to `run_unit`.
    log : callable
        Receives one progress line at a time (the worker processes print theirs, each line
        starting with ``[worker i/N]``).
    processes : int
        Worker processes to start (1: compute in this process).
    update_stages : bool
        Also run the complete units with `outdated_stages` (e.g. LoRA results of stage version 1,
        which keep no per-text predictions); only those stages are computed.
    stages : sequence of str, optional
        With ``update_stages``: update only these of the outdated stages; the others keep what the
        unit folders hold (`run_unit`'s ``only``), e.g. ``["estimates"]`` to bring a new reliability
        flag to every unit without retraining LoRA results of an old stage version.

    Returns
    -------
    DataFrame
        One row per unit of (the restricted part of) the grid that was complete or taken up
        here: columns model, dataset, status, seconds. Units beyond ``units_limit`` have no row.

    Raises
    ------
    StudySettingsError
        On a model or dataset not in the study, stale units without ``replace_stale``, or a
        device torch cannot use.
    """
    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise StudySettingsError(f"processes must be a positive integer, got {processes!r}")
    units = cfg.units()
    for given, known, what in ((models, cfg.models, "model"), (datasets, cfg.datasets, "dataset")):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise StudySettingsError(f"{what}(s) {unknown} are not in study {cfg.name!r} (it has {list(known)})")
    restricted = models is not None or datasets is not None
    units = [(m, d) for (m, d) in units if (models is None or m in models) and (datasets is None or d in datasets)]
    if stages is not None:
        if not update_stages:
            raise StudySettingsError("stages chooses among the outdated stages of complete units: give it with "
                                     "update_stages")
        check_stage_names(stages)
    status = {unit: _unit_state(cfg, unit, update_stages, stages) for unit in units}
    stale = [unit_name(*u) for u, s in status.items() if s == "stale"]
    if stale and not replace_stale:
        raise StudySettingsError(
            f"{len(stale)} unit(s) of study {cfg.name!r} were computed with other settings ({stale[:4]}...); "
            f"the config hash is now {cfg.config_hash}. Rerun with --replace-stale to recompute them, or give the "
            "study a new name")
    todo = [u for u in units if status[u] != "complete"]
    if todo:
        _check_device(cfg.device)
    if processes > 1 and todo:
        return _run_workers(cfg, processes, dict(units_limit=units_limit, replace_stale=replace_stale, models=models,
                                                 datasets=datasets, cache=cache, update_stages=update_stages,
                                                 stages=stages), log)
    if cfg.torch_threads is not None and todo:
        import torch

        # On a shared 2-core machine two spinning OpenMP threads per process made a 40-text
        # extraction ~7x slower than one thread (227 s vs 31 s, SmolLM2, measured here).
        torch.set_num_threads(int(cfg.torch_threads))
    if units_limit is not None:
        todo = todo[:max(0, int(units_limit))]
    outdated = sum(s == "outdated" for s in status.values())
    log(f"study {cfg.name}: {len(units)} units, {len(units) - sum(s != 'complete' for s in status.values())} complete"
        + (f", {outdated} with outdated stages" if outdated else "") + f", {len(todo)} to run now -> {cfg.folder}")
    shortfall = estimates_shortfall(cfg)
    if todo and shortfall:
        log(f"  no estimates.csv in this study: {shortfall}")
    rows = [{"model": m, "dataset": d, "status": "skipped", "seconds": 0.0} for (m, d) in units
            if status[(m, d)] == "complete"]
    done_before = len(rows)
    loaded_name, loaded = None, None
    started = time.perf_counter()
    computed = 0
    for i, (model_name, dataset_name) in enumerate(todo, start=1):
        claim = None
        try:  # the claim is released whatever ends this unit, a SIGTERM between taking it and computing too
            claim = UnitClaim.take(cfg, model_name, dataset_name)
            if claim is None or _unit_state(cfg, (model_name, dataset_name), update_stages, stages) == "complete":
                # held by another process, or finished by one since this one looked
                log(f"    {model_name} x {dataset_name}: "
                    f"{'complete' if claim else 'being computed by another process'}, skipped")
                rows.append({"model": model_name, "dataset": dataset_name, "status": "elsewhere", "seconds": 0.0})
                continue
            if loaded_name != model_name:
                from ntps_nb.models import load_model

                loaded, loaded_name = None, None  # free the previous model first
                loaded, loaded_name = load_model(model_name, seed=cfg.seed, device=cfg.device), model_name
            t0 = time.perf_counter()
            only = stages if status[(model_name, dataset_name)] == "outdated" else None  # a new unit: whole
            tables = run_unit(cfg, model_name, dataset_name, loaded, cache=cache, log=log, only=only)
            write_unit(cfg.unit_folder(model_name, dataset_name), tables)
        finally:
            if claim is not None:
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


def _run_workers(cfg: StudyConfig, processes: int, kwargs: dict[str, Any], log: Callable[[str], None]) -> pd.DataFrame:
    """`run_study` in ``processes`` fresh worker processes (spawned: no forked torch state), each
    with ``NTPS_NB_ANALYSIS_PROCESSES`` = ``processes`` so that its analysis takes its share of the
    cores; their rows merged, one per unit (done by one worker, passed over by the others). The last
    worker to finish a unit combines the study, as a single process does. A worker's error is raised
    once the others have finished their units; leaving early (Ctrl-C, SIGTERM) terminates the
    workers, whose units release their claims."""
    import multiprocessing

    share = f"{available_cores()} cores // {processes}" if cfg.analysis_threads is None else "the config's"
    log(f"study {cfg.name}: {processes} worker processes, {cfg.analysis_threads or default_threads(processes)} "
        f"analysis threads each ({share}), {cfg.torch_threads or 'torch default'} torch threads each")
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for i in range(1, processes + 1):
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_worker, args=(cfg, kwargs, processes, f"[worker {i}/{processes}]", send),
                                     name=f"worker {i}/{processes}")
            worker.start()
            send.close()  # the worker holds the sending end: a worker that dies closes the pipe
            workers.append((worker, receive))
        results = []
        for worker, receive in workers:
            try:
                results.append((worker.name, *receive.recv()))
            except EOFError:
                results.append((worker.name, "error", None))
            worker.join()
    finally:
        for worker, _ in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: its unit stops as an exception, releasing its claim
        for worker, _ in workers:
            worker.join()
    failed = [(name, detail, worker.exitcode) for (name, status, detail), (worker, _) in zip(results, workers)
              if status != "done"]
    if failed:
        name, detail, code = failed[0]
        raise RuntimeError(f"study {cfg.name}: {name} failed" + (f":\n{detail}" if detail else f" (exit code {code})"))
    rank = {"done": 0, "skipped": 1, "elsewhere": 2}
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for _, _, table in results:
        for row in table.to_dict("records"):
            unit = (row["model"], row["dataset"])
            if unit not in best or rank[row["status"]] < rank[best[unit]["status"]]:
                best[unit] = row
    return pd.DataFrame([best[unit] for unit in cfg.units() if unit in best],
                        columns=["model", "dataset", "status", "seconds"])


def _worker(cfg: StudyConfig, kwargs: dict[str, Any], processes: int, prefix: str, send) -> None:
    """One worker process of `_run_workers`: its analysis share of the cores, SIGTERM ending its unit
    as an exception (so that the claim and temporary folder go), its rows or its error sent back."""
    import signal
    import traceback

    from ntps_nb.core.threads import PROCESSES_ENV

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    os.environ[PROCESSES_ENV] = str(processes)
    try:
        table = run_study(cfg, **kwargs, log=lambda line: _say(f"{prefix} {line}"))
    except Exception:
        send.send(("error", traceback.format_exc()))
    else:
        send.send(("done", table))
    finally:
        send.close()


# -- combine -------------------------------------------------------------------------------------


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


def _read_units(cfg: StudyConfig) -> tuple[list[tuple[Path, dict]], dict[str, pd.DataFrame]]:
    """The complete units of a study and their tables concatenated; raises StudySettingsError when
    they (or their rows) carry different config hashes, or another hash than the config's."""
    units_dir = cfg.folder / "units"
    metas = []
    for model, dataset in cfg.units():
        path = cfg.unit_folder(model, dataset) / "unit.json"
        if path.is_file():
            metas.append((cfg.unit_folder(model, dataset), read_unit_record(path)))
    if not metas:
        raise FileNotFoundError(f"study {cfg.name!r} has no complete unit under {units_dir}")
    tables: dict[str, pd.DataFrame] = {}
    for name in UNIT_TABLES:
        parts = [read_table(folder / f"{name}.csv") for folder, _ in metas if (folder / f"{name}.csv").is_file()]
        if parts:  # units written before the estimator setting were computed by the plug-in
            tables[name] = with_estimator(pd.concat(parts, ignore_index=True), name)
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
    _check_model_identity(cfg, metas)
    return metas, tables


#: What must agree between the units of one model for their rows to share a table: the weights,
#: the tokenizer's fingerprint (`ntps_nb.models.tokenizer_fingerprint`; units written before it
#: lack it and are not compared on it) and whether and which BOS token it puts in front.
MODEL_IDENTITY = ("weights_sha256", "tokenizer_sha256", "adds_bos", "bos_token_id")


def _check_model_identity(cfg: StudyConfig, metas: list[tuple[Path, dict]]) -> None:
    """Raise StudySettingsError when units of one model record different `MODEL_IDENTITY` values
    in their ``model_info``: the same name ran with other weights or another tokenizer (a GGUF's
    tokenizer rebuilt by another transformers version tokenises differently; the weights hash
    cannot see it)."""
    for model in dict.fromkeys(str(meta.get("model")) for _, meta in metas):
        for field in MODEL_IDENTITY:
            by_value: dict[str, list[str]] = {}
            for folder, meta in metas:
                info = meta.get("model_info") or {}
                unrecorded = field not in info or (field == "tokenizer_sha256" and not info[field])
                if str(meta.get("model")) != model or unrecorded:
                    continue
                by_value.setdefault(json.dumps(info[field]), []).append(folder.name)
            if len(by_value) > 1:
                raise StudySettingsError(
                    f"study {cfg.name!r}: the units of {model!r} record different {field} ({by_value}); "
                    "they ran with other weights or another tokenizer and do not share a table. Recompute "
                    "the odd units where the model loads as in the others (a GGUF's tokenizer depends on "
                    "the transformers version that converts it)")


def load_units(cfg: StudyConfig | str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The tables of a study's complete units, concatenated in memory (nothing is written): an
    interim look at a study still running. Same settings checks as `combine`.

    Parameters
    ----------
    cfg : StudyConfig, or str or PathLike
        The study, or the path of its TOML config.

    Returns
    -------
    dict of str to DataFrame
        Table name to the rows of every complete unit that has it (tables no unit has are absent);
        the ntps, intervals and diagnostics rows of units written before the ``estimator``
        setting get estimator "plugin" (they were computed by the plug-in).
    """
    return _read_units(cfg if isinstance(cfg, StudyConfig) else load_config(cfg))[1]


def extraction_versions(metas: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """The units of each extraction version, from their ``unit.json`` records.

    Parameters
    ----------
    metas : iterable of dict
        Units' ``unit.json`` contents (with ``model`` and ``dataset``).

    Returns
    -------
    dict of str to list of str
        "version N" (or "not recorded", for units written before they recorded it) to the units'
        "model x dataset" names, in the order met.
    """
    found: dict[str, list[str]] = {}
    for meta in metas:
        version = meta.get("extract_version")
        key = "not recorded" if version is None else f"version {version}"
        found.setdefault(key, []).append(f"{meta.get('model')} x {meta.get('dataset')}")
    return found


def combine(cfg: StudyConfig | str | os.PathLike, *, log: Callable[[str], None] = _say) -> dict[str, pd.DataFrame]:
    """Concatenate the complete units of a study into ``<study>/<table>.csv`` and ``provenance.json``.

    Raises StudySettingsError when the units (or rows) carry different config hashes: rows
    computed with different settings never share a table.

    Parameters
    ----------
    cfg : StudyConfig, or str or PathLike
        The study, or the path of its TOML config.
    log : callable
        Receives the closing progress line, and a line naming the units of each extraction version
        where the units were extracted under more than one (`extraction_versions`).

    Returns
    -------
    dict of str to DataFrame
        Table name to the combined table, as written (with the ``estimator`` column filled in as
        `load_units` does).
    """
    from ntps_nb import __version__

    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    metas, tables = _read_units(cfg)
    versions = extraction_versions(meta for _, meta in metas)
    if len(versions) > 1:  # the settings agree (one config hash), the extraction rules did not
        log("the units were extracted under different extraction versions (ntps_nb.extract.EXTRACT_VERSION; "
            "README, 'study status'): " + "; ".join(f"{version}: {', '.join(units)}"
                                                    for version, units in versions.items()))
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
        "units": {folder.name: {"seconds": meta.get("seconds"), "compute_seconds": unit_compute_seconds(meta),
                                "timings_s": meta.get("timings_s"),
                                "finished": meta.get("finished"), "lora": meta.get("lora"),
                                "n_train": meta.get("n_train"), "n_test": meta.get("n_test"),
                                "extract_version": meta.get("extract_version"),
                                "token_precision_train": meta.get("token_precision_train"),
                                "float64_layers_train": meta.get("float64_layers_train")}
                  for folder, meta in metas},
    }
    with atomic_path(cfg.folder / "provenance.json") as tmp:
        tmp.write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str))
        _readable(tmp)
    log(f"combined {len(metas)}/{len(cfg.units())} units of {cfg.name!r} into {cfg.folder}")
    return tables


def load_results(cfg_or_folder: StudyConfig | str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The combined tables of a study: a config (TOML path or `StudyConfig`) or a results folder.

    Parameters
    ----------
    cfg_or_folder : StudyConfig, or str or PathLike
        A study config, the path of its TOML file, or the folder holding the combined CSVs.

    Returns
    -------
    dict of str to DataFrame
        Table name (ntps, probes, ..., lora) to the table read from ``<folder>/<name>.csv``,
        for every such file present. Tables combined before the study had the ``estimator``
        setting were computed by the plug-in: their ntps, intervals and diagnostics tables get
        an ``estimator`` column holding "plugin".
    """
    if isinstance(cfg_or_folder, StudyConfig):
        folder = cfg_or_folder.folder
    else:
        path = Path(cfg_or_folder)
        folder = load_config(path).folder if path.suffix == ".toml" else path
    tables = {name: with_estimator(read_table(folder / f"{name}.csv"), name) for name in UNIT_TABLES
              if (folder / f"{name}.csv").is_file()}
    if not tables:
        raise FileNotFoundError(f"no combined tables in {folder}; run `study combine` first")
    return tables
