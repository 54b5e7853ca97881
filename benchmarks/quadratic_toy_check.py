"""The default interval on a linear-plus-quadratic toy with known truth, by the quadratic part's rank and
share; and an unbiased variance of T-hat in place of its jackknife (issue 21, item 4; docs/estimator.md,
session 32).

The toy is the statistic F(x) = g'x + x'Hx / 2 of S = 10 equal shards' means (x the pooled mean's
deviation from the population, standard normal per shard), truth F(0) = 0: the local model the
quadratic interval is derived for (`ntps_nb.core.quadratic`). H = -I on r directions (``--signs mixed``:
alternating signs, a saddle) and g along one further direction, scaled so that the quadratic part is
the given share of richardson's variance: share 1 is a stationary point.

Printed, per (signs, r, share): the coverage of the default interval (`quadratic_interval`, Satterthwaite
degrees of freedom on T-hat's delete-one-shard jackknife variance), of the same interval with T-hat's
variance estimated without bias (`unbiased_T_variance`, below; negative estimates read as 0), of the
jackknife-t interval; the 90% quantile of |error| / SE against the median t; the share of rows whose t
has S - 1 degrees of freedom (at the floor, or capped). Before that, the two variances of T-hat against
T-hat's variance across draws (purely quadratic toys).

The unbiased variance: T-hat is a two-sample U-statistic of degree (2, 2) over the shards of the two
halves (the mean of h = (z_i - z_k)'H(z_j - z_l)^2 / 4 over pairs i, k of one half and j, l of the
other). E[T-hat^2] - theta^2 is its variance, and theta^2 has the unbiased estimate Q, the mean of
h(q) h(q') over pairs of quadruples q, q' that share no shard (each half needs 4 shards), so T-hat^2 - Q
is unbiased; the jackknife's expectation exceeds the variance (Efron-Stein).

With --cells: the effective rank of the interactions G (`ntps_nb.core.quadratic.interactions`, 5 x 5 at
10 shards; a quadratic part of rank 1 gives a rank-1 G), (sum of singular values)^2 / sum of their
squares, on d = 16 cells of the generators at N/d = 32, against the default interval's coverage on all
rows: whether G tells a low-rank stationary point from the rest.

With --floor: the default interval's rows at its floor (the removed excess reaches J (1 - variance /
jackknife), so the variance is J variance / jackknife on S - 1 degrees of freedom) against the rest, at 10
and 20 shards, by rank and share: where the rows at the floor cover within the interval's own coverage; and
the variant that keeps the Satterthwaite degrees of freedom at the floor (continuous there).

With --cap (session 34): T-hat from 3, 4 or 5 shards of each half of the split against every shard, at 10 and 20 shards
(`ntps_nb.core.quadratic.INTERACTION_HALF`). With --shrink (session 34): the default against removing only the excess
T-hat is sure of, max(T-hat - kappa SE(T-hat), 0), a variant for the rows at the floor.

    python benchmarks/quadratic_toy_check.py --draws 2000
    python benchmarks/quadratic_toy_check.py --cells --draws 300 --seed 301
    python benchmarks/quadratic_toy_check.py --floor --draws 4000 --seed 1
    python benchmarks/quadratic_toy_check.py --cap --draws 4000 --seed 2
    python benchmarks/quadratic_toy_check.py --shrink --draws 4000 --seed 3
"""

from __future__ import annotations

import argparse
import itertools
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ntps_nb.core import quadratic  # noqa: E402
from ntps_nb.core.estimators import split_halves  # noqa: E402

S = 10
LEVEL = 0.90
N_TEXTS = 50  # texts per shard: only the shares matter


def unbiased_T_variance(G: np.ndarray) -> np.ndarray:
    """T-hat^2 less the unbiased estimate of T^2 from pairs of disjoint quadruples (each half needs 4 shards)."""
    G = np.asarray(G, dtype=np.float64)
    pairs_a = list(itertools.combinations(range(G.shape[0]), 2))
    pairs_b = list(itertools.combinations(range(G.shape[1]), 2))
    h = np.array([[(G[i, j] - G[i, m] - G[k, j] + G[k, m]) ** 2 / 4 for j, m in pairs_b] for i, k in pairs_a])
    disjoint_a = np.array([[not set(p) & set(q) for q in pairs_a] for p in pairs_a], dtype=float)
    disjoint_b = np.array([[not set(p) & set(q) for q in pairs_b] for p in pairs_b], dtype=float)
    if not disjoint_a.any() or not disjoint_b.any():
        raise ValueError(f"the unbiased variance needs at least 4 shards in each half, got {G.shape[:2]}")
    T_hat = h.mean(axis=(0, 1))
    Q = np.einsum("ab,cd,ac...,bd...->...", disjoint_a, disjoint_b, h, h) / (disjoint_a.sum() * disjoint_b.sum())
    return T_hat ** 2 - Q


def toy(r: int, share: float, signs: str, draws: int, seed: int, shards: int = S):
    """Draws of the toy: its F, the shard deviations z (draws, shards, r + 1), richardson's estimate and its
    jackknife SE."""
    rng = np.random.default_rng([seed, r, round(share * 1000), signs == "mixed", *([] if shards == S else [shards])])
    h = -np.ones(r)
    if signs == "mixed":
        h[::2] = 1.0
    H = np.diag(np.r_[0.0, h])
    g = np.zeros(r + 1)
    if share < 1:  # linear variance 1 / S against the quadratic's r / S^2 (T = r)
        g[0] = np.sqrt(r / shards * (1 - share) / share)

    def F(x):
        return x @ g + 0.5 * np.einsum("...i,ij,...j->...", x, H, x)

    z = rng.standard_normal((draws, shards, r + 1))
    a, b = split_halves(shards, 0)
    estimate = quadratic.local_richardson(z, F, a, b)
    se = np.sqrt(quadratic.local_jackknife_variance(z, F, a, b))
    return F, z, estimate, se


def interval(F, z, estimate, se, T_variance, half: int | None = quadratic.INTERACTION_HALF) -> pd.DataFrame:
    """`quadratic_interval` on the toy's draws (one row each), with T-hat's variance from ``T_variance`` and
    T-hat from at most ``half`` shards of each half."""
    S = z.shape[1]
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, S - 1)
    frame = pd.DataFrame({"k": np.arange(len(estimate)), "estimator": "richardson", "estimate": estimate, "se": se,
                          "lower": estimate - t * se, "upper": estimate + t * se, "subspace_noise": 0.0,
                          "gap_ratio": np.inf})
    return quadratic.quadratic_interval([types.SimpleNamespace(n_texts=N_TEXTS)] * S, frame, level=LEVEL, seed=0,
                                        noise_max=1.0, gap_min=0.0, T_variance=T_variance, interaction_half=half,
                                        solve=lambda counts: quadratic.local_poolings(z, F, counts))


def at_floor(out: pd.DataFrame, shards: int) -> np.ndarray:
    """Rows of `interval`'s frame whose variance is at the floor J variance / jackknife."""
    variance, jackknife = quadratic.quadratic_factors(shards, 0)
    return np.isclose(out["se"] ** 2, out["se_jackknife"] ** 2 * variance / jackknife, rtol=1e-9, atol=0.0)


def variance_table(draws: int, seed: int) -> pd.DataFrame:
    rows = []
    for r in (1, 2, 5, 20):
        F, z, _, _ = toy(r, 1.0, "same", draws, seed)
        counts, _, _ = quadratic.contrast_counts(np.full(S, N_TEXTS), 0)
        base = quadratic.local_poolings(z, F, np.vstack([np.ones(S), 1.0 - np.eye(S)]))
        G = quadratic.interactions(base[0], base[1:], quadratic.local_poolings(z, F, counts), S, 0)
        T_hat, jack, unbiased = quadratic.interaction_T(G), quadratic.interaction_T_variance(G), unbiased_T_variance(G)
        rows.append({"r (= T)": r, "T-hat mean": T_hat.mean(), "Var(T-hat) across draws": T_hat.var(),
                     "jackknife: mean": jack.mean(), "jackknife: SD": jack.std(), "unbiased: mean": unbiased.mean(),
                     "unbiased: SD": unbiased.std(), "unbiased < 0": (unbiased < 0).mean()})
    return pd.DataFrame(rows)


def coverage_table(draws: int, seed: int) -> pd.DataFrame:
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, S - 1)
    rows = []
    for signs in ("same", "mixed"):
        for r in (1, 2, 4, 8):
            if signs == "mixed" and r == 1:
                continue
            for share in (1.0, 0.8, 0.5, 0.2):
                F, z, estimate, se = toy(r, share, signs, draws, seed)
                out = interval(F, z, estimate, se, quadratic.interaction_T_variance)
                unbiased = interval(F, z, estimate, se, lambda G: np.maximum(unbiased_T_variance(G), 0.0))
                pivot = np.abs(estimate) / out["se"]
                rows.append({"signs": signs, "r": r, "share": share,
                             "default": ((out["lower"] <= 0) & (0 <= out["upper"])).mean(),
                             "unbiased Var(T-hat)": ((unbiased["lower"] <= 0) & (0 <= unbiased["upper"])).mean(),
                             "jackknife-t": (np.abs(estimate) <= t * se).mean(),
                             "q90 |error|/SE": np.quantile(pivot, 0.9),
                             "median t": np.median(scipy.stats.t.ppf((1 + LEVEL) / 2, out["df"])),
                             "df = S - 1": (out["df"] == S - 1).mean(),
                             "width ratio (unbiased / default)": np.median((unbiased["upper"] - unbiased["lower"])
                                                                           / (out["upper"] - out["lower"]))})
    return pd.DataFrame(rows)


def designs(draws: int, seed: int):
    """The per-row tables' toys: (shards, r, share, F, z, estimate, se) at 10 and 20 shards, rank 1, 2, 8 and share
    1, 0.8, 0.5, 0.2 (signs "same")."""
    for shards in (S, 2 * S):
        for r in (1, 2, 8):
            for share in (1.0, 0.8, 0.5, 0.2):
                yield (shards, r, share, *toy(r, share, "same", draws, seed, shards=shards))


def floor_table(draws: int, seed: int) -> pd.DataFrame:
    """The default interval's rows at its floor (variance J variance / jackknife, S - 1 degrees of freedom)
    and the rest, by the number of shards, the quadratic part's rank and its share (signs "same"); and a
    variant whose t has the Satterthwaite degrees of freedom at the floor too (continuous across it)."""
    rows = []
    for shards, r, share, F, z, estimate, se in designs(draws, seed):
        variance, jackknife = quadratic.quadratic_factors(shards, 0)
        T_var = []  # T-hat's variance as the interval computed it, for the variant below

        def recorded(G):
            T_var.append(quadratic.interaction_T_variance(G))
            return T_var[-1]

        out = interval(F, z, estimate, se, recorded)
        covered = ((out["lower"] <= 0) & (0 <= out["upper"])).to_numpy()
        J = se ** 2
        floor = at_floor(out, shards)
        # the variant: at the floor too, the Satterthwaite degrees of freedom of the excess (not S - 1)
        excess_variance = (jackknife - variance) ** 2 * T_var[0]
        df = np.clip(2 * out["se"] ** 4 / (2 * J ** 2 / (shards - 1) + excess_variance), 1.0, shards - 1)
        continuous = np.abs(estimate) <= scipy.stats.t.ppf((1 + LEVEL) / 2, df) * out["se"]
        rows.append({"shards": shards, "r": r, "share": share, "at the floor": floor.mean(),
                     "coverage at the floor": covered[floor].mean() if floor.any() else np.nan,
                     "coverage of the rest": covered[~floor].mean() if (~floor).any() else np.nan,
                     "coverage": covered.mean(),
                     "variant: at the floor": continuous[floor].mean() if floor.any() else np.nan,
                     "variant: coverage": continuous.mean()})
    return pd.DataFrame(rows)


def cap_table(draws: int, seed: int) -> pd.DataFrame:
    """The default interval with T-hat from at most ``half`` shards of each half against every shard, on the
    same draws, at 10 and 20 shards, by the quadratic part's rank and share (signs "same")."""
    rows = []
    for shards, r, share, F, z, estimate, se in designs(draws, seed):
        halves = [h for h in (3, 4, 5) if h < shards // 2] + [None]
        outs = {h: interval(F, z, estimate, se, quadratic.interaction_T_variance, half=h) for h in halves}
        width_all = outs[None]["upper"] - outs[None]["lower"]
        for h, out in outs.items():
            n = shards // 2 if h is None else h
            rows.append({"shards": shards, "half": n, "plug-ins": n * n, "r": r, "share": share,
                         "coverage": ((out["lower"] <= 0) & (0 <= out["upper"])).mean(),
                         "width / all": np.median((out["upper"] - out["lower"]) / width_all),
                         "median df": out["df"].median(),
                         "at the floor": at_floor(out, shards).mean()})
    return pd.DataFrame(rows)


def shrink_table(draws: int, seed: int) -> pd.DataFrame:
    """The default interval against variants that remove only the excess T-hat is sure of: T-hat less kappa times
    its jackknife SE (at least 0), the rest of the construction as the default's (floor, Satterthwaite degrees of
    freedom on T-hat's variance); by shards, the quadratic part's rank and share (signs "same")."""
    rows = []
    for shards, r, share, F, z, estimate, se in designs(draws, seed):
        variance, jackknife = quadratic.quadratic_factors(shards, 0)
        seen = {}

        def recorded(G):
            seen["T"], seen["var"] = quadratic.interaction_T(G), quadratic.interaction_T_variance(G)
            return seen["var"]

        out = interval(F, z, estimate, se, recorded)
        J, floor = se ** 2, se ** 2 * variance / jackknife
        row = {"shards": shards, "r": r, "share": share}
        for kappa in (0.0, 0.5, 1.0, 2.0):
            excess = (jackknife - variance) * np.maximum(seen["T"] - kappa * np.sqrt(seen["var"]), 0.0)
            floored = J - excess <= floor
            V = np.maximum(J - excess, floor)
            df = quadratic.satterthwaite_df(J, excess, (jackknife - variance) ** 2 * seen["var"], floored, shards)
            covered = np.abs(estimate) <= scipy.stats.t.ppf((1 + LEVEL) / 2, df) * np.sqrt(V)
            if kappa == 0.0:  # the default, recomputed: a check on this table's construction
                np.testing.assert_allclose(np.sqrt(V), out["se"], rtol=1e-9)
            name = "default" if kappa == 0.0 else f"kappa {kappa:g}"
            row[f"{name}: coverage"] = covered.mean()
            row[f"{name}: at the floor"] = floored.mean()
            row[f"{name}: floor rows cover"] = covered[floored].mean() if floored.any() else np.nan
            row[f"{name}: width"] = np.median(scipy.stats.t.ppf((1 + LEVEL) / 2, df) * np.sqrt(V))
        rows.append(row)
    f = pd.DataFrame(rows)
    for kappa in ("kappa 0.5", "kappa 1", "kappa 2"):  # widths relative to the default's
        f[f"{kappa}: width"] = f[f"{kappa}: width"] / f["default: width"]
    return f.drop(columns="default: width")


def interaction_rank_table(draws: int, seed: int) -> pd.DataFrame:
    from functools import partial

    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.simulate import lds_model, reflection_model, sample_shards
    from ntps_nb.core.subspaces import RANGE_RTOL

    cells = {"reflection C=3 angle 0 (stationary)": (partial(reflection_model, n_classes=3, angle=0.0), [1, 2]),
             "reflection C=6 angle 0 (stationary)": (partial(reflection_model, n_classes=6, angle=0.0), [1, 2]),
             "lds C=2 tied (edge at k = 2)": (partial(lds_model, n_classes=2, gap="tied"), [1, 2]),
             "lds C=2 separated": (partial(lds_model, n_classes=2, gap="separated"), [1, 2]),
             "reflection C=3": (partial(reflection_model, n_classes=3), [1, 2])}
    rows = []
    for name, (make, ks) in cells.items():
        model = make(d=16, gap="separated", seed=seed) if "reflection" in name else make(d=16, seed=seed)
        truth = model.population_ntps(np.asarray(ks))
        for draw in range(draws):
            shards = sample_shards(model, 32 * model.d, S, np.random.default_rng([seed, 32, draw]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frame = ntps_estimate(shards, ks, seed=draw)
            solve = quadratic.numpy_plugins(shards, np.asarray(ks), RANGE_RTOL)
            counts, _, _ = quadratic.contrast_counts(np.array([m.n_texts for m in shards]), draw)
            base = solve(np.vstack([np.ones(S), 1.0 - np.eye(S)]))
            G = quadratic.interactions(base[0], base[1:], solve(counts), S, draw)
            for i, k in enumerate(ks):
                sv = np.linalg.svd(G[:, :, i], compute_uv=False)
                rows.append({"cell": name, "k": k, "truth": truth[i], "effective rank": sv.sum() ** 2 / (sv ** 2).sum(),
                             "covered": frame["lower"].iloc[i] <= truth[i] <= frame["upper"].iloc[i]})
    f = pd.DataFrame(rows)
    f["rank bin"] = pd.cut(f["effective rank"], [1.0, 2.0, 2.5, 3.0, 5.0], include_lowest=True)
    out = f.groupby(["cell", "k"]).agg(truth=("truth", "first"), coverage=("covered", "mean"),
                                        median_rank=("effective rank", "median"))
    for interval, rows in f.groupby("rank bin", observed=False):
        cell = rows.groupby(["cell", "k"])["covered"]
        out[f"rank {interval}"] = (cell.mean().round(3).astype(str) + " (" + cell.size().astype(str) + ")")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", action="store_true", help="the interactions' effective rank on d = 16 cells")
    parser.add_argument("--floor", action="store_true",
                        help="coverage of the rows at the interval's floor and of the rest, at 10 and 20 shards")
    parser.add_argument("--cap", action="store_true",
                        help="T-hat from 3, 4 or 5 shards of each half against every shard, at 10 and 20 shards")
    parser.add_argument("--shrink", action="store_true",
                        help="the default against removing T-hat less kappa of its SEs (floor rows, coverage)")
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    # the per-row tables: (table, what the SE is of, what the header adds)
    tables = {"shrink": (shrink_table, "", "the same draws for every variant; kappa k: the excess from max(T-hat - k "
                                           "SE(T-hat), 0); width: median of the variant's half-width over the default's"),
              "cap": (cap_table, "", "the same draws for every half; width / all: median ratio of the interval's width to "
                                     "the one with every shard of each half; plug-ins: the interactions' |A| |B|"),
              "floor": (floor_table, " over all of them", "the floor: variance J variance / jackknife, S - 1 degrees of "
                                                          "freedom")}
    for mode, (table, over, what) in tables.items():
        if getattr(args, mode):
            se = np.sqrt(LEVEL * (1 - LEVEL) / args.draws)
            print(f"{args.draws} draws per row (binomial SE of a coverage at 0.90{over}: {se:.3f}), seed {args.seed}, "
                  f"signs same; truth 0; {what}")
            print(table(args.draws, args.seed).round(3).to_string(index=False))
            return
    if args.cells:
        print(f"{args.draws} draws per cell, d = 16, N/d = 32, S = {S}, seed {args.seed}; coverage of the default "
              "interval on every row (flag ignored), overall and by the interactions' effective rank (mean, rows)")
        print(interaction_rank_table(args.draws, args.seed).round(3).to_string())
        return
    se = np.sqrt(LEVEL * (1 - LEVEL) / args.draws)
    print(f"{args.draws} draws per row, S = {S}; binomial SE of a coverage at 0.90: {se:.3f}\n")
    print("T-hat's variance, purely quadratic toys (H = -I on r directions):")
    print(variance_table(args.draws, args.seed).round(3).to_string(index=False))
    print("\ncoverage (nominal 0.90; truth 0) by the quadratic part's rank r, signs and share of the variance:")
    print(coverage_table(args.draws, args.seed).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
