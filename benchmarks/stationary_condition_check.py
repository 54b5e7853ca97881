"""A flag condition for stationary points of NTPS inside (0, 1): every principal angle between U_k
and V_k at 0 or 90 degrees within noise (issue 21, item 4; docs/estimator.md, "A variance without the
jackknife's quadratic excess", session 29).

NTPS_theory(k) is the mean of cos^2 of the principal angles between U_k and V_k (whitened); it is
stationary in every rotation of the two subspaces exactly where each angle is 0 or 90 degrees, and
there the jackknife-t interval over-covers (the reflection family at angle 0: truth 0.5 at k = 2).
The bound condition (`flag_at_bound`) sees only the case where all angles are at the same bound
(NTPS at 0 or 1). This script checks the condition that generalises it: a row is ``stationary`` when
every angle's cos^2, extrapolated to N = infinity the way richardson extrapolates NTPS (2 x pooled -
mean of the halves, with the estimator's split and weights), lies within ``--bound`` of its delete-one-
shard jackknife SEs of 0 or 1 (the plug-in's cos^2 is biased away from the bound by more than its SE
where the angle is at it, so unextrapolated angles are seldom within an SE of it). The flag as it
stands and the flag with ``~stationary`` added are compared per cell: coverage, bias / width and the
share of draws the condition marks. Not in the package.

With ``--interval quadratic`` (session 33) each draw is estimated with `ntps_estimate`'s defaults (the
quadratic interval on Satterthwaite degrees of freedom, the rotation condition) instead of session 29's
jackknife-t interval, and keeps the flag's steps (``candidate``: noise and eigengaps; ``meets``: and the
interval meets [0, 1]; ``rotation_stable``); the report then adds a tally of the flag's variants, stationary and
interior cells apart: the flag; without the rotation condition; the rotation condition waived on rows the
condition calls stationary (at a stationary point of the rotation NTPS moves over the Fieller set only to
second order, and the condition keeps the rows whose interval came out wide: docs/estimator.md, session 32);
and the flag with ``~stationary``.

Session 59: each row also has ``stationary_z``, its farthest angle from 0 or 1 in those SEs (the condition at bound b
holds where stationary_z < b; the package's ``stationary_distance``, now the flag's stationary condition at
`ntps_nb.core.estimators.STATIONARY_SE`), and ``--report ... --bounds B...`` tallies the flag with ``~stationary`` at
each bound. The frames' ``reliable`` is the flag before that condition (``stationary_flag=False``), which the variants
are built from.

    python benchmarks/stationary_condition_check.py --cells SPEC.json --out CSV [--bound 1] [--interval quadratic]
    python benchmarks/stationary_condition_check.py --report CSV... [--bounds 1 2 3]

SPEC.json as in `quadratic_variance_check.py` (a list of {"family", "settings", "ratio", "ks", "draws",
"seed"}).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.estimators import (  # noqa: E402
    GAP_MIN,
    NOISE_MAX,
    _halves,
    _pooled,
    _richardson_combination,
    _whitened_bases,
    _Whitening,
    flag_conditions,
    ntps_estimate,
)
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.score import InterpolationWarning  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quadratic_map_report import EDGE  # noqa: E402
from stationary_flag_check import band as cell_bands  # noqa: E402
from stationary_flag_check import candidates  # noqa: E402
from quadratic_variance_check import band, cells, draw_shards  # noqa: E402


def principal_cos2(moments: Moments, ks: np.ndarray) -> np.ndarray:
    """(K, max k) descending cos^2 of the principal angles between U_k (k_U directions) and V_k in the
    sample's own whitened coordinates; NaN beyond min(k, k_U, r_V) angles."""
    white = _Whitening.of(moments.Sxx, RANGE_RTOL)
    u, v = _whitened_bases(moments, white, RANGE_RTOL)
    out = np.full((ks.size, int(ks.max())), np.nan)
    for row, k in enumerate(ks):
        cos = np.linalg.svd(v[:, : min(k, v.shape[1])].T @ u[:, : min(k, u.shape[1])], compute_uv=False)
        out[row, : cos.size] = np.sort(cos**2)[::-1]
    return out


def extrapolated_cos2(shards: list[Moments], ks: np.ndarray, seed: int, drop: int | None) -> np.ndarray:
    """Each angle's cos^2 extrapolated as richardson extrapolates NTPS (the estimator's own halves of
    ``seed`` and its combination), on the shards less ``drop``."""
    pooled = _pooled(shards, drop)
    halves = _halves(shards, seed, drop)
    return _richardson_combination(principal_cos2(pooled, ks), [principal_cos2(h, ks) for h in halves],
                                   [h.n_texts for h in halves], pooled.n_texts)


def one_draw(args) -> pd.DataFrame:
    family, settings, ratio, ks, draw, seed, bound, interval = args
    ks = np.asarray(ks)
    with analysis_threads(1):
        truth, shards = draw_shards(family, settings, ratio, ks, draw, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            # "quadratic": ntps_estimate's defaults (the quadratic interval, the rotation condition), the flag
            # without its stationary condition (the variants below are built from the flag's steps before it)
            frame = ntps_estimate(shards, ks, seed=draw, interval=interval, stationary_flag=False)
        S = len(shards)
        cos2 = extrapolated_cos2(shards, ks, draw, None)
        loo = np.array([extrapolated_cos2(shards, ks, draw, i) for i in range(S)])
    se = np.sqrt((S - 1) / S * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
    distance = np.minimum(cos2, 1 - cos2)
    with np.errstate(invalid="ignore", divide="ignore"):
        near = (distance < bound * se) | (distance <= 1e-6)
        # the row's farthest angle from its bound in jackknife SEs: stationary at bound b where z < b
        z = np.where(np.isnan(cos2) | (distance <= 1e-6), 0.0, distance / se)
    stationary = np.where(np.isnan(cos2), True, near).all(axis=1)
    out = pd.DataFrame({
        "family": family, "settings": json.dumps(settings, sort_keys=True), "n_over_d": ratio, "seed": seed,
        "draw": draw, "k": ks, "truth": truth, "estimate": frame["estimate"], "se": frame["se"],
        "width": frame["upper"] - frame["lower"], "covered": (frame["lower"] <= truth) & (truth <= frame["upper"]),
        "reliable": frame["reliable"], "at_bound": frame["at_bound"], "stationary": stationary, "bound": bound,
        "stationary_z": np.max(z, axis=1)})
    if interval == "quadratic":  # the flag's steps, to compare its variants on the same rows
        out = out.assign(interval=interval, df=frame["df"], candidate=candidates(frame).to_numpy(),
                         meets=flag_conditions(frame["lower"], frame["upper"], frame["subspace_noise"],
                                               frame["gap_ratio"], noise_max=NOISE_MAX, gap_min=GAP_MIN),
                         rotation_stable=frame["rotation_stable"])
    return out


def report(paths: list[str], bounds: list[float] | None = None) -> None:
    frame = pd.concat([pd.read_csv(p, low_memory=False) for p in paths], ignore_index=True)
    rows = []
    for (family, settings, ratio, k), g in frame.groupby(["family", "settings", "n_over_d", "k"], sort=False):
        s = json.loads(settings)
        row = {"family": family, "d": s["d"], "C": s["n_classes"], "gap": s["gap"],
               "angle": round(s.get("angle", np.pi / 4), 3), "seed": s["seed"], "N/d": ratio, "k": k,
               "truth": round(g["truth"].iloc[0], 4), "draws": len(g)}
        reliable = g["reliable"].astype(bool)
        steps = ((("candidates", g["candidate"].astype(bool)), ("meets [0, 1]", g["meets"].astype(bool)))
                 if "meets" in g else ())
        not_stationary = ~g["stationary"].astype(bool)
        for name, keep in (*steps, ("flag as it is", reliable), ("with ~stationary", reliable & not_stationary)):
            h = g[keep]
            n, x = len(h), int(h["covered"].sum())
            bias = (h["estimate"] - h["truth"]).mean() / h["width"].mean() if n else np.nan
            row[name] = f"{x}/{n}" + (f" {x / n:.3f}{band(x, n)}, bias/width {bias:+.2f}" if n else "")
        row["stationary share"] = round(float(g["stationary"].mean()), 2)
        rows.append(row)
    pd.set_option("display.width", 300)
    print("'below' / 'above': exact one-sided binomial test against 0.85 / 0.95 at 2.5% (cells with >= 10 rows)")
    print(pd.DataFrame(rows).to_string(index=False))
    reliable = frame["reliable"].astype(bool)
    taken = reliable & frame["stationary"].astype(bool)
    edge = np.minimum(frame["truth"], 1 - frame["truth"]) <= 0.005
    print(f"\nrows the flag accepts: {int(reliable.sum())}; the condition takes {int(taken.sum())} of them, "
          f"{int((taken & edge).sum())} with truth within 0.005 of 0 or 1 and {int((taken & ~edge).sum())} elsewhere "
          f"({int((taken & ~edge & np.isclose(frame['truth'], 0.5)).sum())} at truth 0.5)")
    if "meets" in frame:
        variants_tally(frame.assign(stationary_row=frame["stationary"].astype(bool)))
    if bounds:
        bounds_tally(frame, bounds)


def at_stationary_point(truth: pd.Series, settings: pd.Series) -> pd.Series:
    """Whether each population value is at a stationary point of NTPS: within `EDGE` of 0 or 1, or the reflection
    family at angle 0 (``settings``: each row's population settings, parsed)."""
    return (np.minimum(truth, 1 - truth) <= EDGE) | settings.map(lambda s: s.get("angle", None) == 0)


def with_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with ``cell`` (population and N/d, named; heavy tails, an offset and a memory where the settings
    have them), ``covered`` as bool and ``stationary`` (the truth within `EDGE` of 0 or 1, or the reflection family
    at angle 0)."""
    settings = frame["settings"].map(json.loads)
    names = [f"{family} d={s['d']} C={s['n_classes']} {s['gap']} angle={s.get('angle', '-')}"
             + "".join(f" {key}={s[key]}" for key in ("tails", "offset", "memory") if key in s)
             + f" seed {s['seed']} N/d={r}"
             for family, s, r in zip(frame["family"], settings, frame["n_over_d"])]
    return frame.assign(cell=names, covered=frame["covered"].astype(bool),
                        stationary=at_stationary_point(frame["truth"], settings))


def bounds_tally(frame: pd.DataFrame, bounds: list[float]) -> None:
    """The flag with ``~stationary`` at each of ``bounds`` (jackknife SEs, read from the frames' ``stationary_z``,
    the row's farthest angle from 0 or 1 in its SEs), stationary and interior cells (>= 10 kept rows) apart: cells
    significantly outside [0.85, 0.95], the kept rows' coverage and |bias| / width, pooled and in the worst cell, and
    the share of the flag's rows the condition takes in each part."""
    if "stationary_z" not in frame:
        raise SystemExit("--bounds needs frames with stationary_z (run with this revision of the script)")
    frame = with_cells(frame)
    reliable = frame["reliable"].astype(bool)
    rows = []
    for bound in bounds:
        kept = reliable & ~(frame["stationary_z"] < bound)
        cells = cell_bands(frame, kept)
        for part in ("stationary", "interior"):
            c = cells[cells["stationary"] == (part == "stationary")]
            in_part = frame["stationary"] == (part == "stationary")
            flagged = int((reliable & in_part).sum())
            h = frame[kept & in_part & frame.set_index(["cell", "k"]).index.isin(c.index)]
            def bias_of(g: pd.DataFrame) -> float:
                return abs((g["estimate"] - g["truth"]).mean() / g["width"].mean())

            bias = (h.groupby(["cell", "k"]).apply(bias_of, include_groups=False) if len(h)
                    else pd.Series(dtype=float))
            left = kept & in_part
            rows.append({"bound": bound, "part": part, "flag's rows": flagged,
                         "taken": round(1 - int((kept & in_part).sum()) / flagged, 3) if flagged else np.nan,
                         "cells": len(c), "below": int(c["below"].sum()), "above": int(c["above"].sum()),
                         "rows": int(c["rows"].sum()),
                         "coverage": round(c["covered"].sum() / c["rows"].sum(), 3) if len(c) else np.nan,
                         "its SE": round(binomial_se(c["covered"].sum(), c["rows"].sum()), 3) if len(c) else np.nan,
                         "min cell": round((c["covered"] / c["rows"]).min(), 3) if len(c) else np.nan,
                         "max cell": round((c["covered"] / c["rows"]).max(), 3) if len(c) else np.nan,
                         "max |bias|/width": round(bias.max(), 3) if len(bias) else np.nan,
                         "kept anywhere": f"{int((left & frame['covered']).sum())}/{int(left.sum())}"})
    print("\nthe flag and ~stationary at each bound (cells with >= 10 kept rows; 'taken': share of the flag's rows in "
          "the part that the condition removes;\n'kept anywhere': covered / kept rows of the part in every cell, "
          "however few):")
    print(pd.DataFrame(rows).to_string(index=False))
    interior = frame[reliable & ~frame["stationary"]]
    for bound in bounds:
        taken = interior.assign(taken=interior["stationary_z"] < bound)
        cells = taken.groupby(["cell", "k"], sort=False).agg(
            truth=("truth", "first"), flagged=("taken", "size"), taken=("taken", "sum"), covered=("covered", "mean"))
        cells = cells[cells["taken"] > 0]
        print(f"\ninterior cells whose rows the condition takes at bound {bound:g} (flagged: the flag's rows before "
              f"it; covered: their coverage): {len(cells)}")
        if len(cells):
            print(cells.round(3).to_string())


def binomial_se(covered: int, rows: int) -> float:
    """The Monte Carlo standard error of a coverage of ``covered`` in ``rows``: sqrt(p (1 - p) / rows)."""
    p = covered / rows
    return float(np.sqrt(p * (1 - p) / rows))


def variants_tally(frame: pd.DataFrame) -> None:
    """Cells (population x N/d x k, >= 10 kept rows) of each flag variant significantly outside [0.85, 0.95]
    (`stationary_flag_check.band`), stationary cells (truth within `EDGE` of 0 or 1, or the reflection family at
    angle 0) and interior ones apart; ``stationary_row`` is the per-row condition the variants read."""
    frame = with_cells(frame)
    meets, stable = frame["meets"].astype(bool), frame["rotation_stable"].astype(bool)
    reliable = frame["reliable"].astype(bool)
    variants = {"1. candidates (noise, eigengaps)": frame["candidate"].astype(bool),
                "2. and meets [0, 1] (no rotation condition)": meets,
                "3. the flag (and the rotation condition)": reliable,
                "rotation condition waived where stationary": meets & (stable | frame["stationary_row"]),
                "the flag and ~stationary": reliable & ~frame["stationary_row"]}
    if not (reliable == (meets & stable)).all():
        raise SystemExit("the frames' reliable is not meets & rotation_stable: not the default flag's steps")
    rows, outside = [], []
    for name, kept in variants.items():
        cells = cell_bands(frame, kept)
        for part, c in (("interior", cells[~cells["stationary"]]), ("stationary", cells[cells["stationary"]])):
            if len(c):
                rows.append({"variant": name, "part": part, "cells": len(c), "below": int(c["below"].sum()),
                             "above": int(c["above"].sum()), "rows": int(c["rows"].sum()),
                             "coverage": c["covered"].sum() / c["rows"].sum()})
        for (cell, k), c in cells[cells["below"] | cells["above"]].iterrows():
            outside.append({"variant": name, "cell": cell, "k": k, "covered": f"{int(c['covered'])}/{int(c['rows'])}",
                            "band": "below" if c["below"] else "above"})
    print("\nthe flag's variants, cells with >= 10 kept rows (stationary: truth within 0.005 of 0 or 1, or angle 0):")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    if outside:
        print("\ncells outside the band:")
        print(pd.DataFrame(outside).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells")
    parser.add_argument("--out")
    parser.add_argument("--bound", type=float, default=1.0, help="jackknife SEs of cos^2 from 0 or 1 (default 1)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--interval", choices=["jackknife", "quadratic"], default="jackknife",
                        help="jackknife: session 29's runs (the jackknife-t interval and its flag); quadratic: "
                             "ntps_estimate's defaults, with the flag's steps kept for the variants' tally")
    parser.add_argument("--report", nargs="+")
    parser.add_argument("--bounds", type=float, nargs="+",
                        help="with --report: tally the flag and ~stationary at each of these bounds (stationary_z)")
    args = parser.parse_args()
    if args.cells:
        cells(args.cells, args.out, args.processes, worker=one_draw, extra=(args.bound, args.interval))
    if args.report:
        report(args.report, args.bounds)


if __name__ == "__main__":
    main()
