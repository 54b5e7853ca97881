"""Two ideas for NTPS below N/d = 8, where the flag accepts nothing, checked on known truth (issue 21).

The default row (`ntps_estimate`: richardson, the quadratic interval, the reliability flag) refuses every row at
N/d <= 4 and nearly every row at 8, because the estimated subspaces are not resolved there. On the Markov family
every row's interval nevertheless covers 0.86-0.91 from N/d = 2 (docs/estimator.md, "Families the calibration
never saw"), which suggested two things this script measures, on the same draws:

1. **A flag condition on NTPS's own stability instead of the subspaces'**, at no extra factorisation: a row whose
   extrapolation is small against its noise, |richardson - plug-in| / se at most c ("correction"), or whose
   jackknife bias estimate is, |bias_jackknife| / se at most c ("jackknife bias"), with the interval meeting
   [0, 1] and richardson's halves (less a shard) holding more texts than d (outside that the pooled moments or
   the halves fit the labels exactly, docs/estimator.md, "Fewer texts than dimensions"). If the rows these
   conditions accept covered within [0.85, 0.95] on every family, "reliable or stable" would be a flag with power
   below N/d = 8. The thresholds c are fixed here (0.25, 0.5, 1), not chosen on the output.
2. **Disattenuation**: NTPS from half-sample subspaces corrected for their unreliability, as Spearman's
   correction for attenuation corrects a correlation. If each half's projector is on average a P + (1 - a) (k / r) I
   (isotropic attenuation toward chance in the r whitened dimensions), the cross-half overlap c = ||P_UA P_VB||^2 /
   k_U has expectation a_U a_V NTPS + (1 - a_U a_V) k / r, and a^2 comes from the overlap of the two halves'
   estimates of the same subspace, (rho - k / r) / (1 - k / r). The estimate is (c - k / r) / (a_U a_V) + k / r,
   clipped to [0, 1] (the a^2 floored at 1e-6). Not an option of the package: a prototype, defined here.

    python benchmarks/small_n_check.py --d 16 --seeds 600 --ratios 2 4 8 32 --draws 60 --out D/small_n_d16.csv.gz
    python benchmarks/small_n_check.py --report D/small_n_d16.csv.gz
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from estimator_flag_report import MIN_ACCEPTED, exact_band_tests  # noqa: E402
from estimator_map import draw_ranges  # noqa: E402
from unseen_family_check import failures, population, print_failures  # noqa: E402

from ntps_nb.core.estimators import (RANGE_RTOL, _m_of, _whitened_bases, _Whitening, estimate_ntps,  # noqa: E402
                                     ntps_estimate, split_halves)
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.simulate import sample_shards  # noqa: E402

#: The stability thresholds (|statistic| / se at most this), fixed before any frame was read.
THRESHOLDS = (0.25, 0.5, 1.0)
#: The floor of an estimated squared attenuation factor a^2 (a division by it follows).
A2_FLOOR = 1e-6
#: The columns of `ntps_estimate` kept per row.
KEPT = ["estimate", "se", "lower", "upper", "reliable", "subspace_noise", "gap_ratio", "bias_jackknife"]


def _overlap(a: np.ndarray, b: np.ndarray, ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """||A_ka^T B_kb||_F^2 for each pair (first ka columns of a, first kb of b)."""
    return np.array([np.sum((a[:, :i].T @ b[:, :j]) ** 2) for i, j in zip(ka, kb)])


def disattenuated(shards: list[Moments], ks: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """The half-sample disattenuated NTPS (module docstring, 2) and its parts at each k."""
    full = Moments.combine(shards)
    white = _Whitening.of(full.Sxx, RANGE_RTOL)
    r, m = white.s.size, _m_of(full, white)
    a, b = split_halves(len(shards), seed)
    (uA, vA), (uB, vB) = (_whitened_bases(Moments.combine([shards[i] for i in half]), white, RANGE_RTOL)
                          for half in (a, b))
    k_u = np.minimum(ks, m)
    cross = (_overlap(uA, vB, k_u, ks) + _overlap(uB, vA, k_u, ks)) / 2 / k_u
    a2_u = (_overlap(uA, uB, k_u, k_u) / k_u - k_u / r) / (1 - k_u / r)
    a2_v = (_overlap(vA, vB, ks, ks) / ks - ks / r) / (1 - ks / r)
    attenuation = np.sqrt(np.maximum(a2_u, A2_FLOOR) * np.maximum(a2_v, A2_FLOOR))
    value = np.clip((cross - ks / r) / attenuation + ks / r, 0.0, 1.0)
    return pd.DataFrame({"disattenuated": value, "cross": cross, "a2_U": a2_u, "a2_V": a2_v})


def one_task(args) -> pd.DataFrame:
    family, d, C, gap, seed, ratios, ks, (first, draws), n_shards = args
    model = population(family, d, C, gap, 0.7, seed, None)
    ks = np.array([k for k in ks if k <= d // 2])
    truth = model.population_ntps(ks)
    parts = []
    for ratio, draw in itertools.product(ratios, range(first, first + draws)):
        n_texts = max(int(round(ratio * d)), n_shards)
        shards = sample_shards(model, n_texts, n_shards, np.random.default_rng([seed, int(ratio * 1000), draw]))
        with warnings.catch_warnings():  # rows carry n_over_d: N <= d is theirs to read
            warnings.simplefilter("ignore")
            try:
                row = ntps_estimate(shards, ks).reindex(columns=KEPT).assign(failure="")
                row["plugin"] = estimate_ntps(shards, ks).estimate
            except (ValueError, np.linalg.LinAlgError) as error:  # kept: a draw the package cannot estimate
                row = pd.DataFrame({"failure": [f"{type(error).__name__}: {error}"] * ks.size})
            try:
                row = pd.concat([row, disattenuated(shards, ks)], axis=1)
            except ValueError:  # a half with one class (small N, imbalanced priors): no prototype value
                pass
        parts.append(row.assign(task_family=family, task_d=d, task_n_classes=C, task_gap=gap, task_seed=seed,
                                n_over_d=ratio, n_texts=n_texts, n_shards=n_shards, draw=draw, k=ks, truth=truth))
    return pd.concat(parts, ignore_index=True)


def run(args) -> None:
    tasks = [(family, d, C, gap, seed, args.ratios, args.ks, span, args.shards)
             for family, d, C, gap, seed in itertools.product(args.families, args.d, args.classes, args.gaps,
                                                              args.seeds)
             if C <= d // 2 for span in draw_ranges(args.draws, args.chunks)]
    start = time.time()
    with ProcessPoolExecutor(args.processes) as pool:
        frame = pd.concat(pool.map(one_task, tasks), ignore_index=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"{len(tasks)} tasks, {len(frame)} rows, {time.time() - start:.0f} s on {args.processes} processes")


CELL = ["task_family", "task_d", "task_n_classes", "task_gap", "task_seed", "n_over_d", "k"]
BY = ["task_family", "task_d", "n_over_d"]


def _accepted(rows: pd.DataFrame, name: str, accept: pd.Series) -> dict:
    kept = rows[accept]
    cells = kept.groupby(CELL).agg(sum=("covered", "sum"), size=("covered", "size"))
    cells = cells[cells["size"] >= MIN_ACCEPTED]
    below, above = exact_band_tests(cells["sum"].astype(int), cells["size"])
    return {"condition": name, "accepted": accept.mean(), "rows": len(kept), "coverage": kept["covered"].mean(),
            "cells": len(cells), "below": int(below.sum()), "above": int(above.sum())}


def report(paths: list[str]) -> None:
    f = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    print_failures(f, "left out below")
    f = f[np.isfinite(f["truth"]) & np.isfinite(f["se"])].copy()
    f["covered"] = (f["lower"] <= f["truth"]) & (f["truth"] <= f["upper"])
    correction = (f["estimate"] - f["plugin"]).abs() / f["se"]
    jackknife_bias = f["bias_jackknife"].abs() / f["se"]
    # a half less a shard must hold more texts than d (richardson's halves do not fit the labels exactly)
    sane = ((f["n_texts"] / 2 - f["n_texts"] / f["n_shards"] > f["task_d"])
            & (f["lower"] <= 1) & (f["upper"] >= 0))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 500)
    print(f"{len(f)} rows in {f.groupby(CELL).ngroups} cells; nominal 0.90; cells counted with at least "
          f"{MIN_ACCEPTED} accepted rows, exact one-sided binomial tests at 2.5% against 0.85 and 0.95")
    print("\n1. Every row, the flag's rows, and the rows each stability condition accepts (halves above d, "
          "interval meeting [0, 1]), by family, d and N/d:")
    lines = []
    for keys, rows in f.groupby(BY):
        ok = sane.loc[rows.index]
        conditions = [("every row", pd.Series(True, index=rows.index)), ("flag", rows["reliable"].astype(bool))]
        for c in THRESHOLDS:
            conditions.append((f"correction <= {c}", ok & (correction.loc[rows.index] <= c)))
            conditions.append((f"jackknife bias <= {c}", ok & (jackknife_bias.loc[rows.index] <= c)))
        lines += [dict(zip(BY, keys)) | _accepted(rows, name, accept) for name, accept in conditions]
    print(pd.DataFrame(lines).rename(columns={"task_family": "family", "task_d": "d"}).round(3).to_string(index=False))
    print("\n2. Bias, SD and RMSE against the population NTPS (pooled over cells), and the median estimated "
          "squared attenuation factors a^2 of the half-sample subspaces:")
    errors = {name: f[name] - f["truth"] for name in ("plugin", "estimate", "disattenuated")}
    table = []
    for keys, rows in f.groupby(BY):
        line = dict(zip(BY, keys))
        for name, label in (("plugin", "plugin"), ("estimate", "richardson"), ("disattenuated", "disatt")):
            e = errors[name].loc[rows.index]
            line |= {f"{label} bias": e.mean(), f"{label} sd": e.std(), f"{label} rmse": np.sqrt(np.mean(e**2))}
        table.append(line | {"a2_U": rows["a2_U"].median(), "a2_V": rows["a2_V"].median()})
    print(pd.DataFrame(table).rename(columns={"task_family": "family", "task_d": "d"}).round(3).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="*", default=None, help="report these per-draw frames instead of running")
    parser.add_argument("--families", nargs="+", default=["factor", "lds", "markov"])
    parser.add_argument("--d", type=int, nargs="+", default=[16])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--gaps", nargs="+", default=["separated", "moderate", "tied"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[600], help="population seeds (and of their draws)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--draws", type=int, default=60)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=1, help="tasks per population (ranges of its draws)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="small_n.csv.gz")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
