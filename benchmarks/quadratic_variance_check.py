"""Does removing the jackknife's excess on the quadratic part of the error make the interval cover
at stationary points of NTPS? (issue 21, item 4; docs/estimator.md, "A variance without the
quadratic excess", session 29; the construction is the package's since session 30,
`ntps_nb.core.quadratic`, `ntps_estimate(interval="quadratic")`, which since session 31 reads its t on
the Satterthwaite degrees of freedom: this script rebuilds session 29's t on S - 1 and its flag.)

Where the population NTPS is stationary (at 0 or 1, or inside (0, 1) with every principal angle at
0 or 90 degrees) the estimate's error is quadratic in the shards' noise, and the delete-one-shard
jackknife variance of richardson counts that part b(S) times (b(10) = 2.670, exactly). The
interval's variance is max(J - (b - 1) T / S^2, J / b), J the jackknife's, T = tr((H Omega)^2)
estimated without bias from the plug-in's interaction contrasts between shards of different halves
(`ntps_nb.core.quadratic`'s docstring has the derivation).

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
    flag_conditions,
    ntps_estimate,
)
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.quadratic import (  # noqa: E402
    interaction_T,
    local_jackknife_variance,
    local_richardson,
    numpy_plugins,
    quadratic_factors,
    quadratic_interval,
)
from ntps_nb.core.rotation import rotation_stability  # noqa: E402
from ntps_nb.core.score import InterpolationWarning  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, reflection_model, sample_shards  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402

FAMILIES = {"factor": factor_model, "lds": lds_model, "reflection": reflection_model}
LEVEL = 0.90
N_SHARDS = 10


def jackknife_factor(S: int) -> tuple[float, float]:
    """(b, v): E[J] = b Var(richardson) and Var(richardson) = v T / S^2 for a quadratic F of the shard
    means (the package's exact coefficients, `quadratic_factors`)."""
    variance, jackknife = quadratic_factors(S, seed=0)
    return jackknife / variance, variance * S**2


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

    covered = np.zeros(2)
    T_hat = np.empty(draws)
    for draw in range(draws):
        z = rng.standard_normal((S, p))  # shard deviations, Omega = I; truth F(0) = 0
        estimate = local_richardson(z[None], F, a_idx, b_idx)[0]
        J = local_jackknife_variance(z[None], F, a_idx, b_idx)[0]
        m = z.mean(0)
        d = np.array([np.delete(z, i, 0).mean(0) - m for i in range(S)])
        Fi = F(m + d)
        C = np.array([[F(m + d[i] + d[j]) - Fi[i] - Fi[j] + F(m) for j in b_idx] for i in a_idx])
        T_hat[draw] = interaction_T(C * (S - 1) ** 2)
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
            frame = ntps_estimate(shards, ks, seed=draw, rotation_flag=False, interval="jackknife")
        t = st.t.ppf((1 + LEVEL) / 2, N_SHARDS - 1)
        quadratic = quadratic_interval(shards, frame, level=LEVEL, seed=draw, noise_max=NOISE_MAX, gap_min=GAP_MIN,
                                       solve=numpy_plugins(shards, ks, RANGE_RTOL))
        se_narrow = quadratic["se"].to_numpy()
        # this script measures session 29's construction: the Student t on S - 1 degrees of freedom (the
        # package's interval reads it on the Satterthwaite degrees of freedom since session 31), its flag's
        # conditions on that interval
        estimate = quadratic["estimate"].to_numpy()
        lower, upper = estimate - t * se_narrow, estimate + t * se_narrow
        quadratic = quadratic.assign(lower=lower, upper=upper, reliable=flag_conditions(
            lower, upper, quadratic["subspace_noise"], quadratic["gap_ratio"], noise_max=NOISE_MAX, gap_min=GAP_MIN))
        # the flag's conditions other than the bound condition, on the jackknife interval (at_bound is set
        # whatever the others say, so the conditions are read directly)
        other = flag_conditions(frame["lower"], frame["upper"], frame["subspace_noise"], frame["gap_ratio"],
                                noise_max=NOISE_MAX, gap_min=GAP_MIN)
        as_is = rotation_stability(shards, frame, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
        # the quadratic interval's flag: the same conditions on its interval, then the rotation condition
        narrow = rotation_stability(shards, quadratic, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
    error = frame["estimate"].to_numpy() - truth
    return pd.DataFrame({
        "family": family, "settings": json.dumps(settings, sort_keys=True), "n_over_d": ratio, "seed": seed,
        "draw": draw, "k": ks, "truth": truth, "estimate": frame["estimate"], "se": frame["se"],
        "se_narrow": se_narrow, "quadratic_excess": quadratic["quadratic_excess"],
        "subspace_noise": frame["subspace_noise"],
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
