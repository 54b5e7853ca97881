"""Command line: ``python -m ntps_nb <command>``."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import numpy as np


#: Set (to anything) to see the traceback of an error the command line otherwise reports in one line.
TRACEBACK_ENV = "NTPS_NB_TRACEBACK"


def _demo(args: argparse.Namespace) -> int:
    """NTPS and the excess-loss bounds on planted synthetic tasks, as a small table."""
    import pandas as pd

    from ntps_nb import __version__
    from ntps_nb.core.theory import angle_sweep

    angles = np.radians(np.linspace(0, 90, args.angles))
    table = angle_sweep(angles, n_texts=args.n_texts, seed=args.seed)
    shown = table[["angle_deg", "k", "ntps", "cos2_angle", "lower_bound", "excess_loss", "upper_bound"]]
    print(f"ntps_nb {__version__}: NTPS (theory variant) on synthetic planted-angle tasks")
    settings = {key[5:]: value for key, value in table.iloc[0].items() if key.startswith("task_")}
    print("settings: " + ", ".join(f"{key}={value:g}" for key, value in settings.items()))
    print("DeltaL is the in-sample excess MSE of probing the k next-token features instead of the")
    print("best k features; the bounds are (lambda_kU - lambda_k+1) kU (1-NTPS) and lambda_1 kU (1-NTPS).")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(shown.to_string(index=False))
    ok = bool(((table.lower_bound <= table.excess_loss + 1e-12) & (table.excess_loss <= table.upper_bound + 1e-12)).all())
    print(f"bounds hold on every row: {ok}")
    return 0 if ok else 1


def _main_job(args: argparse.Namespace) -> int:
    """The README's first command (`make run`): `ntps_nb.main_job.main_job` into ``--out``."""
    import time

    from ntps_nb.main_job import main_job

    out = args.out or f"out/run-{time.strftime('%Y%m%d-%H%M%S')}"
    return main_job(out, unit_config=args.unit_config, results=args.results, study=args.study, jobs=args.jobs)


def _repository():
    """The source checkout this package runs from (where studies/ and data/ are)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ntps_nb`` argument parser: ``demo``, ``run`` and the sub-commands that the
    orchestration modules (study, lora, notebooks) register through their ``register_cli``.

    Returns
    -------
    argparse.ArgumentParser
        Each sub-command sets ``func``, the function that runs it on the parsed arguments.
    """
    parser = argparse.ArgumentParser(prog="python -m ntps_nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="NTPS and its bounds on synthetic planted-angle tasks")
    demo.add_argument("--angles", type=int, default=7, help="number of planted angles from 0 to 90 degrees")
    demo.add_argument("--n-texts", type=int, default=2000, help="texts of each planted task")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tasks")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="the main job: one study unit computed live beside the committed one, then "
                                     "every notebook executed on the committed default study (HTML + index.html)")
    run.add_argument("--out", help="output folder (default out/run-<date>-<time>)")
    run.add_argument("--unit-config", default=str(_repository() / "studies" / "ci_unit.toml"),
                     help="the one-unit study computed live and compared with its committed results "
                          "[studies/ci_unit.toml]")
    run.add_argument("--results", default=str(_repository() / "data" / "results" / "default-richardson"),
                     help="the committed study the report shows [data/results/default-richardson; the plug-in "
                          "study: data/results/default]")
    run.add_argument("--study", default=None, metavar="CONFIG",
                     help="instead: compute this study into <out>/results and report on it "
                          "(studies/fast.toml: ~30 min)")
    run.add_argument("--jobs", type=int, default=None, help="notebooks executed at once [2 on two or more cores]")
    run.set_defaults(func=_main_job)
    # Commands of the orchestration modules register themselves: each module that has a
    # ``register_cli(subparsers)`` adds its own sub-command (study, notebooks, ...).
    import importlib

    for module in ("ntps_nb.study", "ntps_nb.lora", "ntps_nb.notebooks"):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a missing dependency is a real error, not an absent module
                raise
            continue
        if hasattr(loaded, "register_cli"):
            loaded.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen sub-command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The sub-command's exit status; 2 for a ValueError or FileNotFoundError (a setting, a file or
        a table the command cannot use), which is printed as one line with where it was raised
        (the traceback with `TRACEBACK_ENV` set).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:  # a setting, a file, a table: said in one line
        if os.environ.get(TRACEBACK_ENV):
            raise
        frames = traceback.extract_tb(error.__traceback__)  # the check's caller, not the shared check
        frame = next((f for f in reversed(frames) if Path(f.filename).name != "validation.py"), frames[-1])
        print(f"python -m ntps_nb {args.command}: error: {error}\n  (raised at {Path(frame.filename).name}:"
              f"{frame.lineno}; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return 2
