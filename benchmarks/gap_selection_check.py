"""Why the flag's intervals under-cover where the perception eigenvalues at k are nearly tied.

The flag (`ntps_estimate`'s ``reliable``) asks the eigengap at k to be at least `GAP_MIN` of its
jackknife standard errors. In the design LDS, d = 64, C = 2, moderate gaps, k = 1, N/d = 32 the two
leading perception eigenvalues are nearly tied (population gap 2.2-4.0 SDs of the sample gap), a few
draws pass the eigengap condition anyway, and in most populations those draws' intervals cover well
below 0.85 (docs/estimator.md, "A design where the flag fails"). This script tests explanations on
models whose truth is known and reads the map's frames:

- ``--toy``: two models of an eigenvector estimated across a gap, each from S shards with the
  delete-one-shard jackknife and Student-t interval `ntps_estimate` uses, a draw accepted when its
  sample gap over the gap's jackknife SE is at least the threshold. (1) linear: the rotation
  theta = mean(h) / mean(gap), gap and off-diagonal noise h independent; (2) exact two-dimensional:
  the shards' 2 x 2 symmetric matrices diag(g, 0) + noise (pooled SD 1 per diagonal entry, 1 / sqrt 2
  off the diagonal, so the population ratio delta = g / sqrt 2 is the gap over the SD of its diagonal
  noise), the leading eigenvector u of their mean, its sample gap the eigenvalue difference, and an
  NTPS-like score (u . v)^2 with v = (alpha, beta): truth alpha^2, beta^2 the score of the other
  eigenvector (pairs as in `tie_break_report.txt`'s populations: `EXACT_PAIRS`). Printed per delta: coverage over all
  draws, the share accepted and their coverage, the SD of their z = error / SE; the exact model's
  coverage per bin of the sample ratio; and, in the exact model, the coverage of the eigenvector's
  angle and of its linearised rotation h / (g') among all and accepted draws, with the mean |h| of each;
  (3) in the exact model, a candidate interval: the jackknife-t interval widened to the score's range
  over the rotations of the sample eigenvector the shards allow (the "rotation hull", `exact_draws`);
  (4) the same widening over confidence sets for the rotation by test inversion (`ntps_nb.core.rotation.rotation_sets`:
  Fieller's set, and the selective set conditioned on the eigengap condition), `exact_set_draws`.
- ``--toy-stable``: section (5) alone, the flag's rotation condition in the exact model (the accepted
  draws whose score range over the Fieller set stays inside the jackknife-t interval; `toy_stable_report`).
- frames (per-draw csv.gz of `benchmarks/estimator_map.py`, or candidate frames): the flag's accepted
  rows (noise, eigengap, [0, 1] and bound conditions) by bin of the sample gap ratio, in the failing
  design and in every other cell; and per frame of the failing design, its accepted k = 1 rows'
  coverage and z.

``--save-candidates DIR`` writes, per frame, the richardson rows with subspace noise at most
`NOISE_MAX` and a finite interval meeting [0, 1] (any gap ratio), with the columns read here and
``cell_draws``, the draws of the row's cell in the full frame. Examples:

    python benchmarks/gap_selection_check.py --toy
    python benchmarks/gap_selection_check.py --toy-stable --seed 5
    python benchmarks/gap_selection_check.py benchmarks/results/estimator_map/bound/candidates_draws_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED, accepted, exact_band_tests  # noqa: E402

from ntps_nb.core.estimators import BOUND_SE, GAP_MIN, NOISE_MAX, flag_at_bound  # noqa: E402
from ntps_nb.core.intervals import _jackknife  # noqa: E402
from ntps_nb.core.rotation import SET_ANGLES, STABLE_ATOL, rotation_sets  # noqa: E402
from ntps_nb.core.simulate import pair_shards  # noqa: E402

#: The columns a candidates frame keeps.
KEEP = CELL + ["draw", "estimate", "se", "lower", "upper", "truth", "covered", "subspace_noise", "gap_ratio",
               "gap_ratio_U", "gap_ratio_V", "gap_U", "gap_V", "noise_U", "noise_V", "k_U", "bias_jackknife",
               "bias_bound", "n_shards", "n_texts", "task_seed"]
#: The design where the flag fails (docs/estimator.md).
FAILING = {"task_family": "lds", "task_d": 64, "task_n_classes": 2, "task_gap": "moderate", "n_over_d": 32.0, "k": 1}
#: Bins of the sample gap ratio the reports use.
RATIO_BINS = [5, 6, 7, 8, 10, 15, np.inf]


def save_candidates(paths, out: Path) -> None:
    """Write the rows meeting the flag's noise and interval conditions of each frame, with ``cell_draws``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        f = pd.read_csv(path)
        f = f[f["estimator"] == "richardson"]
        f = f.assign(cell_draws=f.groupby(CELL)["draw"].transform("nunique"))
        f = f.loc[accepted(f, NOISE_MAX, 0.0) & _meets_unit_interval(f), [c for c in KEEP + ["cell_draws"] if c in f.columns]]
        target = out / f"{Path(path).parent.name}_{Path(path).name}"
        f.to_csv(target, index=False)
        print(f"{path}: {len(f)} rows -> {target}")


def toy_draws(delta: float, draws: int, shards: int, rng: np.random.Generator, level: float = 0.90) -> pd.DataFrame:
    """``draws`` draws of the toy model at population gap ratio ``delta``: the sample gap ratio, and
    whether the jackknife-t interval of the rotation theta covers its truth 0."""
    S = shards
    gaps = delta + rng.standard_normal((draws, S)) * np.sqrt(S)
    offs = rng.standard_normal((draws, S)) * np.sqrt(S)
    total_g, total_h = gaps.sum(axis=1, keepdims=True), offs.sum(axis=1, keepdims=True)
    loo_g, loo_h = (total_g - gaps) / (S - 1), (total_h - offs) / (S - 1)

    gap = total_g[:, 0] / S
    theta = total_h[:, 0] / total_g[:, 0]
    se = _jackknife_se(loo_h / loo_g)
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    return pd.DataFrame({"ratio": gap / _jackknife_se(loo_g), "covered": np.abs(theta) <= t * se})


def _jackknife_se(replicates: np.ndarray) -> np.ndarray:
    """Delete-one-shard jackknife SE of each row of ``replicates`` (draws x S), as the package's
    intervals compute it."""
    return _jackknife(replicates.T)[1]


def exact_draws(delta: float, alpha2: float, beta2: float, draws: int, shards: int, rng: np.random.Generator,
                level: float = 0.90) -> pd.DataFrame:
    """``draws`` draws of the exact two-dimensional model (module docstring) at population ratio
    ``delta``: the sample gap ratio; whether the jackknife-t intervals of the score (u . v)^2 (truth
    ``alpha2``), of the eigenvector's angle and of its linearised rotation h / (g') cover (truth 0 for
    both); and the off-diagonal |h| of the mean matrix."""
    S = shards
    m = pair_shards(delta, draws, S, rng)
    total = m.sum(axis=1)
    v = np.array([np.sqrt(alpha2), np.sqrt(beta2)])

    def statistics(a: np.ndarray):
        w, vectors = np.linalg.eigh(a)                  # ascending: the leading eigenvector is the last
        u = vectors[..., :, 1] * np.sign(vectors[..., :1, 1])
        rotation = a[..., 0, 1] / (a[..., 0, 0] - a[..., 1, 1])
        return w[..., 1] - w[..., 0], (u @ v) ** 2, np.arctan2(u[..., 1], u[..., 0]), rotation

    mean = total / S
    gap, score, angle, rotation = statistics(mean)
    replicates = (total[:, None] - m) / (S - 1)
    loo = statistics(replicates)
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    score_se = _jackknife_se(loo[1])
    lower, upper = score - t * score_se, score + t * score_se
    # The rotation hull: the replicates in the sample eigenbasis give the jackknife SEs of the
    # off-diagonal entry and of the diagonal gap there; the population eigenvector lies within
    # phi_max = atan(2 t se_h / (gap - t se_gap)) / 2 of the sample one (any angle where the
    # denominator is not positive), and the interval is widened to the score's range over those rotations.
    _, basis = np.linalg.eigh(mean)
    local = np.einsum("dji,dsjk,dkl->dsil", basis, replicates, basis)
    se_h = _jackknife_se(local[..., 0, 1])
    se_gap = _jackknife_se(local[..., 1, 1] - local[..., 0, 0])
    denominator = gap - t * se_gap
    phi_max = np.where(denominator > 0, 0.5 * np.arctan2(2 * t * se_h, np.maximum(denominator, 1e-300)), np.pi / 2)
    phis = np.linspace(-1.0, 1.0, HULL_ANGLES)[None, :] * phi_max[:, None]
    lead, other = basis[..., :, 1], basis[..., :, 0]
    rotated = np.cos(phis)[..., None] * lead[:, None, :] + np.sin(phis)[..., None] * other[:, None, :]
    scores = (rotated @ v) ** 2
    hull_lower, hull_upper = np.minimum(lower, scores.min(axis=1)), np.maximum(upper, scores.max(axis=1))
    return pd.DataFrame({"ratio": gap / _jackknife_se(loo[0]), "covered": np.abs(score - alpha2) <= t * score_se,
                         "z": (score - alpha2) / score_se,
                         "angle_covered": np.abs(angle) <= t * _jackknife_se(loo[2]),
                         "rotation_covered": np.abs(rotation) <= t * _jackknife_se(loo[3]),
                         "abs_h": np.abs(total[:, 0, 1] / S),
                         "hull_covered": (hull_lower <= alpha2) & (alpha2 <= hull_upper),
                         "hull_width_ratio": (hull_upper - hull_lower) / (upper - lower)})


#: Draws of the exact model `toy_report` holds in memory at once for the rotation sets (section (4)).
SET_CHUNK = 4_000


def exact_set_draws(delta: float, alpha2: float, beta2: float, draws: int, shards: int,
                    rng: np.random.Generator, level: float = 0.90) -> pd.DataFrame:
    """Draws of the exact two-dimensional model (as `exact_draws`) with the score's range over each
    confidence set of `rotation_sets` (the Fieller and the selective set): whether each range, and
    each range joined with the jackknife-t interval, covers the truth ``alpha2``; whether each set
    holds the population direction; the joined intervals' widths over the jackknife-t interval's."""
    S = shards
    m = pair_shards(delta, draws, S, rng)
    total = m.sum(axis=1)
    replicates = (total[:, None] - m) / (S - 1)
    v = np.array([np.sqrt(alpha2), np.sqrt(beta2)])
    w, basis = np.linalg.eigh(total / S)
    basis = basis[..., ::-1]                                 # leading first
    gap = w[:, 1] - w[:, 0]
    w_r, u_r = np.linalg.eigh(replicates)
    se_gap = _jackknife_se(w_r[..., 1] - w_r[..., 0])
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    score = (basis[..., 0] @ v) ** 2
    se = _jackknife_se((u_r[..., 1] @ v) ** 2)
    lower, upper = score - t * se, score + t * se
    local = np.einsum("dji,dsjk,dkl->dsil", basis, replicates, basis)
    sets = rotation_sets(gap, se_gap, local, level=level, gap_min=GAP_MIN)
    phis, fieller, selective = sets.phis, sets.fieller, sets.selective
    rotated = np.cos(phis)[None, :, None] * basis[:, None, :, 0] + np.sin(phis)[None, :, None] * basis[:, None, :, 1]
    scores = (rotated @ v) ** 2
    # the population's leading direction (1, 0) as a rotation of the sample's, folded into [-pi/2, pi/2)
    phi0 = (np.arctan2(basis[:, 0, 1], basis[:, 0, 0]) + np.pi / 2) % np.pi - np.pi / 2
    nearest = np.round((phi0 + np.pi / 2) / np.pi * SET_ANGLES).astype(int) % SET_ANGLES
    out = {"ratio": gap / se_gap, "covered": np.abs(score - alpha2) <= t * se}
    for name, kept in (("fieller", fieller), ("selective", selective)):
        lo = np.where(kept, scores, np.inf).min(axis=1)
        hi = np.where(kept, scores, -np.inf).max(axis=1)
        joined_lo, joined_hi = np.minimum(lo, lower), np.maximum(hi, upper)
        out[f"{name}_holds_direction"] = kept[np.arange(draws), nearest]
        out[f"{name}_range_covered"] = (lo <= alpha2) & (alpha2 <= hi)
        out[f"{name}_covered"] = (joined_lo <= alpha2) & (alpha2 <= joined_hi)
        out[f"{name}_width_ratio"] = (joined_hi - joined_lo) / (upper - lower)
        # the flag's rotation condition (`rotation_stability`): the range inside the jackknife-t interval
        slack = STABLE_ATOL
        out[f"{name}_stable"] = (lo >= lower - slack) & (hi <= upper + slack)
    return pd.DataFrame(out)


def toy_stable_report(draws: int, shards: int, seed: int) -> None:
    """Section (5) of the toy report: the flag's rotation condition on the exact model."""
    rng = np.random.default_rng(seed)
    print(f"## (5) the flag's rotation condition (`rotation_stability`) in the exact two-dimensional model: {draws:,} "
          f"draws per population ratio, {shards} shards, seed {seed}, GAP_MIN = {GAP_MIN:g}. A draw is stable where "
          "the score's range over the Fieller set lies inside its jackknife-t interval. Coverage of the jackknife-t "
          "interval over the draws the eigengap condition accepts, and over those of them that are also stable; "
          "below / above: exact one-sided binomial test against 0.85 / 0.95 at 0.025")
    rows = []
    for alpha2, beta2 in EXACT_PAIRS:
        for delta in [2, 3, 4, 6, 10, 20, 50]:
            f = pd.concat([exact_set_draws(delta, alpha2, beta2, min(SET_CHUNK, draws - i), shards, rng)
                           for i in range(0, draws, SET_CHUNK)], ignore_index=True)
            a = f[f["ratio"] >= GAP_MIN]
            b = a[a["fieller_stable"]]
            below, above = exact_band_tests([b["covered"].sum()], [len(b)]) if len(b) else ([False], [False])
            rows.append({"alpha2": alpha2, "beta2": beta2, "delta": delta, "accepted": len(a),
                         "jackknife": a["covered"].mean(), "stable": len(b), "stable_share": len(b) / max(len(a), 1),
                         "jackknife_stable": b["covered"].mean() if len(b) else np.nan,
                         "below": bool(below[0]), "above": bool(above[0])})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


#: Rotation angles the hull interval evaluates the score at, evenly over [-phi_max, phi_max].
HULL_ANGLES = 41
#: (alpha^2, beta^2) of the exact model: the k = 1 truths of the failing design's populations,
#: u1 and u2 in V_1 in `tie_break_report.txt` (seeds 23, 15, 26, 24).
EXACT_PAIRS = [(0.1513, 0.6087), (0.2892, 0.4787), (0.3786, 0.3942), (0.7922, 0.0003)]


def toy_report(draws: int, shards: int, seed: int, set_draws: int = 20_000) -> None:
    """Print the linear and the exact model's acceptance and coverage per population ratio."""
    rng = np.random.default_rng(seed)
    deltas = [2, 2.5, 3, 4, 5, 6, 8, 12, 20]
    thresholds = [GAP_MIN, 8.0, 10.0]
    print(f"{draws:,} draws per population ratio delta, {shards} shards, nominal 0.90, seed {seed}, "
          f"GAP_MIN = {GAP_MIN:g}")
    print("(binomial SE of a coverage p over n accepted draws: sqrt(p (1 - p) / n), e.g. 0.009 at n = 1,000)")
    print("\n## (1) linear model: theta = mean(h) / mean(gap), gap and h independent")
    frames = {delta: toy_draws(delta, draws, shards, rng) for delta in deltas}
    rows = []
    for delta, f in frames.items():
        row = {"delta": delta, "coverage_all": f["covered"].mean()}
        for c in thresholds:
            a = f[f["ratio"] >= c]
            row[f"accepted_{c:g}"] = len(a) / len(f)
            row[f"coverage_{c:g}"] = a["covered"].mean() if len(a) else np.nan
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print("\ncoverage of the accepted draws (ratio >= GAP_MIN) by bin of the sample ratio, at two population ratios:")
    rows = []
    for delta in (3, 6):
        f = frames[delta]
        f = f[f["ratio"] >= GAP_MIN]
        for b, g in f.groupby(pd.cut(f["ratio"], RATIO_BINS, right=False), observed=True):
            rows.append({"delta": delta, "sample ratio": str(b), "accepted": len(g), "coverage": g["covered"].mean()})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    print("\n## (2) exact two-dimensional model: the leading eigenvector of a 2 x 2 mean, score (u . v)^2")
    exact_deltas = [2, 3, 4, 6, 10, 20, 50]
    rows, by_bin, parts, hull = [], [], [], []
    for alpha2, beta2 in EXACT_PAIRS:
        for delta in exact_deltas:
            f = exact_draws(delta, alpha2, beta2, draws, shards, rng)
            row = {"alpha2": alpha2, "beta2": beta2, "delta": delta, "coverage_all": f["covered"].mean()}
            for c in thresholds:
                a = f[f["ratio"] >= c]
                row[f"accepted_{c:g}"] = len(a) / len(f)
                row[f"coverage_{c:g}"] = a["covered"].mean() if len(a) else np.nan
            a = f[f["ratio"] >= GAP_MIN]
            row["z_sd_accepted"] = a["z"].std() if len(a) > 1 else np.nan
            rows.append(row)
            hull.append({"alpha2": alpha2, "beta2": beta2, "delta": delta, "coverage_all": f["covered"].mean(),
                         "hull_coverage_all": f["hull_covered"].mean(), "coverage_accepted": a["covered"].mean(),
                         "hull_coverage_accepted": a["hull_covered"].mean(),
                         "median_width_ratio_accepted": a["hull_width_ratio"].median()})
            if (alpha2, beta2) == EXACT_PAIRS[0]:
                parts.append({"delta": delta,
                              "angle_all": f["angle_covered"].mean(), "angle_accepted": a["angle_covered"].mean(),
                              "rotation_all": f["rotation_covered"].mean(),
                              "rotation_accepted": a["rotation_covered"].mean(),
                              "mean_abs_h_all": f["abs_h"].mean(), "mean_abs_h_accepted": a["abs_h"].mean()})
                if delta in (2, 3, 4, 6):
                    for b, g in a.groupby(pd.cut(a["ratio"], RATIO_BINS, right=False), observed=True):
                        by_bin.append({"delta": delta, "sample ratio": str(b), "accepted": len(g),
                                       "coverage": g["covered"].mean()})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    alpha2, beta2 = EXACT_PAIRS[0]
    print(f"\ncoverage of the accepted draws by bin of the sample ratio (alpha^2 = {alpha2}, beta^2 = {beta2}):")
    print(pd.DataFrame(by_bin).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nthe eigenvector's angle and its linearised rotation h / (g') (same draws), and the mean |h| of the "
          "draws, all and accepted (ratio >= GAP_MIN):")
    print(pd.DataFrame(parts).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\n## (3) the rotation hull in the exact model (a candidate, not in the package): the jackknife-t interval "
          "widened to the score's range over the rotations within phi_max of the sample eigenvector "
          "(exact_draws); coverage over all and accepted draws, and the accepted draws' median width over the "
          "jackknife-t width")
    print(pd.DataFrame(hull).to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    print(f"\n## (4) confidence sets for the rotation by test inversion (`rotation_sets`, {set_draws:,} draws per "
          f"delta, {SET_ANGLES} angles): the Fieller set and the selective set (conditioned on the eigengap "
          "condition); the accepted draws' coverage of the population direction (direction), of the score by the "
          "set's range alone (range) and joined with the jackknife-t interval (joined), and the joined interval's "
          "median width over the jackknife-t width")
    rows = []
    for alpha2, beta2 in EXACT_PAIRS:
        for delta in exact_deltas:
            f = pd.concat([exact_set_draws(delta, alpha2, beta2, min(SET_CHUNK, set_draws - i), shards, rng)
                           for i in range(0, set_draws, SET_CHUNK)], ignore_index=True)
            a = f[f["ratio"] >= GAP_MIN]
            row = {"alpha2": alpha2, "delta": delta, "accepted": len(a), "jackknife": a["covered"].mean()}
            for name in ("fieller", "selective"):
                row[f"{name}_direction"] = a[f"{name}_holds_direction"].mean()
                row[f"{name}_range"] = a[f"{name}_range_covered"].mean()
                row[f"{name}_joined"] = a[f"{name}_covered"].mean()
                row[f"{name}_width"] = a[f"{name}_width_ratio"].median()
            row["fieller_direction_all"] = f["fieller_holds_direction"].mean()
            rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("(fieller_direction_all: the Fieller set over all draws, accepted or not; binomial SE of a coverage near 0.9 "
          "over n accepted draws 0.3 / sqrt(n))")


def _meets_unit_interval(frame: pd.DataFrame) -> pd.Series:
    """The flag's [0, 1] condition: the interval meets [0, 1]."""
    return (frame["lower"] <= 1) & (frame["upper"] >= 0)


def _flag_accepted(frame: pd.DataFrame) -> pd.Series:
    """The flag's accepted rows: noise, eigengap, finite interval meeting [0, 1], not at_bound."""
    at_bound = flag_at_bound(frame[["estimate", "se"]].assign(reliable=True))["at_bound"]
    return accepted(frame, NOISE_MAX, GAP_MIN) & _meets_unit_interval(frame) & ~at_bound


def _in_failing(frame: pd.DataFrame) -> pd.Series:
    out = pd.Series(True, index=frame.index)
    for column, value in FAILING.items():
        out &= frame[column] == value
    return out


def frames_report(paths) -> None:
    """Print the accepted rows' coverage by bin of the sample gap ratio (failing design / others) and,
    per frame holding the failing design, its accepted k = 1 rows' coverage and z."""
    parts = []
    for path in paths:
        f = pd.read_csv(path)
        f = f[f["estimator"] == "richardson"]
        f = f[_flag_accepted(f)].assign(frame=Path(path).name, failing=lambda x: _in_failing(x))
        parts.append(f)
    f = pd.concat(parts, ignore_index=True)
    if "task_seed" in f.columns:    # a rerun with more draws repeats the first draws of its population
        f = f.drop_duplicates(subset=CELL + ["task_seed", "draw"], keep="last").reset_index(drop=True)
    print(f"{len(paths)} frames, {len(f):,} accepted richardson rows (noise, eigengap >= {GAP_MIN:g}, [0, 1], "
          f"bound {BOUND_SE:g} SE); failing design: {dict(FAILING)}")
    print("\n## coverage of the accepted rows by bin of the sample gap ratio")
    rows = []
    for failing, g in f.groupby("failing"):
        for b, h in g.groupby(pd.cut(g["gap_ratio"], RATIO_BINS, right=False), observed=True):
            rows.append({"rows": "failing design" if failing else "every other cell", "sample ratio": str(b),
                         "accepted": len(h), "coverage": h["covered"].mean(),
                         "binomial_se": np.sqrt(h["covered"].mean() * (1 - h["covered"].mean()) / len(h))})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\n## the standard error inflated by r / (r - q), r the row's sample gap ratio: cells (frame x cell, "
          f">= {MIN_ACCEPTED} accepted rows) significantly below 0.85 / above 0.95")
    rows = []
    for q in (0, 1, 2, 3):
        t = scipy.stats.t.ppf(0.95, f["n_shards"] - 1)       # the nominal 0.90 interval
        covered = (f["estimate"] - f["truth"]).abs() <= t * f["se"] * f["gap_ratio"] / (f["gap_ratio"] - q)
        cells = f.assign(covered=covered).groupby(["frame"] + CELL)["covered"].agg(["sum", "size"])
        cells = cells[cells["size"] >= MIN_ACCEPTED]
        below, above = exact_band_tests(cells["sum"], cells["size"])
        failing = cells.reset_index()
        failing = failing[_in_failing(failing).to_numpy()]
        rows.append({"q": q, "cells": len(cells), "below": int(below.sum()), "above": int(above.sum()),
                     "pooled_coverage": covered.mean(),
                     "failing_design_frames_below": int(exact_band_tests(failing["sum"], failing["size"])[0].sum())})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("(the interval only: which rows are accepted, at_bound included, is left as the flag decides at q = 0)")
    print("\n## the failing design's accepted k = 1 rows, per frame (z = (estimate - truth) / se)")
    rows = []
    for name, g in f[f["failing"]].groupby("frame"):
        z = (g["estimate"] - g["truth"]) / g["se"]
        below, _ = exact_band_tests([g["covered"].sum()], [len(g)])
        rows.append({"frame": name, "truth": g["truth"].iloc[0], "accepted": len(g), "coverage": g["covered"].mean(),
                     "p_below_0.85": scipy.stats.binom.cdf(g["covered"].sum(), len(g), 0.85),
                     "below": bool(below[0]), "sd_estimate": g["estimate"].std(),
                     "median_se": g["se"].median(), "z_mean": z.mean(), "z_sd": z.std()})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if "half_a" not in f.columns:
        return
    f = f.dropna(subset=["half_a", "half_b"])
    f = f.assign(D=(f["half_a"] - f["half_b"]).abs() / (2 * f["se"]))
    print("\n## split-half disagreement D = |half_a - half_b| / (2 se) of the accepted rows (frames of --split-halves)")
    rows = []
    for k, g in f.groupby("k"):
        keep = g[g["D"] <= 1]
        rows.append({"k": k, "accepted": len(g), "coverage": g["covered"].mean(),
                     "D_median": g["D"].median(), "D_q90": g["D"].quantile(0.9),
                     "kept_D_le_1": len(keep) / len(g), "coverage_D_le_1": keep["covered"].mean(),
                     "abs_bias_jackknife_over_se_median": (g["bias_jackknife"].abs() / g["se"]).median()
                     if "bias_jackknife" in g.columns else np.nan})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def map_draw(family: str, d: int, n_classes: int, gap: str, ratio: float, seed: int, draw: int, n_shards: int):
    """The model and the shards of one draw of `benchmarks/estimator_map.py` (one model per task, so
    `estimator_map`'s generator for model 0 of a run with this seed, this N/d and draw)."""
    from ntps_nb.core.simulate import factor_model, lds_model, sample_shards

    make = {"factor": factor_model, "lds": lds_model}[family]
    model = make(d=int(d), n_classes=int(n_classes), n_tokens=8, gap=gap, seed=int(seed))
    n_texts = max(int(round(ratio * model.d)), int(n_shards))
    rng = np.random.default_rng([int(seed), 0, int(round(ratio * 1000)), int(draw)])
    return model, sample_shards(model, n_texts, int(n_shards), rng)


def with_split_halves(path: str, seed: int, out: Path) -> None:
    """The failing design's rows of one per-draw frame of `benchmarks/estimator_map.py` (run with
    ``--families lds --classes 2 --gaps moderate --ratios 32 --d 64 --seed SEED``), with the plug-in
    on each half of the split richardson uses (``half_a``, ``half_b``), recomputed from the same
    draws (the map's generator seeds), and the candidates' columns; written to ``out``."""
    from ntps_nb.core.estimators import split_halves
    from ntps_nb.core.intervals import theory_values
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import theory_geometry

    f = pd.read_csv(path)
    f = f[(f["estimator"] == "richardson")]
    for column, value in FAILING.items():
        if column != "k":
            f = f[f[column] == value]
    ks = np.sort(f["k"].unique())
    rows = []
    for draw in np.sort(f["draw"].unique()):
        _, shards = map_draw(FAILING["task_family"], FAILING["task_d"], FAILING["task_n_classes"], FAILING["task_gap"],
                             FAILING["n_over_d"], seed, draw, f["n_shards"].iloc[0])
        a, b = split_halves(len(shards), int(draw))
        halves = [theory_values(theory_geometry(Moments.combine([shards[i] for i in half])), ks) for half in (a, b)]
        rows.append(pd.DataFrame({"draw": draw, "k": ks, "half_a": halves[0], "half_b": halves[1]}))
    f = f.assign(cell_draws=f.groupby(CELL)["draw"].transform("nunique"))
    f = f[[c for c in KEEP + ["cell_draws"] if c in f.columns]].merge(pd.concat(rows), on=["draw", "k"])
    out.parent.mkdir(parents=True, exist_ok=True)
    f.to_csv(out, index=False)
    print(f"{path}: {len(f)} rows of the failing design with the split halves -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="*")
    parser.add_argument("--save-candidates", type=Path)
    parser.add_argument("--toy", action="store_true", help="the toy model with known truth")
    parser.add_argument("--toy-draws", type=int, default=200_000)
    parser.add_argument("--toy-set-draws", type=int, default=20_000,
                        help="draws per population ratio of the toy's rotation sets (section (4))")
    parser.add_argument("--toy-stable", action="store_true",
                        help="section (5) alone: the flag's rotation condition in the exact model (--toy-set-draws)")
    parser.add_argument("--shards", type=int, default=10, help="shards of the toy model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-halves", type=Path, metavar="OUT",
                        help="with one frame of the failing design and --seed its map seed: write its rows with the "
                             "plug-in on the two halves to OUT")
    args = parser.parse_args()
    if args.split_halves:
        with_split_halves(args.frames[0], args.seed, args.split_halves)
        return
    if args.toy_stable:
        toy_stable_report(args.toy_set_draws, args.shards, args.seed)
        return
    if args.toy:
        toy_report(args.toy_draws, args.shards, args.seed, args.toy_set_draws)
    if args.save_candidates:
        save_candidates(args.frames, args.save_candidates)
    elif args.frames:
        frames_report(args.frames)


if __name__ == "__main__":
    main()
