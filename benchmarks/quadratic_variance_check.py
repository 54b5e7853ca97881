"""Does removing the jackknife's excess on the quadratic part of the error make the interval cover
at stationary points of NTPS? (issue 21, item 4; docs/estimator.md, "A variance without the
quadratic excess", session 29.)

Where the population NTPS is stationary (at 0 or 1, or inside (0, 1) with every principal angle at
0 or 90 degrees) the estimate's error is quadratic in the shards' noise, and the delete-one-shard
jackknife variance of richardson counts that part b(S) times (b(10) = 2.670; computed here exactly).
This script estimates the quadratic part's variance without that excess and narrows the interval
accordingly:

- richardson = 2 F(mean) - (F(mean of A) + F(mean of B)) / 2 for the plug-in F and a split A | B of
  the shards; for a quadratic F its quadratic part is the cross term between the halves, whose
  variance is T / S^2 with T = tr((H Omega)^2) (H: F's Hessian in the shard moments, Omega: one
  shard's covariance);
- the plug-in's interaction contrasts F(m + d_i + d_j) - F(m + d_i) - F(m + d_j) + F(m), i in A and
  j in B (m: the pooled moments, d_i: the change leaving shard i out) are (S - 1)^-2 u_i' H u_j with
  u_i shard i's deviation from m; the mean over i != k in A, j != l in B of
  (G_ij - G_il - G_kj + G_kl)^2 / 4, G = (S - 1)^2 times the contrasts, is unbiased for T whatever
  the mean (25 more plug-in solves at S = 10);
- variance = max(J - (b - 1) T / S^2, J / b), J the jackknife variance; Student-t interval as before.

Modes:
  --toy: b(S) exactly; then a quadratic-plus-linear statistic of Gaussian shard means, where the
      estimate of T is checked for bias and the interval for coverage.
  --cells SPEC.json --out CSV: draws of the package's generators (a JSON list of
      {"family", "settings", "ratio", "ks", "draws", "seed"}), each row with the jackknife-t
      interval and the narrowed one, the flag's conditions other than the bound condition, and the
      rotation condition recomputed for each interval.
  --report CSV...: per cell, coverage and bias / width of the rows the flag accepts as it stands
      (bound condition included) and of the rows the other conditions accept with the narrowed
      interval (no bound condition) and the share of the latter the bound condition would take; over the
      rows the other conditions accept, SD of the errors over the median SE, the 90% quantile of
      |error| / SE, Spearman correlation of |error| with the SE and the errors' excess kurtosis.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.estimators import (  # noqa: E402
    GAP_MIN,
    NOISE_MAX,
    _richardson_combination,
    ntps_estimate,
    split_halves,
)
from ntps_nb.core.intervals import theory_values  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.rotation import rotation_stability  # noqa: E402
from ntps_nb.core.score import InterpolationWarning, theory_geometry  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, reflection_model, sample_shards  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402

FAMILIES = {"factor": factor_model, "lds": lds_model, "reflection": reflection_model}
LEVEL = 0.90
N_SHARDS = 10


# --------------------------------------------------------------------------------------------
# richardson's jackknife factor on a quadratic statistic, exactly


def _richardson_coefficients(S: int, a_idx, b_idx, keep: np.ndarray) -> np.ndarray:
    """(S, S) M with richardson = z' (M kron H) z for F(x) = x' H x / 2 of the shard means z (equal
    shards, stacked), on the shards ``keep`` with the split a_idx | b_idx."""
    parts = [np.flatnonzero(keep), [i for i in a_idx if keep[i]], [i for i in b_idx if keep[i]]]
    means = []
    for part in parts:
        mean = np.zeros(S)
        mean[part] = 1 / len(part)
        means.append(np.outer(mean, mean) / 2)
    return _richardson_combination(means[0], means[1:], [len(p) for p in parts[1:]], len(parts[0]))


def jackknife_factor(S: int) -> tuple[float, float]:
    """(b, v): E[J] = b Var(richardson) and Var(richardson) = v T / S^2 for a quadratic F of
    Gaussian shard means (the split into halves S // 2 | S - S // 2); E[(z' (N kron H) z)^2] =
    tr(N)^2 tr(H Omega)^2 + 2 tr(N^2) T, so both follow from the coefficient matrices."""
    a_idx, b_idx = np.arange(S // 2), np.arange(S // 2, S)
    full = _richardson_coefficients(S, a_idx, b_idx, np.ones(S, bool))
    loo = [_richardson_coefficients(S, a_idx, b_idx, np.arange(S) != i) for i in range(S)]
    centre = np.mean(loo, axis=0)
    excess = (S - 1) / S * sum(2 * np.trace((m - centre) @ (m - centre)) for m in loo)
    variance = 2 * np.trace(full @ full)
    return excess / variance, variance * S**2


def cross_half_T(G: np.ndarray) -> np.ndarray:
    """Unbiased T = tr((H Omega)^2) from G[a, b, ...] = u_i' H u_j (i the a-th shard of A, j the b-th of
    B): the mean of (G_ij - G_il - G_kj + G_kl)^2 / 4 over i != k, j != l (deviations from the unknown
    mean cancel in the differences)."""
    quads = np.array([(i, k, j, m) for i, k in itertools.permutations(range(G.shape[0]), 2)
                      for j, m in itertools.permutations(range(G.shape[1]), 2)])
    i, k, j, m = quads.T
    return np.mean((G[i, j] - G[i, m] - G[k, j] + G[k, m]) ** 2, axis=0) / 4


# --------------------------------------------------------------------------------------------
# the toy


def _toy(S: int, p: int, linear: float, hessian: str, draws: int, rng: np.random.Generator) -> dict:
    H = -np.eye(p) if hessian == "negative" else np.diag(rng.choice([-1.0, 1.0], p))
    g = np.zeros(p)
    g[0] = linear
    b, _ = jackknife_factor(S)
    a_idx, b_idx = np.arange(S // 2), np.arange(S // 2, S)
    t = st.t.ppf((1 + LEVEL) / 2, S - 1)

    def F(x):
        return x @ g + 0.5 * np.einsum("...i,ij,...j->...", x, H, x)

    def rich(z, keep):
        parts = [np.flatnonzero(keep), [i for i in a_idx if keep[i]], [i for i in b_idx if keep[i]]]
        values = [F(z[part].mean(0)) for part in parts]
        return _richardson_combination(values[0], values[1:], [len(p) for p in parts[1:]], len(parts[0]))

    covered = np.zeros(2)
    T_hat = np.empty(draws)
    for draw in range(draws):
        z = rng.standard_normal((S, p))  # shard deviations, Omega = I; truth F(0) = 0
        estimate = rich(z, np.ones(S, bool))
        loo = np.array([rich(z, np.arange(S) != i) for i in range(S)])
        J = (S - 1) / S * np.sum((loo - loo.mean()) ** 2)
        m = z.mean(0)
        d = np.array([np.delete(z, i, 0).mean(0) - m for i in range(S)])
        Fi = F(m + d)
        C = np.array([[F(m + d[i] + d[j]) - Fi[i] - Fi[j] + F(m) for j in b_idx] for i in a_idx])
        T_hat[draw] = cross_half_T(C * (S - 1) ** 2)
        V = max(J - (b - 1) * T_hat[draw] / S**2, J / b)
        covered += [abs(estimate) <= t * np.sqrt(J), abs(estimate) <= t * np.sqrt(V)]
    T = np.trace(H @ H)
    return {"p": p, "hessian": hessian, "linear": linear, "E That / T": T_hat.mean() / T,
            "MC SE": T_hat.std() / T / np.sqrt(draws), "SD That / T": T_hat.std() / T,
            "jackknife covers": covered[0] / draws, "narrowed covers": covered[1] / draws}


def toy(draws: int) -> None:
    print("richardson's jackknife factor on a quadratic statistic, exactly (b: E[J] / Var):")
    for S in (6, 8, 10, 16, 20, 32):
        b, v = jackknife_factor(S)
        print(f"  S = {S:2d}: b = {b:.4f}; Var(richardson) = {v:.4f} T / S^2")
    rng = np.random.default_rng(29)
    rows = [_toy(N_SHARDS, p, linear, hessian, draws, rng)
            for p, hessian in ((20, "negative"), (20, "mixed"), (3, "negative"), (1, "negative"))
            for linear in (0.0, 0.15, 0.5, 2.0)]
    print(f"\nS = {N_SHARDS}, {draws} draws a row (coverage SE ~ {np.sqrt(0.09 / draws):.3f} at 0.90):")
    print(pd.DataFrame(rows).round(3).to_string(index=False))


# --------------------------------------------------------------------------------------------
# the generators


def _plugin(shards: list[Moments], weights: np.ndarray, ks: np.ndarray) -> np.ndarray:
    return theory_values(theory_geometry(Moments.combine(shards, weights), rtol=RANGE_RTOL), ks)


def quadratic_variance(shards: list[Moments], ks: np.ndarray, seed: int) -> np.ndarray:
    """T / S^2 at each k from the plug-in's cross-half interaction contrasts (richardson's split of
    ``seed``); shards treated as equal units."""
    S = len(shards)
    n = np.array([s.n_texts for s in shards], dtype=float)
    share = n / n.sum()
    loo = [np.where(np.arange(S) == i, 0.0, n / (n.sum() - n[i])) for i in range(S)]
    a_idx, b_idx = split_halves(S, seed)
    pooled = _plugin(shards, np.ones(S), ks)
    left_out = {i: _plugin(shards, loo[i] / share, ks) for i in range(S)}
    contrasts = np.array([[_plugin(shards, (loo[i] + loo[j] - share) / share, ks) - left_out[i] - left_out[j] + pooled
                           for j in b_idx] for i in a_idx])
    return cross_half_T(contrasts * (S - 1) ** 2) / S**2


def draw_shards(family: str, settings: dict, ratio: float, ks: np.ndarray, draw: int,
                seed: int) -> tuple[np.ndarray, list[Moments]]:
    """(population NTPS at ks, the N_SHARDS shards of draw ``draw``) of a spec's population at N/d = ratio."""
    model = FAMILIES[family](**settings)
    rng = np.random.default_rng([seed, int(round(ratio * 1000)), draw])
    return model.population_ntps(ks), sample_shards(model, int(round(ratio * model.d)), N_SHARDS, rng)


def one_draw(args) -> pd.DataFrame:
    family, settings, ratio, ks, draw, seed = args
    ks = np.asarray(ks)
    with analysis_threads(1):
        truth, shards = draw_shards(family, settings, ratio, ks, draw, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            frame = ntps_estimate(shards, ks, seed=draw, rotation_flag=False)
        b, _ = jackknife_factor(N_SHARDS)
        t = st.t.ppf((1 + LEVEL) / 2, N_SHARDS - 1)
        v_quadratic = quadratic_variance(shards, ks, draw)
        J = frame["se"].to_numpy() ** 2
        se_narrow = np.sqrt(np.maximum(J - (b - 1) * v_quadratic, J / b))
        # the flag's conditions other than the bound condition (noise, eigengaps, finite, meets [0, 1]):
        # at_bound is set whatever the others say, so it is and-ed with them here
        conditions = ((frame["subspace_noise"] <= NOISE_MAX) & (frame["gap_ratio"] >= GAP_MIN)
                      & (frame["lower"] <= 1) & (frame["upper"] >= 0))
        other = (frame["reliable"] | (frame["at_bound"] & conditions)).to_numpy()
        as_is = rotation_stability(shards, frame, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
        narrow = frame.assign(se=se_narrow, lower=frame["estimate"] - t * se_narrow,
                              upper=frame["estimate"] + t * se_narrow)
        feasible = (narrow["lower"] <= 1) & (narrow["upper"] >= 0)
        narrow = rotation_stability(shards, narrow.assign(reliable=other & feasible), level=LEVEL, gap_min=GAP_MIN,
                                    rtol=RANGE_RTOL)
    error = frame["estimate"].to_numpy() - truth
    return pd.DataFrame({
        "family": family, "settings": json.dumps(settings, sort_keys=True), "n_over_d": ratio, "seed": seed,
        "draw": draw, "k": ks, "truth": truth, "estimate": frame["estimate"], "se": frame["se"],
        "se_narrow": se_narrow, "v_quadratic": v_quadratic, "subspace_noise": frame["subspace_noise"],
        "gap_ratio": frame["gap_ratio"], "other": other, "at_bound": frame["at_bound"],
        "reliable": as_is["reliable"], "reliable_narrow": narrow["reliable"],
        "covered": np.abs(error) <= t * frame["se"].to_numpy(), "covered_narrow": np.abs(error) <= t * se_narrow,
        "width": 2 * t * frame["se"], "width_narrow": 2 * t * se_narrow})


def cells(spec_path: str, out: str, processes: int, worker=None, extra: tuple = ()) -> None:
    """Run ``worker`` (default `one_draw`) on every draw of the spec's populations, with ``extra``
    appended to each job's (family, settings, ratio, ks, draw, seed), on ``processes`` processes;
    write the rows to ``out``."""
    spec = json.loads(Path(spec_path).read_text())
    jobs = [(s["family"], s["settings"], s["ratio"], s["ks"], draw, s["seed"], *extra)
            for s in spec for draw in range(s["draws"])]
    with Pool(processes) as pool:
        frames = pool.map(worker or one_draw, jobs, chunksize=4)
    pd.concat(frames, ignore_index=True).to_csv(out, index=False)
    print(f"wrote {out}: {len(jobs)} draws")


def band(covered: int, n: int) -> str:
    """' below' / ' above' where ``covered`` of ``n`` (>= 10) is significantly below 0.85 / above 0.95
    (exact one-sided binomial tests at 2.5%), else ''."""
    if n < 10:
        return ""
    if st.binom.cdf(covered, n, 0.85) < 0.025:
        return " below"
    if st.binom.sf(covered - 1, n, 0.95) < 0.025:
        return " above"
    return ""


def report(paths: list[str]) -> None:
    frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    rows, tally = [], {}
    for (family, settings, ratio, k), g in frame.groupby(["family", "settings", "n_over_d", "k"]):
        s = json.loads(settings)
        row = {"family": family, "d": s["d"], "C": s["n_classes"], "gap": s["gap"],
               "angle": round(s.get("angle", np.pi / 4), 3), "seed": s["seed"], "N/d": ratio, "k": k,
               "truth": round(g["truth"].iloc[0], 4)}
        for name, keep, covered, width in (("flag as it is", "reliable", "covered", "width"),
                                           ("narrowed, no bound condition", "reliable_narrow", "covered_narrow",
                                            "width_narrow")):
            h = g[g[keep].astype(bool)]
            n, x = len(h), int(h[covered].sum())
            bias = (h["estimate"] - h["truth"]).mean() / h[width].mean() if n else np.nan
            row[name] = f"{x}/{n}" + (f" {x / n:.3f}{band(x, n)}, bias/width {bias:+.2f}" if n else "")
            if n >= 10:
                t = tally.setdefault(name, {"cells": 0, "below": 0, "above": 0, "|bias| > width / 4": 0})
                t["cells"] += 1
                t["below"] += band(x, n) == " below"
                t["above"] += band(x, n) == " above"
                t["|bias| > width / 4"] += abs(bias) > 0.25
        narrowed = g[g["reliable_narrow"].astype(bool)]
        row["narrowed rows at_bound"] = f"{narrowed['at_bound'].mean():.2f}" if len(narrowed) else ""
        other = g[g["other"].astype(bool)]
        if len(other) >= 30:
            error = other["estimate"] - other["truth"]
            row["SD / median se, se_narrow"] = (f"{error.std() / other['se'].median():.2f}, "
                                                f"{error.std() / other['se_narrow'].median():.2f}")
            row["q90 |error| / se_narrow"] = round(float((error.abs() / other["se_narrow"]).quantile(0.9)), 2)
            row["spearman(|error|, se)"] = round(float(error.abs().corr(other["se"], method="spearman")), 2)
            row["excess kurtosis"] = round(float(st.kurtosis(error)), 1)
        rows.append(row)
    pd.set_option("display.width", 300)
    print(f"t quantile of the interval: {st.t.ppf((1 + LEVEL) / 2, N_SHARDS - 1):.3f}; 'below' / 'above': exact "
          "one-sided binomial test against 0.85 / 0.95 at 2.5% (cells with >= 10 rows); statistics of the "
          "errors over the rows the other conditions accept (>= 30)")
    print(pd.DataFrame(rows).to_string(index=False))
    print("\ncells with >= 10 rows (bias as a point value):")
    for name, t in tally.items():
        print(f"  {name}: " + ", ".join(f"{key} {value}" for key, value in t.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true")
    parser.add_argument("--toy-draws", type=int, default=2000)
    parser.add_argument("--cells")
    parser.add_argument("--out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report", nargs="+")
    args = parser.parse_args()
    if args.toy:
        toy(args.toy_draws)
    if args.cells:
        cells(args.cells, args.out, args.processes)
    if args.report:
        report(args.report)


if __name__ == "__main__":
    main()
