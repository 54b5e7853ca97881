"""The ``python -m ntps_nb study run|status|combine|summary CONFIG`` commands."""

from __future__ import annotations

import contextlib

import pandas as pd

from ntps_nb.study.config import CSV_FLOAT_FORMAT, load_config
from ntps_nb.study.report import TARGET_ALIASES, TARGETS, resolve_targets


def _study():
    """The package itself, looked up when a command runs (so a test may replace one of its functions)."""
    import ntps_nb.study

    return ntps_nb.study

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
    overrides = {key: value for key, value in (("device", args.device), ("analysis_device", args.analysis_device),
                                               ("analysis_threads", args.analysis_threads),
                                               ("torch_threads", args.torch_threads)) if value is not None}
    cfg = load_config(args.config, **overrides)
    with _terminate_as_exit():
        table = _study().run_study(cfg, units_limit=args.units_limit, replace_stale=args.replace_stale,
                                   models=args.models, datasets=args.datasets, processes=args.processes,
                                   update_stages=args.update_stages, stages=args.stages)
    done = table[table["status"] == "done"]
    if len(done):
        print(f"computed {len(done)} unit(s): mean {done['seconds'].mean():.1f} s, total {done['seconds'].sum():.1f} s")
    return 0


def _cli_status(args) -> int:
    cfg = load_config(args.config)
    table = _study().study_status(cfg, k=args.k)
    counts = table["status"].value_counts().to_dict()
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        print(f"study {cfg.name} ({cfg.config_hash}): {len(table)} units, "
              + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
        print(table.drop(columns=["finished"], errors="ignore").to_string(index=False, na_rep=""))
        for row in table[table["status"] == "running"].itertuples(index=False):
            print(f"running: {row.model} x {row.dataset}, {row.finished}")
        stages = _study().stage_status(cfg)
        print("\nstages under the current settings (complete: reused by the next run; stale or missing: computed):")
        print(stages.to_string(index=False))
    return 0


def _cli_combine(args) -> int:
    _study().combine(load_config(args.config))
    return 0


def _cli_summary(args) -> int:
    cfg = load_config(args.config)
    tables = _study().load_units(cfg) if args.partial else _study().load_results(cfg)
    targets = resolve_targets(args.targets)  # "kappa" is kappa_chance
    # the controls first: a --k the study lacks is said before the minute the summary takes
    controls = _study().structure_controls(tables, k=args.k, targets=[t for t in targets if t in TARGETS],
                                           n_boot=args.n_boot, n_perm=args.n_perm)
    summary = _study().summarise(tables, n_perm=args.n_perm, n_boot=args.n_boot, targets=targets)
    if args.partial:
        counts = tables["probes"].groupby("model")["dataset"].nunique()
        print(f"INTERIM: the complete units of {cfg.name!r} so far (datasets per model: {counts.to_dict()} of "
              f"{len(cfg.datasets)}); numbers will change as units land\n")
    shown = summary[summary["target"].isin(targets)]
    cols = ["model", "target", "score", "selection", "estimate", "lower", "upper", "p_value", "p_side", "p_mc_se",
            "config", "n_distinct_configs"]
    reliability = _study().estimates_summary(tables)  # empty for studies computed before the estimates stage
    if args.markdown:
        print(_study().summary_markdown(summary, targets=targets))
        if not controls.empty:
            print(f"\nBeyond dataset structure (theory NTPS at each model's last layer, k = {args.k}):\n")
            print(_study().structure_markdown(controls))
        if not reliability.empty:
            print("\nNTPS estimates flagged reliable by their estimator (estimates table, interval layers):\n")
            print(_study().estimates_markdown(reliability))
    else:
        with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
            print(f"study {cfg.name}: Spearman rho across datasets (targets: {summary['target_protocol'].iloc[0]} probes "
                  f"at the last layer; n_datasets = {sorted(summary['n_datasets'].unique().tolist())})")
            print(shown[cols].to_string(index=False))
            if not controls.empty:
                print(f"\nbeyond dataset structure (theory NTPS at each model's last layer, k = {args.k}; "
                      "the estimate is Kendall's tau over model pairs for across_models)")
                print(controls.drop(columns=["k"]).to_string(index=False))
            if not reliability.empty:
                print("\nNTPS estimates flagged reliable by their estimator (estimates table, interval layers)")
                print(reliability.to_string(index=False))
    if args.output:
        summary.to_csv(args.output, index=False, float_format=CSV_FLOAT_FORMAT)
    return 0


def register_cli(subparsers) -> None:
    """Add ``study run|status|combine|summary CONFIG`` to the ``python -m ntps_nb`` parser.

    Parameters
    ----------
    subparsers : argparse subparsers action
        The parser's sub-command group (``add_subparsers``'s result).

    Returns
    -------
    None
    """
    study = subparsers.add_parser("study", help="run, combine and summarise a study grid (studies/*.toml)")
    sub = study.add_subparsers(dest="study_command", required=True)
    run = sub.add_parser("run", help="compute the missing units of a study, then combine")
    run.add_argument("config", help="the study's TOML file (studies/*.toml)")
    run.add_argument("--units-limit", type=int, default=None, help="compute at most N units in this call")
    run.add_argument("--replace-stale", action="store_true", help="recompute units computed with other settings")
    run.add_argument("--update-stages", action="store_true",
                     help="recompute the stages of complete units that this package version computes anew (e.g. "
                          "LoRA results of stage version 1, without per-text predictions); the others are reused")
    run.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                     help="with --update-stages: update only these of the outdated stages (e.g. estimates); the "
                          "others keep what the unit folders hold")
    run.add_argument("--models", nargs="+", default=None,
                     help="only these models of the grid (processes started on one study share it anyway: "
                          "each claims its units)")
    run.add_argument("--datasets", nargs="+", default=None, help="only these datasets of the grid")
    run.add_argument("--device", default=None, help='where the models run ("cuda", "cuda:1"; default cpu); '
                     "not part of the config hash, recorded in each unit's unit.json")
    run.add_argument("--analysis-device", default=None,
                     help='where the analysis computes: "auto" (default: the torch backend on the model\'s device '
                          'when that is a GPU, else numpy), "numpy", or a torch device ("cuda", "cpu"); recorded per unit')
    run.add_argument("--processes", type=int, default=1,
                     help="worker processes to start on the study (they share the grid unit by unit); each "
                          "analyses with the cores this process may use // N BLAS threads")
    run.add_argument("--analysis-threads", type=int, default=None,
                     help="BLAS/OpenMP threads of each process's analysis (default: the cores this process may use "
                          "// --processes, or // NTPS_NB_ANALYSIS_PROCESSES when you start several runs yourself)")
    run.add_argument("--torch-threads", type=int, default=None, help="torch threads of the forward passes (default 1)")
    run.set_defaults(func=_cli_run)
    stat = sub.add_parser("status", help="which units are complete, their time and headline numbers")
    stat.add_argument("config", help="the study's TOML file (studies/*.toml)")
    stat.add_argument("--k", type=int, default=8, help="k of the theory NTPS column (last layer)")
    stat.set_defaults(func=_cli_status)
    comb = sub.add_parser("combine", help="concatenate the complete units into the study tables")
    comb.add_argument("config", help="the study's TOML file (studies/*.toml)")
    comb.set_defaults(func=_cli_combine)
    summ = sub.add_parser("summary", help="rho of NTPS vs probes per model, with baselines and controls")
    summ.add_argument("config", help="the study's TOML file (studies/*.toml)")
    summ.add_argument("--targets", nargs="+", default=["accuracy", "kappa_chance", "lora_gain"],
                      choices=[*TARGETS, *TARGET_ALIASES, "lora_gain"],
                      help="lora_gain: where the study ran LoRA; kappa: kappa_chance (the 1/C-corrected accuracy); "
                           "balanced_accuracy, cohen_kappa: where the study has the cross-validated probe")
    summ.add_argument("--n-perm", type=int, default=2000,
                      help="permutations of every p-value (exact enumeration where n! is smaller)")
    summ.add_argument("--n-boot", type=int, default=1000,
                      help="bootstrap resamples of the datasets for every rho's 95%% interval")
    summ.add_argument("--output", default=None, help="also write the full summary as CSV")
    summ.add_argument("--markdown", action="store_true", help="print a Markdown table (README's Results form)")
    summ.add_argument("--k", type=int, default=8, help="k of the fixed-configuration controls (last layer)")
    summ.add_argument("--partial", action="store_true",
                      help="an interim look: read the complete units directly (the study need not be combined)")
    summ.set_defaults(func=_cli_summary)
