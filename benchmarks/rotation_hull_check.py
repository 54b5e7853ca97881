"""The rotation hull and the rotation sets on the estimator map: does widening a reliable row's interval
over the rotations the shards allow make the near-tied design cover without over-covering the others?

`gap_selection_check.py --toy` shows, on an exact two-dimensional model, that the jackknife interval of
an eigenvector's score under-covers where the population eigengap is 2-4 SDs, and that the "rotation
hull" (the interval widened to the score's range over the rotations of the sample eigenvector within
phi_max) keeps it at 0.87-0.95 from population ratio 2 to 50. This script carries the hull to NTPS:

For each row the flag accepts in the given candidate frames (richardson rows of
`benchmarks/estimator_map.py`, as `gap_selection_check.py --save-candidates` or the bound/ candidates
keep them), the row's draw is generated again from the map's recipe (the model of its design and run
seed, rng [seed, 0, round(1000 N/d), draw]; the eigengap ratios recomputed from those shards must
match the frame's, or the script stops). At k, with k_U = min(k, m):

- U side (when k_U < m): the pooled perception eigenvectors u_{k_U}, u_{k_U + 1} (Sxx-orthonormal);
  each delete-one-shard replicate's u_{k_U} has angle theta_s = atan(<u_{k_U + 1}, x_s> / <u_{k_U}, x_s>)
  in the pooled Sxx inner product; phi_U = atan(2 t se(theta) r_U / (r_U - t)) / 2 with r_U the
  perception eigengap ratio and t the interval's Student-t quantile (any angle up to pi / 2 where
  r_U <= t); the same exact-model formula, with se_h / gap ~ se(theta).
- V side (when k < r_V): v_k, v_{k + 1} of the next-token problem in the pooled C0 inner product, phi_V
  likewise from r_V.
- NTPS_theory is evaluated on a grid of `GRID` x `GRID` rotations (u_{k_U} towards u_{k_U + 1} by
  phi in [-phi_U, phi_U], v_k towards v_{k + 1} by psi in [-phi_V, phi_V]) of the pooled subspaces;
  the hull is [min, max] of those values shifted by the row's estimate minus the pooled plug-in
  (richardson's correction), joined with the row's interval. The grid's centre must reproduce the
  pooled plug-in (checked).

Beside the hull, the two intervals of `ntps_nb.core.rotation` (test inversion instead of phi_max): the
same widening over the Fieller set and over the selective set of each side's rotation (the selective
one is `ntps_estimate(interval="rotation")` on an accepted row; the script checks that the package's
`rotation_interval` gives the same bounds).

Printed: per cell with at least `MIN_ACCEPTED` accepted rows, the coverage of the row's interval and
of each widened one, with the exact binomial tests of `estimator_flag_report.py`; pooled coverage,
width ratios, and coverage by bin of the sample gap ratio. The per-row results go to ``--out`` (csv.gz); ``--report`` reads such files again.
``--decompose HULL_FRAME`` splits each row's plug-in error with known truth (the population's
next-token or perception moments in place of the sample's) and places the sample's u_1 against the
population's (u_1, u_2) plane, by whether the hull covered. Examples:

    python benchmarks/rotation_hull_check.py benchmarks/results/estimator_map/bound/candidates_draws_d16_seed14.csv.gz --out hull_d16_seed14.csv.gz
    python benchmarks/rotation_hull_check.py --decompose benchmarks/results/estimator_map/gap_selection/hull_failing_design_k1.csv.gz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED, exact_band_tests  # noqa: E402
from gap_selection_check import _flag_accepted, _in_failing, _jackknife_se, map_draw  # noqa: E402

from ntps_nb.core.estimators import GAP_MIN, eigengap_ratios  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.rotation import (  # noqa: E402
    SET_ANGLES, ntps_over_rotations, plane_replicates, rotation_interval, rotation_sets)
from ntps_nb.core.score import theory_geometry  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL, next_token_subspace, perception_subspace  # noqa: E402

#: Rotation angles per side the hull evaluates NTPS at, evenly over [-phi, phi].
GRID = 9
#: Largest relative difference between the recomputed and the frame's eigengap ratio (the frames
#: keep about 16 significant digits; the solves agree to rounding).
RATIO_RTOL = 1e-6
#: Largest difference between the grid's centre and the pooled plug-in NTPS.
CENTRE_ATOL = 1e-9
#: Step (radians) of the central differences of NTPS in a rotation.
ROTATION_STEP = 1e-4
#: The candidate rotations of `rotation_sets`.
SET_PHIS = np.linspace(-np.pi / 2, np.pi / 2, SET_ANGLES, endpoint=False)
DRAW = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "task_seed", "draw"]


def _angle_se(pooled_vectors: np.ndarray, metric: np.ndarray, replicate_vectors: list[np.ndarray]) -> float:
    """Jackknife SE of the replicates' angle in the plane of the two pooled vectors (columns of
    ``pooled_vectors``, orthonormal in ``metric``)."""
    coords = np.array([pooled_vectors.T @ metric @ x for x in replicate_vectors])   # (S, 2)
    return float(_jackknife_se(np.arctan(coords[:, 1] / coords[:, 0])[None, :])[0])


def _phi_max(se_theta: float, ratio: float, t: float) -> float:
    if not np.isfinite(ratio) or ratio <= t or not np.isfinite(se_theta):
        return np.pi / 2
    return 0.5 * np.arctan(2 * t * se_theta * ratio / (ratio - t))


def _ntps_grid(U, V, k: int, phis: np.ndarray, psis: np.ndarray) -> np.ndarray:
    """NTPS_theory(k) with u_{k_U} rotated towards u_{k_U + 1} by each phi and v_k towards v_{k + 1} by
    each psi (the pooled subspaces otherwise); as `_theory_geometry_of` computes it."""
    m = U.rank_A
    kU = min(k, m)
    Q_r, s_r = U.range_basis, U.range_eigenvalues
    u = Q_r.T @ U.whitened[:, : min(kU + 1, m)]
    v = np.sqrt(s_r)[:, None] * (Q_r.T @ V.vectors[:, : min(k + 1, V.rank_B)])
    out = np.empty((phis.size, psis.size))
    for i, phi in enumerate(phis):
        uu = u[:, :kU].copy()
        if phi != 0.0:
            uu[:, kU - 1] = np.cos(phi) * u[:, kU - 1] + np.sin(phi) * u[:, kU]
        for j, psi in enumerate(psis):
            vv = v[:, :k].copy()
            if psi != 0.0:
                vv[:, k - 1] = np.cos(psi) * v[:, k - 1] + np.sin(psi) * v[:, k]
            basis, _ = np.linalg.qr(vv)
            out[i, j] = np.clip(np.sum((basis.T @ uu) ** 2) / kU, 0.0, 1.0)
    return out


def hull_of_draw(args) -> pd.DataFrame:
    """The hull of each accepted row of one draw (``rows``: its frame rows; optionally a third item, the
    eigengap threshold the rotation sets condition on, `GAP_MIN` otherwise)."""
    key, rows, *rest = args
    gap_min = rest[0] if rest else GAP_MIN
    n_shards = int(rows["n_shards"].iloc[0])
    _, shards = map_draw(*key, n_shards)
    ks = np.sort(rows["k"].unique())
    gaps = eigengap_ratios(shards, ks).set_index("k")
    expected = rows.set_index("k")["gap_ratio"]
    if not np.allclose(gaps.loc[expected.index, "gap_ratio"], expected, rtol=RATIO_RTOL, atol=0):
        raise SystemExit(f"draw {key} does not regenerate: gap ratios {gaps['gap_ratio'].tolist()} against {expected.tolist()}")
    pooled = Moments.combine(shards)
    U, V = perception_subspace(pooled), next_token_subspace(pooled)
    plugin = theory_geometry(pooled)
    pools = [Moments.combine([s for j, s in enumerate(shards) if j != i]) for i in range(n_shards)]
    reps = [(perception_subspace(p), next_token_subspace(p)) for p in pools]
    t = scipy.stats.t.ppf(0.95, n_shards - 1)      # the nominal 0.90 interval of the map
    out = []
    for _, row in rows.iterrows():
        k = int(row["k"])
        m = U.rank_A
        kU = min(k, m)
        phi_U = phi_V = 0.0
        if kU < m:
            se = _angle_se(U.vectors[:, kU - 1: kU + 1], pooled.Sxx, [r[0].vectors[:, kU - 1] for r in reps])
            phi_U = _phi_max(se, gaps.loc[k, "gap_ratio_U"], t)
        if k < V.rank_B:
            se = _angle_se(V.vectors[:, k - 1: k + 1], pooled.C0, [r[1].vectors[:, k - 1] for r in reps])
            phi_V = _phi_max(se, gaps.loc[k, "gap_ratio_V"], t)
        phis = np.linspace(-phi_U, phi_U, GRID) if phi_U > 0 else np.zeros(1)
        psis = np.linspace(-phi_V, phi_V, GRID) if phi_V > 0 else np.zeros(1)
        grid = _ntps_grid(U, V, k, phis, psis)
        centre = grid[phis.size // 2, psis.size // 2]
        if abs(centre - plugin.ntps(k)) > CENTRE_ATOL:
            raise SystemExit(f"draw {key}, k = {k}: the grid's centre {centre} is not the plug-in {plugin.ntps(k)}")
        shift = row["estimate"] - plugin.ntps(k)
        lower = min(row["lower"], grid.min() + shift)
        upper = max(row["upper"], grid.max() + shift)
        record = {**row.to_dict(), "phi_U": phi_U, "phi_V": phi_V, "plugin": plugin.ntps(k),
                  "grid_min": grid.min(), "grid_max": grid.max(), "hull_lower": lower, "hull_upper": upper,
                  "hull_covered": lower <= row["truth"] <= upper,
                  "hull_width_ratio": (upper - lower) / (row["upper"] - row["lower"])}
        # the confidence sets of the rotation by test inversion (ntps_nb.core.rotation): both sets on
        # every side with a next direction
        sets, angles = {}, {}
        for side, space, kk, rank, factor, metric, ratio in (
                ("U", U, kU, m, pooled.Sxy, pooled.Sxx, gaps.loc[k, "gap_ratio_U"]),
                ("V", V, k, V.rank_B, pooled.C1, pooled.C0, gaps.loc[k, "gap_ratio_V"])):
            if kk < rank:
                gap = space.eigenvalues[kk - 1] - space.eigenvalues[kk]
                local = plane_replicates(space.vectors[:, kk - 1: kk + 1], factor, metric, shards, side)
                sets[side] = rotation_sets(gap, gap / ratio, local, gap_min=gap_min)
                # the replicates' in-plane angle of the leading direction: the jackknife's own
                # (linearised) account of the rotation
                angles[side] = 0.5 * np.arctan2(2 * local[:, 0, 1], local[:, 0, 0] - local[:, 1, 1])
            else:
                sets[side] = None
        # the rotation's share of the jackknife variance, to first order: (dNTPS / dphi)^2 se(angle)^2
        # per side, dNTPS / dphi by central differences of the closed form
        se_rotation2 = 0.0
        for side in ("U", "V"):
            if sets[side] is not None:
                steps = np.array([-ROTATION_STEP, ROTATION_STEP])
                grid = (ntps_over_rotations(U, V, k, steps, np.zeros(1))[:, 0] if side == "U"
                        else ntps_over_rotations(U, V, k, np.zeros(1), steps)[0])
                slope = (grid[1] - grid[0]) / (2 * ROTATION_STEP)
                se_rotation2 += slope ** 2 * float(_jackknife_se(angles[side][None, :])[0]) ** 2
        t = scipy.stats.t.ppf(0.95, n_shards - 1)
        rest = t * np.sqrt(max(row["se"] ** 2 - se_rotation2, 0.0))
        record["se_rotation"] = np.sqrt(se_rotation2)
        for name in ("fieller", "selective"):
            kept = [np.zeros(1) if sets[side] is None else SET_PHIS[getattr(sets[side], name)] for side in ("U", "V")]
            kept = [x if x.size else np.zeros(1) for x in kept]
            values = ntps_over_rotations(U, V, k, *kept)
            lower, upper = min(row["lower"], values.min() + shift), max(row["upper"], values.max() + shift)
            record.update({f"{name}_lower": lower, f"{name}_upper": upper,
                           f"{name}_covered": lower <= row["truth"] <= upper,
                           f"{name}_width_ratio": (upper - lower) / (row["upper"] - row["lower"]),
                           f"{name}_rotation_U": float(np.abs(kept[0]).max()),
                           f"{name}_rotation_V": float(np.abs(kept[1]).max())})
            # the rotation's range and the rest of the jackknife's noise added in quadrature (a
            # variant of the union above that does not count the rotation twice)
            below = max(row["estimate"] - (values.min() + shift), 0.0)
            above = max(values.max() + shift - row["estimate"], 0.0)
            lower, upper = row["estimate"] - np.hypot(below, rest), row["estimate"] + np.hypot(above, rest)
            record.update({f"{name}_q_lower": lower, f"{name}_q_upper": upper,
                           f"{name}_q_covered": lower <= row["truth"] <= upper,
                           f"{name}_q_width_ratio": (upper - lower) / (row["upper"] - row["lower"])})
        # the package's interval option computes the selective one (the flag accepted the row; the
        # ratios as the draw gives them, some candidate frames do not keep them)
        ratios = gaps.loc[k, ["gap_ratio_U", "gap_ratio_V"]].to_dict()
        packaged = rotation_interval(shards, pd.DataFrame([{**row.to_dict(), **ratios}]), level=0.90,
                                     gap_min=gap_min, rtol=RANGE_RTOL, solved=(U, V)).iloc[0]
        if abs(packaged["lower"] - record["selective_lower"]) > CENTRE_ATOL or \
                abs(packaged["upper"] - record["selective_upper"]) > CENTRE_ATOL:
            raise SystemExit(f"draw {key}, k = {k}: ntps_estimate's rotation interval differs from the sets here "
                             f"({packaged['lower']}, {packaged['upper']}) against ({record['selective_lower']}, "
                             f"{record['selective_upper']})")
        out.append(record)
    return pd.DataFrame(out)


def decompose_draw(args) -> pd.DataFrame:
    """Known-truth split of each row's plug-in error (``rows``: one draw's rows of a hull frame): the
    plug-in with the next-token moments (C0, C1) of the population and the perception moments of the
    sample (``plugin_U_error``: U's error alone, with Sxx's), and the reverse (``plugin_V_error``)."""
    key, rows = args
    model, shards = map_draw(*key, rows["n_shards"].iloc[0])
    sample = Moments.combine(shards)
    population = model.population_moments()

    def mixed(perception: Moments, next_token: Moments) -> Moments:
        return Moments(Sxx=perception.Sxx, Sxy=perception.Sxy, Syy=perception.Syy, C0=next_token.C0,
                       C1=next_token.C1, n_texts=sample.n_texts, n_tokens=sample.n_tokens)

    u_only, v_only = theory_geometry(mixed(sample, population)), theory_geometry(mixed(population, sample))
    plugin = theory_geometry(sample)
    # where the sample's leading perception direction lies against the population's first two, in the
    # population's Sxx inner product: its angle within their plane and the share of it outside
    U_pop, U_sample = perception_subspace(population), perception_subspace(sample)
    x = U_sample.vectors[:, 0]
    c = U_pop.vectors[:, :2].T @ population.Sxx @ x
    in_plane_angle = float(np.arctan(abs(c[1] / c[0])))
    out_of_plane = float(1.0 - np.sum(c ** 2) / (x @ population.Sxx @ x))
    out = []
    for _, row in rows.iterrows():
        k = int(row["k"])
        if abs(plugin.ntps(k) - row["plugin"]) > CENTRE_ATOL:
            raise SystemExit(f"draw {key}, k = {k} does not regenerate its plug-in")
        out.append({**row.to_dict(), "plugin_error": plugin.ntps(k) - row["truth"],
                    "plugin_U_error": u_only.ntps(k) - row["truth"], "plugin_V_error": v_only.ntps(k) - row["truth"],
                    "u1_in_plane_angle": in_plane_angle, "u1_out_of_plane": out_of_plane})
    return pd.DataFrame(out)


def decompose(path: Path) -> None:
    """Print the known-truth split of the plug-in's error for the rows of a hull frame, by whether the
    hull covered."""
    f = pd.read_csv(path)
    with ProcessPoolExecutor(1) as pool:
        f = pd.concat(pool.map(decompose_draw, list(f.groupby(DRAW))), ignore_index=True)
    print(f"{len(f)} rows of {path}: |error| of the plug-in, of the plug-in with the population's next-token "
          "moments (U's error alone) and with the population's perception moments (V's error alone)")
    summary = f.assign(abs_plugin=f["plugin_error"].abs(), abs_U=f["plugin_U_error"].abs(),
                       abs_V=f["plugin_V_error"].abs())
    print(summary.groupby(["task_seed", "hull_covered"])[["abs_plugin", "abs_U", "abs_V", "phi_U", "phi_V",
                                                         "u1_in_plane_angle", "u1_out_of_plane"]]
          .median().round(3).to_string())
    print("(medians per population and whether the hull covered; u1_in_plane_angle: the sample's u_1 against the "
          "population's u_1 within the population's (u_1, u_2) plane, radians; u1_out_of_plane: the share of its "
          "squared norm outside that plane)")


#: The widened intervals a hull frame holds: (name, its covered column, its width-ratio column).
CONSTRUCTIONS = [("hull", "hull_covered", "hull_width_ratio"), ("fieller", "fieller_covered", "fieller_width_ratio"),
                 ("selective", "selective_covered", "selective_width_ratio"),
                 ("fieller_q", "fieller_q_covered", "fieller_q_width_ratio"),
                 ("selective_q", "selective_q_covered", "selective_q_width_ratio")]


def report(f: pd.DataFrame) -> None:
    f = f.drop_duplicates(subset=CELL + ["task_seed", "draw"], keep="last")   # a rerun repeats its first draws
    f = f.assign(failing=_in_failing(f))
    present = [c for c in CONSTRUCTIONS if c[1] in f.columns]
    print(f"{len(f):,} accepted rows, {f.groupby(DRAW).ngroups:,} draws; pooled coverage: interval "
          f"{f['covered'].mean():.3f}, " + ", ".join(f"{name} {f[cov].mean():.3f}" for name, cov, _ in present))
    for name, _, width in present:
        print(f"  {name}: median width over the interval's {f[width].median():.3f} (90% quantile "
              f"{f[width].quantile(0.9):.3f}, 99% {f[width].quantile(0.99):.3f})")
    cells = f.groupby(CELL + ["task_seed"]).agg(accepted=("covered", "size"), covered=("covered", "sum"),
                                                failing=("failing", "first"),
                                                **{f"{name}_covered": (cov, "sum") for name, cov, _ in present},
                                                **{f"{name}_width": (w, "median") for name, _, w in present})
    cells = cells.reset_index()
    cells = cells[cells["accepted"] >= MIN_ACCEPTED]
    below, above = exact_band_tests(cells["covered"], cells["accepted"])
    cells = cells.assign(coverage=cells["covered"] / cells["accepted"], below=below, above=above)
    print(f"cells (design x seed) with >= {MIN_ACCEPTED} accepted rows: {len(cells)}; significantly below 0.85 / "
          f"above 0.95 (exact binomial tests), and as a point value (not tested) below / above:")
    rows = [{"interval": "jackknife-t", "below": int(below.sum()), "above": int(above.sum()),
             "point_below": int((cells["coverage"] < 0.85).sum()), "point_above": int((cells["coverage"] > 0.95).sum())}]
    flagged = below | above
    for name, _, _ in present:
        b, a = exact_band_tests(cells[f"{name}_covered"], cells["accepted"])
        p = cells[f"{name}_covered"] / cells["accepted"]
        cells = cells.assign(**{name: p, f"{name}_below": b, f"{name}_above": a,
                                f"{name}_p_below": scipy.stats.binom.cdf(cells[f"{name}_covered"], cells["accepted"], 0.85)})
        rows.append({"interval": name, "below": int(b.sum()), "above": int(a.sum()),
                     "point_below": int((p < 0.85).sum()), "point_above": int((p > 0.95).sum())})
        flagged = flagged | b | a
    print(pd.DataFrame(rows).to_string(index=False))
    show = cells[cells["failing"] | flagged]
    columns = CELL[:-1] + ["task_seed", "accepted", "coverage", "below"]
    for name, _, _ in present:
        columns += [name, f"{name}_width", f"{name}_below", f"{name}_p_below", f"{name}_above"]
    print(show[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if "selective_covered" in f.columns:
        print("\ncoverage and median width ratio by bin of the row's sample gap ratio:")
        by_bin = f.groupby(pd.cut(f["gap_ratio"], [5, 6, 7, 8, 10, 15, np.inf], right=False), observed=True)
        table = by_bin.agg(rows=("covered", "size"), interval=("covered", "mean"),
                           **{name: (cov, "mean") for name, cov, _ in present},
                           **{f"{name}_width": (w, "median") for name, _, w in present})
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="*")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, nargs="*", help="report hull frames written before (--out)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--ks", type=int, nargs="*", help="only the rows at these k")
    parser.add_argument("--max-draws", type=int, default=None,
                        help="at most this many draws per design and seed (the first ones), for a quick run")
    parser.add_argument("--decompose", type=Path, help="a hull frame (--out) of a design: split its errors")
    parser.add_argument("--gap-min", type=float, default=GAP_MIN,
                        help="a stricter eigengap condition: keep the accepted rows whose gap ratio is at least this, "
                             "and condition the selective sets on it (default GAP_MIN, the flag's)")
    args = parser.parse_args()
    if args.decompose:
        decompose(args.decompose)
        return
    if args.report:
        report(pd.concat([pd.read_csv(p) for p in args.report], ignore_index=True))
        return
    parts = []
    for path in args.frames:
        f = pd.read_csv(path)
        f = f[(f["estimator"] == "richardson")]
        f = f[_flag_accepted(f)]
        parts.append(f[f["k"].isin(args.ks)] if args.ks else f)
    f = pd.concat(parts, ignore_index=True).drop_duplicates(subset=CELL + ["task_seed", "draw"], keep="last")
    f = f[f["gap_ratio"] >= args.gap_min]
    groups = list(f.groupby(DRAW))
    if args.max_draws:
        counts: dict = {}
        chosen = []
        for key, rows in groups:
            counts[key[:-1]] = counts.get(key[:-1], 0) + 1
            if counts[key[:-1]] <= args.max_draws:
                chosen.append((key, rows))
        groups = chosen
    start = time.time()
    with ProcessPoolExecutor(args.processes) as pool:
        frames = list(pool.map(hull_of_draw, [(key, rows, args.gap_min) for key, rows in groups], chunksize=8))
    out = pd.concat(frames, ignore_index=True)
    print(f"{len(groups)} draws in {time.time() - start:.0f} s on {args.processes} processes")
    if args.out:
        out.to_csv(args.out, index=False)
    report(out)


if __name__ == "__main__":
    main()
