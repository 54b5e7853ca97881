"""The main job (``make run``, ``python -m ntps_nb run``): what a newcomer runs first.

Two steps, a few minutes on 2 CPU cores after ``make setup`` (the README has the measured time):

1. proof that the pipeline works on this machine: one small study unit (``studies/ci_unit.toml``:
   SmolLM2-135M on TREC-6, 40 texts, 4 layers) is computed live, with a progress bar, into
   ``<out>/fresh_unit/``; its headline numbers are printed beside the committed ones
   (``data/results/ci_unit/``, the same config) and every value of its tables is compared
   (`compare_tables`). A difference is printed, never hidden, with what explains it where the
   CPU's kernels differ from those the unit was computed with (`KERNEL_NOTE`);
2. the report of the committed default study (``data/results/default-richardson/``, 40 units,
   NTPS by the package's default estimator; the released protocol's plug-in study,
   ``data/results/default/``, is one ``--results`` away): every
   notebook of the series executed on it (`ntps_nb.notebooks.run_report`) into ``<out>/report/``:
   executed copies, their HTML and ``index.html``.

``--study CONFIG`` replaces both by a study computed here and the report on it
(``studies/fast.toml``: SmolLM2 and its random control on four datasets, ~30 minutes).
"""

from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from ntps_nb.notebooks import REPOSITORY

#: The unit computed live: a committed study of one unit that CI regenerates too.
UNIT_CONFIG = REPOSITORY / "studies" / "ci_unit.toml"
#: The committed study the report shows: the default study with the package's default estimator
#: (richardson), whose numbers README's "Results so far" leads with.
DEFAULT_RESULTS = REPOSITORY / "data" / "results" / "default-richardson"
#: The longer study one command away (``python -m ntps_nb run --study studies/fast.toml``).
FAST_CONFIG = REPOSITORY / "studies" / "fast.toml"

#: The values compared between the fresh and the committed unit, per table: the keys that pair
#: rows, the value columns, and the rows compared (the columns tests/io/test_study.py's
#: regeneration test compares, plus the k-NN peer).
COMPARED: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "ntps": (("layer", "variant", "k"), ("ntps", "excess_loss", "r_V", "m"), "variant == 'theory'"),
    "probes": (("layer", "protocol"), ("accuracy", "mse"), "protocol == 'heldout'"),
    "peers": (("layer",), ("logme", "h_score", "rankme", "knn_accuracy"), None),
    "intervals": (("layer", "variant", "k"), ("ntps", "lower", "upper", "se_jackknife"), "variant == 'theory'"),
}

#: BLAS threads of the fresh unit's analysis: one, as the committed unit was computed (and as the
#: tests regenerate it, tests/conftest.py). With two, the reductions round differently and
#: ill-determined NTPS values move in their 7th digit (up to 6e-7, measured with the pinned kernels).
UNIT_ANALYSIS_THREADS = 1

#: The CPU kernels the committed unit was computed with (tests/io/test_study.py's regeneration pins
#: them): torch's own kernels, OpenBLAS's (numpy's and scipy's) and MKL's (torch's BLAS, in the forward
#: pass) in conditional-numerical-reproducibility mode on its COMPATIBLE branch (SSE2 without the
#: approximate rcpps/rsqrtps), the one branch MKL documents as reproducible on Intel and other x86-64
#: processors alike (its AVX2 branch is for Intel processors only: elsewhere MKL falls back to its own
#: dispatch). Checked here on one machine only, against MKL restricted to fewer instructions. MKL left to
#: its own dispatch picks its kernels from the processor: on an Intel Xeon with AMX the unit as first
#: committed, without MKL_CBWR, did not regenerate under the other two pins, and no MKL setting reproduced
#: it there. Each library reads its variable when it loads.
REFERENCE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell", "MKL_CBWR": "COMPATIBLE"}

#: Printed when the fresh unit differs from the committed one.
KERNEL_NOTE = (
    "Why they can differ: torch, OpenBLAS and MKL pick their CPU kernels (AVX2, AVX-512) from the processor. "
    "The committed unit was computed with the AVX2 kernels; other kernels round the forward pass and the "
    "moments differently (~1e-8 relative). At this tiny size (40 texts, d = 576) the unit's InterpolationWarning "
    "and NextTokenTieWarning name k where U_k or V_k is chosen among tied directions (classes of equal size, "
    "tied next-token eigenvalues): there the rounding picks the directions, so NTPS can move by any amount "
    "in [0, 1]; where the eigenvalues at k are well separated it moves by rounding, and the released "
    "algorithm's float32 reference rows move throughout. r_V of the theory rows and the probe accuracies agree. "
    "To reproduce the committed unit to the letter on an x86-64 CPU, run with the same kernels:\n"
    "    " + " ".join(f"{name}={value}" for name, value in REFERENCE_KERNELS.items()) + " make run\n"
    "(tests/io/test_study.py::test_regenerate_committed_unit does so and requires exact equality). On a "
    "machine that already runs these kernels, a difference is not explained by them: please report it.")


# -- comparing a fresh unit with the committed one -------------------------------------------------


def compare_tables(committed: Mapping[str, pd.DataFrame], fresh: Mapping[str, pd.DataFrame],
                   compared: Mapping[str, tuple] = COMPARED) -> pd.DataFrame:
    """Every compared value of two results of the same config, table by table and column by column.

    Rows are paired on the table's keys; a row present on one side only is counted, not
    compared. Two NaNs are equal; a NaN against a number is a difference of ``inf``.

    Parameters
    ----------
    committed, fresh : mapping of str to DataFrame
        Table name to table (``ntps_nb.study.load_results``), both read back from CSV.
    compared : mapping
        Table name to ``(keys, value columns, row query or None)`` (default `COMPARED`).

    Returns
    -------
    DataFrame
        One row per (table, value column): table, column, rows_committed, rows_fresh,
        rows_paired, rows_unpaired (the table's rows on one side only), values (compared),
        values_differing, max_abs_diff (0 when every paired value is equal; NaN when nothing
        was paired), where (the keys of the largest difference, e.g. "layer 20, k 2") and same
        (True when the table's rows all paired and every value of the column is equal). A
        table absent on either side gives one row with column "" and same False.

    Raises
    ------
    KeyError
        When a table lacks a key or value column.
    pandas.errors.MergeError
        When a table has two rows with the same keys.
    """
    rows = []
    for name, (keys, values, query) in compared.items():
        if name not in committed or name not in fresh:
            missing = "committed" if name not in committed else "fresh"
            rows.append({"table": name, "column": "", "rows_committed": len(committed.get(name, ())),
                         "rows_fresh": len(fresh.get(name, ())), "rows_paired": 0, "rows_unpaired": 0, "values": 0,
                         "values_differing": 0, "max_abs_diff": np.nan, "where": f"no {missing} table", "same": False})
            continue
        old, new = committed[name], fresh[name]
        if query:
            old, new = old.query(query), new.query(query)
        keys, values = list(keys), list(values)
        merged = old[keys + values].merge(new[keys + values], on=keys, how="outer", suffixes=("_committed", "_fresh"),
                                          indicator=True, validate="one_to_one")
        paired = merged[merged["_merge"] == "both"]
        unpaired = int((merged["_merge"] != "both").sum())
        shown_keys = [key for key in keys if key not in ("variant", "protocol")]  # fixed by the row query
        for column in values:
            a = paired[f"{column}_committed"].to_numpy(dtype=float)
            b = paired[f"{column}_fresh"].to_numpy(dtype=float)
            diff = np.abs(a - b)
            diff[np.isnan(a) & np.isnan(b)] = 0.0
            diff[np.isnan(a) ^ np.isnan(b)] = np.inf
            biggest = float(diff.max()) if diff.size else np.nan
            where = "" if diff.size else "no paired rows"
            if diff.size and biggest > 0:
                worst = paired.iloc[int(np.argmax(diff))]
                where = ", ".join(f"{key} {_short(worst[key])}" for key in shown_keys)
            differing = int((diff > 0).sum())
            rows.append({"table": name, "column": column, "rows_committed": len(old), "rows_fresh": len(new),
                         "rows_paired": len(paired), "rows_unpaired": unpaired, "values": int(diff.size),
                         "values_differing": differing, "max_abs_diff": biggest, "where": where,
                         "same": bool(diff.size and differing == 0 and unpaired == 0)})
    return pd.DataFrame(rows)


def _short(value: Any) -> str:
    """A key value as a person writes it (layer 20, not 20.0)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def unit_headline(tables: Mapping[str, pd.DataFrame], *, k: int = 8) -> pd.DataFrame:
    """The numbers a reader looks at first in one unit, one per row.

    Held-out probe accuracy and theory NTPS at ``k`` on every layer of the probes / ntps tables,
    the rank r_V of the next-token subspace and the interval of NTPS at ``k`` on the interval
    layers, LogME and k-NN accuracy on the peer layers.

    Parameters
    ----------
    tables : mapping of str to DataFrame
        A one-unit study's tables (``ntps_nb.study.load_results``).
    k : int
        k of the theory NTPS shown.

    Returns
    -------
    DataFrame
        Columns quantity, layer, value (tables that are absent give no rows).
    """
    rows = []

    def add(quantity: str, frame: pd.DataFrame, column: str) -> None:
        for layer, value in frame.groupby("layer")[column].first().items():
            rows.append({"quantity": quantity, "layer": int(layer), "value": float(value)})

    if "probes" in tables:
        add("held-out probe accuracy", tables["probes"].query("protocol == 'heldout'"), "accuracy")
    if "ntps" in tables:
        theory = tables["ntps"].query("variant == 'theory'")
        add(f"theory NTPS, k = {k}", theory[theory["k"] == k], "ntps")
        add("r_V (next-token rank)", theory, "r_V")
    if "intervals" in tables:
        theory = tables["intervals"].query("variant == 'theory'")
        add(f"theory NTPS, k = {k}: interval lower", theory[theory["k"] == k], "lower")
        add(f"theory NTPS, k = {k}: interval upper", theory[theory["k"] == k], "upper")
    if "peers" in tables:
        add("LogME", tables["peers"], "logme")
        add("k-NN accuracy", tables["peers"], "knn_accuracy")
    return pd.DataFrame(rows, columns=["quantity", "layer", "value"])


def headline_comparison(committed: Mapping[str, pd.DataFrame], fresh: Mapping[str, pd.DataFrame], *,
                        k: int = 8) -> pd.DataFrame:
    """`unit_headline` of both results side by side.

    Parameters
    ----------
    committed, fresh : mapping of str to DataFrame
        The two results of the same config.
    k : int
        k of the theory NTPS shown.

    Returns
    -------
    DataFrame
        Columns quantity, layer, committed, fresh, difference (fresh - committed), in the
        committed headline's order.
    """
    key = ["quantity", "layer"]
    old, new = unit_headline(committed, k=k), unit_headline(fresh, k=k)
    order = pd.concat([old[key], new[key]]).drop_duplicates()  # a left merge keeps this order
    both = order.merge(old.rename(columns={"value": "committed"}), on=key, how="left")
    both = both.merge(new.rename(columns={"value": "fresh"}), on=key, how="left").reset_index(drop=True)
    return both.assign(difference=both["fresh"] - both["committed"])


def cpu_kernels() -> dict[str, Any]:
    """The CPU kernels torch and OpenBLAS use in this process.

    Returns
    -------
    dict
        ``torch``: torch's CPU capability ("AVX2", "AVX512", ...); ``openblas``: the OpenBLAS
        core types loaded (numpy's and scipy's), e.g. ["Haswell"]; ``mkl_cbwr``: the branch MKL was
        pinned to by the environment it loaded in (``MKL_CBWR``), or None where it picks its own.
    """
    import threadpoolctl
    import torch

    return {"torch": torch.backends.cpu.get_cpu_capability(),
            "openblas": sorted({str(p.get("architecture")) for p in threadpoolctl.threadpool_info()
                                if p.get("internal_api") == "openblas"}),
            "mkl_cbwr": os.environ.get("MKL_CBWR")}


def _progress_log(bar: Any, phases: list[str]) -> Callable[[str], None]:
    """A `run_study` log that moves ``bar`` to the phase a line reports finished, and prints the rest."""
    pattern = re.compile(r": (\w+) [\d.]+ s$")

    def log(line: str) -> None:
        found = pattern.search(line)
        if found and found.group(1) in phases:
            bar.n = phases.index(found.group(1)) + 1
            bar.set_postfix_str(f"{found.group(1)} done")
            bar.refresh()
        elif line.strip():
            bar.write(line)

    return log


def fresh_unit(config: str | os.PathLike = UNIT_CONFIG, folder: str | os.PathLike = "out/fresh_unit", *,
               analysis_threads: int | None = UNIT_ANALYSIS_THREADS) -> dict:
    """Compute a one-unit study live into ``folder`` (no extraction cache: a real forward pass).

    Parameters
    ----------
    config : str or PathLike
        The study config (default `UNIT_CONFIG`); it must have one unit.
    folder : str or PathLike
        Its results folder here (a fresh folder computes everything).
    analysis_threads : int, optional
        BLAS threads of the unit's analysis (default `UNIT_ANALYSIS_THREADS`; None: the study's
        default, this process's share of its cores). Not a setting of the config hash.

    Returns
    -------
    dict of str to DataFrame
        The unit's combined tables, read back from ``folder`` (``ntps_nb.study.load_results``).

    Raises
    ------
    ValueError
        When the config has more than one unit.
    """
    from tqdm.auto import tqdm

    from ntps_nb.study import load_config, load_results, run_study
    from ntps_nb.study.stages import ANALYSIS_STAGES

    cfg = load_config(config, results_dir=str(Path(folder).resolve()), analysis_threads=analysis_threads)
    if len(cfg.units()) != 1:
        raise ValueError(f"{config} has {len(cfg.units())} units; the fresh-unit check computes one")
    (model, dataset), = cfg.units()
    phases = ["load_dataset", "extract_train", "extract_test", *ANALYSIS_STAGES]
    with tqdm(total=len(phases), desc=f"{model} x {dataset}", unit="phase", dynamic_ncols=True) as bar:
        run_study(cfg, log=_progress_log(bar, phases))
        bar.n = len(phases)
        bar.set_postfix_str("done")
    return load_results(cfg)


def _format_headline(table: pd.DataFrame) -> str:
    lines = [f"  {'':34} {'layer':>5} {'committed':>10} {'fresh':>10}  difference"]
    for row in table.itertuples(index=False):
        same = row.difference == 0 or (np.isnan(row.committed) and np.isnan(row.fresh))
        diff = "same" if same else f"{row.difference:+.2e}"
        lines.append(f"  {row.quantity:34} {row.layer:>5} {row.committed:>10.4g} {row.fresh:>10.4g}  {diff}")
    return "\n".join(lines)


def _format_comparison(table: pd.DataFrame) -> str:
    lines = [f"  {'table / column':24} {'values':>7} {'differing':>9} {'max |diff|':>10}  largest at"]
    for name, group in table.groupby("table", sort=False):
        first = group.iloc[0]
        lines.append(f"  {name}: rows committed {first.rows_committed}, fresh {first.rows_fresh}, "
                     f"paired {first.rows_paired}" + (f" ({first.rows_unpaired} on one side only)"
                                                      if first.rows_unpaired else ""))
        for row in group.itertuples(index=False):
            lines.append(f"    {row.column:22} {row.values:>7} {row.values_differing:>9} {row.max_abs_diff:>10.3g}  "
                         f"{row.where}")
    return "\n".join(lines)


def check_fresh_unit(config: str | os.PathLike, folder: str | os.PathLike, *,
                     say: Callable[[str], None] = print) -> pd.DataFrame | None:
    """Compute the unit of ``config`` live (`fresh_unit`) and print it beside its committed results.

    Prints the headline numbers side by side (`headline_comparison`), the maximum absolute
    difference per table and column (`compare_tables`, also written to ``<folder>/comparison.csv``), a plain
    verdict, and `KERNEL_NOTE` with this CPU's kernels when anything differs.

    Parameters
    ----------
    config : str or PathLike
        A one-unit study config whose results are committed (its default results folder).
    folder : str or PathLike
        Where the fresh unit is computed.
    say : callable
        Receives the printed text.

    Returns
    -------
    DataFrame or None
        `compare_tables`'s result, or None when there are no committed results to compare with.
    """
    from ntps_nb.study import load_config, load_results

    committed_cfg = load_config(config)
    fresh = fresh_unit(config, folder)
    try:
        committed = load_results(committed_cfg)
    except FileNotFoundError:
        say(f"no committed results of {committed_cfg.name!r} in {committed_cfg.folder}: nothing to compare with")
        return None
    hashes = {str(h) for t in (committed, fresh) for frame in t.values() for h in frame.get("config_hash", [])}
    if len(hashes) > 1:
        say(f"warning: the committed and fresh tables carry different config hashes {sorted(hashes)}: "
            "the config changed since the committed unit was computed")
    k = 8
    say(f"\nheadline numbers, committed ({_shown(committed_cfg.folder)}) and fresh ({_shown(folder)}):")
    say(_format_headline(headline_comparison(committed, fresh, k=k)))
    comparison = compare_tables(committed, fresh)
    comparison.to_csv(Path(folder) / "comparison.csv", index=False)
    say("\nevery compared value, per table and column (theory NTPS rows, held-out probes, peers, intervals):")
    say(_format_comparison(comparison))
    if bool(comparison["same"].all()):
        say("\nthe fresh unit is the committed unit in every compared value (to the 7 significant digits the tables "
            "keep): the pipeline works on this machine.")
    else:
        kernels = cpu_kernels()
        unpaired = int(comparison.groupby("table")["rows_unpaired"].first().sum())
        ntps = comparison[(comparison["table"] == "ntps") & (comparison["column"] == "ntps")]
        largest = (f"; theory NTPS by up to {ntps['max_abs_diff'].iloc[0]:.3g} ({ntps['where'].iloc[0]})"
                   if len(ntps) and ntps["max_abs_diff"].iloc[0] > 0 else "")
        say(f"\nTHE FRESH UNIT DIFFERS from the committed one: {int(comparison['values_differing'].sum())} of "
            f"{int(comparison['values'].sum())} compared values differ{largest}; {unpaired} row(s) on one side only.")
        mkl = f"MKL_CBWR={kernels['mkl_cbwr']}" if kernels["mkl_cbwr"] else "MKL its own dispatch"
        say(f"This machine's kernels: torch {kernels['torch']}, OpenBLAS {', '.join(kernels['openblas']) or '?'}, "
            f"{mkl} (the committed unit: torch {REFERENCE_KERNELS['ATEN_CPU_CAPABILITY'].upper()}, OpenBLAS "
            f"{REFERENCE_KERNELS['OPENBLAS_CORETYPE']}, MKL_CBWR={REFERENCE_KERNELS['MKL_CBWR']}).\n" + KERNEL_NOTE)
    return comparison


def _shown(path: str | os.PathLike) -> str:
    """A path as short as it reads: relative to the working folder when inside it."""
    path = Path(path).resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def _comparison_html(comparison: pd.DataFrame | None, folder: Path) -> str:
    """The fresh-unit check as a paragraph and a table for the report's index."""
    if comparison is None:
        return ""
    same = bool(comparison["same"].all())
    verdict = ("agrees with the committed unit in every compared value" if same else
               "differs from the committed unit (see the job's output: CPU kernels other than the AVX2 ones it "
               "was computed with move ill-determined NTPS values at this tiny size)")
    shown = comparison[["table", "column", "rows_committed", "rows_fresh", "rows_paired", "values",
                        "values_differing", "max_abs_diff", "where"]]
    return (f"<h2>Fresh unit computed on this machine</h2><p>SmolLM2-135M on TREC-6, 40 texts "
            f"(<code>{html.escape(_shown(folder))}</code>): {html.escape(verdict)}.</p>"
            + shown.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0))


# -- the job ---------------------------------------------------------------------------------------


def main_job(out: str | os.PathLike, *, unit_config: str | os.PathLike = UNIT_CONFIG,
             results: str | os.PathLike = DEFAULT_RESULTS, study: str | os.PathLike | None = None,
             jobs: int | None = None, say: Callable[[str], None] = print) -> int:
    """Run the main job into ``out``: the fresh unit beside the committed one, then the report.

    Parameters
    ----------
    out : str or PathLike
        Output folder: ``fresh_unit/`` (or ``results/`` with ``study``) and ``report/``.
    unit_config : str or PathLike
        The one-unit study computed live (default `UNIT_CONFIG`).
    results : str or PathLike
        The committed results the report shows (default `DEFAULT_RESULTS`).
    study : str or PathLike, optional
        Instead of the fresh unit and ``results``: compute this study into ``<out>/results`` and
        report on it.
    jobs : int, optional
        Notebooks executed at once (default ``ntps_nb.notebooks.default_jobs()``).
    say : callable
        Receives the printed text.

    Returns
    -------
    int
        0 when the unit (or study) was computed and every notebook ran, else 1.

    Raises
    ------
    FileNotFoundError, ValueError
        Before any work: a unit config or study config that cannot be read, a results folder
        without a combined study, or ``jobs`` below 1.
    """
    from ntps_nb.core.validation import check_count
    from ntps_nb.notebooks import check_results_folder, default_jobs, run_report
    from ntps_nb.study import load_config

    # what the job reads is checked before its minutes of work: a setting error is not a failed fresh unit
    jobs = check_count(jobs, "jobs") if jobs is not None else None
    if study is None:
        load_config(unit_config)
        check_results_folder(results)
    started = time.perf_counter()
    out = Path(out).resolve()
    status, comparison, fresh_folder = 0, None, out / "fresh_unit"
    step = time.perf_counter()
    if study is None:
        say(f"main job, 1/2: one study unit computed live ({_shown(unit_config)}) -> {_shown(fresh_folder)}")
        try:
            comparison = check_fresh_unit(unit_config, fresh_folder, say=say)
        except Exception as error:  # the report still runs; the job fails at the end
            status = 1
            say(f"THE FRESH UNIT FAILED: {type(error).__name__}: {error}")
    else:
        from ntps_nb.study import run_study

        cfg = load_config(study, results_dir=str(out / "results"))
        say(f"main job, 1/2: study {cfg.name!r} ({len(cfg.models)} model(s) x {len(cfg.datasets)} datasets) "
            f"-> {_shown(cfg.folder)}")
        run_study(cfg)
        results = cfg.folder
    first_step = time.perf_counter() - step
    report = out / "report"
    jobs = jobs if jobs is not None else default_jobs()
    step = time.perf_counter()
    say(f"\nmain job, 2/2: the notebook series executed on {_shown(results)} ({jobs} at a time) -> {_shown(report)}")
    entries = run_report(results, report, jobs=jobs, log=say, extra_html=_comparison_html(comparison, fresh_folder))
    failed = [e.name for e in entries if not e.ok]
    status = status or int(bool(failed))
    report_step, minutes = time.perf_counter() - step, (time.perf_counter() - started) / 60
    say(f"\nmain job {'done' if status == 0 else 'FINISHED WITH FAILURES'} in {minutes:.1f} min "
        f"({'fresh unit' if study is None else 'study'} {first_step / 60:.1f} min, report {report_step / 60:.1f} min).")
    if study is None:
        verdict = ("failed" if comparison is None and status else "no committed unit to compare" if comparison is None
                   else "agrees with the committed unit" if bool(comparison["same"].all())
                   else "differs from the committed unit (explained above)")
        say(f"  fresh unit: {_shown(fresh_folder)}  ({verdict}; comparison.csv)")
    else:
        say(f"  study results: {_shown(results)}")
    say(f"  report:     {_shown(report / 'index.html')}  ({len(entries) - len(failed)} of {len(entries)} notebooks ran"
        + (f"; FAILED: {', '.join(failed)}" if failed else "") + ")")
    say(f"              open it in a browser; the executed notebooks rerun where they lie "
        f"(.venv/bin/jupyter lab {_shown(report)})")
    if study is None:
        say(f"The longer fast study (SmolLM2 and its random control on 4 datasets, ~30 min on 2 cores), computed "
            f"here with its report:\n  .venv/bin/python -m ntps_nb run --study {_shown(FAST_CONFIG)}")
    return status
