"""The estimators' frames as the package computes them now, against the package at a git revision.

For a change meant to save work without changing a number (a solve shared instead of repeated), this says
whether it did: the same calls on the same simulated shards (two generator families, 4-20 shards, 12-1,024
texts at d = 16, some below the rank of Sxx) through the package at ``REV`` (extracted with ``git archive``
into a temporary folder) and through the working tree, each in its own interpreter, then compared: how many
results are identical to the bit, and the largest difference among the rest. The calls: `ntps_estimate` with
"richardson" (its default interval, the jackknife-t one and the rotation interval), "extrapolate" and "plugin";
`ntps_sweep` and `ntps` at k = 1, 2, 5 with six estimators; and, where torch is installed, `ntps_estimate` on
the CPU through the torch backend, with its default and its rotation interval (batched solves: rounding may
differ between batchings), and the torch backend's plug-in `ntps_sweep` (theory, centred and reference variants),
`ntps` at k = 1, 2, 5 and `ntps_interval` at k = 2 (estimate, bounds, standard errors and replicates).

    python benchmarks/frames_at_revision.py 2704f58 > benchmarks/results/estimator_cost/frames_at_2704f58.txt
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
SWEEP_ESTIMATORS = ("plugin", "richardson", "extrapolate", "crossfit", "jackknife", "debiased")


def frames() -> dict:
    """Every call's result by a key naming it (an error's repr where it raised)."""
    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.intervals import ntps_interval
    from ntps_nb.core.score import ntps, ntps_sweep
    from ntps_nb.core.simulate import factor_model, lds_model, sample_shards

    try:
        import torch  # noqa: F401
        devices = [None, "cpu"]
    except ImportError:
        devices = [None]
    calls = {}
    for family, model in (("factor", factor_model(d=16, n_classes=6, seed=3)),
                          ("lds", lds_model(d=16, n_classes=2, seed=4))):
        for n_texts, n_shards in ((12, 4), (64, 4), (256, 9), (512, 10), (1024, 20)):
            shards = sample_shards(model, n_texts, n_shards, np.random.default_rng(n_texts + n_shards))
            case = (family, n_texts, n_shards)
            for estimator, interval in (("richardson", None), ("richardson", "jackknife"), ("richardson", "rotation"),
                                        ("extrapolate", None), ("plugin", None)):
                calls[case + ("ntps_estimate", estimator, interval)] = (
                    lambda s=shards, e=estimator, i=interval: ntps_estimate(s, [1, 2, 4, 8], estimator=e, interval=i))
            for estimator in SWEEP_ESTIMATORS:
                calls[case + ("ntps_sweep", estimator)] = lambda s=shards, e=estimator: ntps_sweep(s, estimator=e)
                calls[case + ("ntps", estimator)] = (
                    lambda s=shards, e=estimator: np.array([ntps(s, k, estimator=e) for k in (1, 2, 5)]))
            if "cpu" in devices:
                calls[case + ("ntps_estimate", "richardson", "torch cpu")] = (
                    lambda s=shards: ntps_estimate(s, [1, 2, 4, 8], device="cpu"))
                calls[case + ("ntps_estimate", "richardson", "torch cpu, rotation")] = (
                    lambda s=shards: ntps_estimate(s, [1, 2, 4, 8], device="cpu", interval="rotation"))
                for how, options in (("torch cpu", {}), ("torch cpu, centred", {"centred": True}),
                                     ("torch cpu, reference", {"variant": "reference"})):
                    calls[case + ("ntps_sweep", "plugin", how)] = (
                        lambda s=shards, o=options: ntps_sweep(s, device="cpu", **o))
                calls[case + ("ntps", "plugin", "torch cpu")] = (
                    lambda s=shards: np.array([ntps(s, k, device="cpu") for k in (1, 2, 5)]))
                calls[case + ("ntps_interval", "plugin", "torch cpu")] = lambda s=shards: _interval_numbers(
                    ntps_interval(s, 2, n_boot=40, device="cpu", progress=False))
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, call in calls.items():
            try:
                out[key] = call()
            except Exception as error:  # noqa: BLE001 - the same error on both sides is agreement
                out[key] = repr(error)
    return out


def _interval_numbers(interval) -> np.ndarray:
    """An interval's estimate, bounds, standard errors and bootstrap replicates as one array."""
    return np.concatenate([[interval.estimate, interval.lower, interval.upper, interval.se_bootstrap,
                            interval.se_jackknife], interval.replicates])


def difference(a, b) -> float | None:
    """0.0 where identical to the bit, the largest absolute difference of the numbers otherwise (inf where
    the shapes, columns, NaN patterns or errors differ); None where both raised the same error."""
    if isinstance(a, str) or isinstance(b, str):
        return None if a == b else float("inf")
    if isinstance(a, pd.DataFrame):
        if list(a.columns) != list(b.columns) or a.shape != b.shape:
            return float("inf")
        if a.equals(b):
            return 0.0
        numbers = a.select_dtypes("number").columns
        if not a.drop(columns=numbers).equals(b.drop(columns=numbers)):
            return float("inf")
        a, b = a[numbers].to_numpy(float), b[numbers].to_numpy(float)
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    return float(np.nanmax(np.abs(a - b), initial=0.0))


def ignored(then: dict, now: dict, columns: list[str]) -> None:
    """Drop ``columns`` from every frame of both runs (in place), first printing, per column, how many frames have
    it on each side and in how many rows of the frames that have it on both it differs."""
    for column in columns:
        frames = [(then[key], now[key]) for key in then if isinstance(then[key], pd.DataFrame)
                  and isinstance(now[key], pd.DataFrame)]
        both = [(a[column], b[column]) for a, b in frames if column in a and column in b and len(a) == len(b)]
        rows = sum(int((~((x == y) | (x.isna() & y.isna()))).sum()) for x, y in both)
        print(f"--ignore {column}: in {sum(column in a for a, _ in frames)} frames then, "
              f"{sum(column in b for _, b in frames)} now; {rows} of {sum(len(x) for x, _ in both)} rows differ "
              "where both have it")
    for run in (then, now):
        for key, value in run.items():
            if isinstance(value, pd.DataFrame):
                run[key] = value.drop(columns=[c for c in columns if c in value])


def column_differences(key: tuple, a, b) -> list[dict]:
    """One row per numeric column of a frame result (or one for an array), with its largest |difference|
    (inf where the NaN patterns differ) and its NaN counts on both sides."""
    pairs = ([(col, a[col], b[col]) for col in a.select_dtypes("number").columns] if isinstance(a, pd.DataFrame)
             else [("value", a, b)])
    rows = []
    for column, x, y in pairs:
        x, y = np.asarray(x, float), np.asarray(y, float)
        same = x.shape == y.shape and np.array_equal(np.isnan(x), np.isnan(y))
        rows.append({"family": key[0], "texts": key[1], "shards": key[2], "call": key[3], "estimator": key[4],
                     "how": key[5] if len(key) > 5 else "", "column": column,
                     "difference": float(np.nanmax(np.abs(x - y), initial=0.0)) if same else float("inf"),
                     "nan_then": int(np.isnan(x).sum()), "nan_now": int(np.isnan(y).sum())})
    return rows


def package_at(rev: str, folder: Path) -> Path:
    """Extract the package ``ntps_nb`` as it was at git revision ``rev`` into ``folder`` (``git archive``), and
    return ``folder``: put it first on PYTHONPATH to import that package."""
    archive = subprocess.run(["git", "archive", rev, "ntps_nb"], cwd=REPO, capture_output=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.tar").write_bytes(archive)
    with tarfile.open(folder / "package.tar") as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="the git revision to compare with")
    parser.add_argument("--detail", type=float, default=None, metavar="TOL",
                        help="also list every case and column whose results differ by more than TOL")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="COLUMN",
                        help="leave these columns out of every frame before comparing (a column the working tree "
                             "added, a flag it changed), and count the rows where each differs")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the child: pickle frames() here
    args = parser.parse_args()
    if args.write:
        import ntps_nb

        with open(args.write, "wb") as file:
            pickle.dump((str(Path(ntps_nb.__file__).parent), frames()), file)
        return
    if not args.rev:
        parser.error("give the git revision to compare with")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for name, root in (("then", package_at(args.rev, tmp / "then")), ("now", REPO)):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in sys.path if p]))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write", str(tmp / f"{name}.pkl")],
                           cwd=tmp, env=env, check=True)
            with open(tmp / f"{name}.pkl", "rb") as file:
                where, results[name] = pickle.load(file)
            if Path(where) != root / "ntps_nb":
                raise SystemExit(f"the {name} run imported the package from {where}, not from {root}")
    then, now = results["then"], results["now"]
    if then.keys() != now.keys():
        raise SystemExit("the two runs made different calls")
    if args.ignore:
        ignored(then, now, args.ignore)
    rows = []
    for key in then:
        rows.append({"call": key[3], "estimator": key[4], "how": key[5] if len(key) > 5 else "",
                     "difference": difference(then[key], now[key])})
    table = pd.DataFrame(rows)
    table["how"] = table["how"].fillna("default interval")
    summary = table.groupby(["call", "estimator", "how"], sort=False)["difference"].agg(
        results="size", both_raised=lambda d: int(d.isna().sum()), identical=lambda d: int((d == 0).sum()),
        largest_difference=lambda d: float(d.max()) if d.notna().any() else float("nan"))
    print(f"the package at {args.rev} against the working tree, {len(then)} results on simulated shards (d = 16)")
    print(summary.to_string())
    print(f"identical to the bit: {int((table['difference'] == 0).sum())} of {int(table['difference'].notna().sum())} "
          f"results that were computed on both sides ({int(table['difference'].isna().sum())} raised the same error "
          "on both)")
    if args.detail is not None:
        columns = pd.DataFrame([row for key in then if not isinstance(then[key], str) and not isinstance(now[key], str)
                                for row in column_differences(key, then[key], now[key])])
        moved = columns[columns["difference"] > args.detail]
        print(f"\ncases and columns that differ by more than {args.detail:g} (inf: the NaN patterns differ), "
              f"{len(moved)} of {len(columns)}:")
        print(moved.to_string(index=False) if len(moved) else "none")


if __name__ == "__main__":
    main()
