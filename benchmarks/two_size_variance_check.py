"""Does separating the jackknife's linear and pairwise parts with two sample sizes give an interval
that covers where NTPS is 0 or 1, without breaking it elsewhere? (a prototype; not in the package)

At an extremum of NTPS (0 or 1) the estimate's error is quadratic in the sampling noise and the
delete-one-shard jackknife over-estimates its variance by about 2 (S - 1) / (S - 2)
(`benchmarks/jackknife_boundary_check.py`). The linear part's variance scales as 1 / N and the pairwise
part's as 1 / N^2, so a second jackknife at half the sample size separates them:

- f: the jackknife variance of the estimator on all S shards (what `ntps_estimate` reports, se^2);
- h: the mean over the two halves of a fixed split of the jackknife variance of the estimator on that
  half's S / 2 shards;
- with the estimator's variance v_L + v_Q (linear + pairwise part), E f = a_f v_L + b_f v_Q and
  E h = a_h v_L + b_h v_Q, where the four factors depend only on the procedure (S, the halves'
  sizes, the richardson combination and its jackknife), not on the data: they are measured here by
  running the same procedure on toy statistics of Gaussian shard means whose variance is known, one
  purely linear (a_f, a_h) and one a squared norm of the mean with zero mean (b_f, b_h);
- solving the 2 x 2 system gives v_L + v_Q ("two-size"), and the same clipped into
  [f / b_f, f / a_f], the range the model allows for f's expectation ("two-size clipped");
- "hybrid": the clipped two-size variance where the jackknife interval reaches past 0 or 1 (the
  data's sign of an estimate within its noise of an extremum), the jackknife's elsewhere.

Intervals estimate -/+ t_{S-1} sqrt(variance) at nominal 90% are compared with the jackknife's on
the rows the reliability flag accepts, per grid cell, on draws of `ntps_nb.core.simulate` generators
(the same draws as `benchmarks/estimator_map.py` with the same seed). Example:

    python benchmarks/two_size_variance_check.py --d 16 --families lds --classes 2 --draws 200 --seed 10
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from ntps_nb.core.estimators import _richardson_combination, ntps_estimate, split_halves  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, sample_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jackknife_boundary_check import jackknife_variance  # noqa: E402

FAMILIES = {"factor": factor_model, "lds": lds_model}
LEVEL = 0.90


# ---------------------------------------------------------------------------------------------
# The procedure's factors, from toy statistics of shard means


def _richardson_toy(x: np.ndarray, shards: list[int], statistic, seed: int, drop: int | None) -> np.ndarray:
    """Richardson on toy shard means x (reps, S_all, p) over ``shards``, one left out as the package
    leaves it out (from its half; the split of ``shards`` stays fixed). Equal texts per shard."""
    a_pos, b_pos = split_halves(len(shards), seed)
    a = [shards[i] for i in a_pos if shards[i] != drop]
    b = [shards[i] for i in b_pos if shards[i] != drop]
    kept = [s for s in shards if s != drop]
    halves = [statistic(x[:, a].mean(axis=1)), statistic(x[:, b].mean(axis=1))]
    # the package's combination; shard counts stand for text counts (equal texts per shard)
    return _richardson_combination(statistic(x[:, kept].mean(axis=1)), halves, [len(a), len(b)], len(kept))


def _jackknife_variance(x: np.ndarray, shards: list[int], statistic, seed: int) -> np.ndarray:
    """Delete-one-shard jackknife variance of `_richardson_toy` over ``shards``, per toy sample."""
    return jackknife_variance(np.stack([_richardson_toy(x, shards, statistic, seed, drop=s) for s in shards], axis=-1))


def procedure_factors(n_shards: int, seed: int = 0, reps: int = 100_000, p: int = 8) -> dict[str, float]:
    """a_f, a_h (linear statistic) and b_f, b_h (squared norm of a zero-mean mean): E f and E h over
    the variance of the richardson estimate on all shards, for the package's procedure."""
    rng = np.random.default_rng([seed, 11])
    x = rng.standard_normal((reps, n_shards, p))
    everything = list(range(n_shards))
    a_idx, b_idx = split_halves(n_shards, seed)
    out = {}
    for name, statistic in (("a", lambda m: m[:, 0]), ("b", lambda m: np.sum(m**2, axis=1))):
        variance = _richardson_toy(x, everything, statistic, seed, drop=None).var()
        f = _jackknife_variance(x, everything, statistic, seed)
        h = (_jackknife_variance(x, list(a_idx), statistic, seed) + _jackknife_variance(x, list(b_idx), statistic, seed)) / 2
        out[f"{name}_f"], out[f"{name}_h"] = float(f.mean() / variance), float(h.mean() / variance)
    return out


def combination(factors: dict[str, float]) -> tuple[float, float]:
    """(c_f, c_h) with v_L + v_Q = c_f f + c_h h: the column sums of the inverse of the factors' system."""
    inverse = np.linalg.inv(np.array([[factors["a_f"], factors["b_f"]], [factors["a_h"], factors["b_h"]]]))
    return float(inverse[0, 0] + inverse[1, 0]), float(inverse[0, 1] + inverse[1, 1])


def two_size_variance(f: np.ndarray, h: np.ndarray, factors: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """v_L + v_Q from f and h (NaN where h is NaN: fall back to f), and the same clipped into
    [f / b_f, f / a_f]."""
    coef_f, coef_h = combination(factors)
    v = coef_f * f + coef_h * h
    v = np.where(np.isfinite(h), v, f)
    clipped = np.clip(v, f / factors["b_f"], f / factors["a_f"])
    return v, clipped


# ---------------------------------------------------------------------------------------------
# Draws


def one_model(args) -> pd.DataFrame:
    """One generator's draws (a range of them): the full estimate, its se, flag and the halves' h."""
    family, d, C, gap, ratios, ks, (first, draws), shards_per_draw, seed = args
    model = FAMILIES[family](d=d, n_classes=C, n_tokens=8, gap=gap, seed=seed)
    ks = np.array([k for k in ks if k <= d // 2])
    truth = model.population_ntps(ks)
    rows = []
    for ratio in ratios:
        n_texts = max(int(round(ratio * d)), shards_per_draw)
        for draw in range(first, first + draws):
            # the draws of benchmarks/estimator_map.py (one model per task: model index 0)
            rng = np.random.default_rng([int(seed), 0, int(round(ratio * 1000)), draw])
            shards = sample_shards(model, n_texts, shards_per_draw, rng)
            try:
                full = ntps_estimate(shards, ks, estimator="richardson", level=LEVEL, seed=draw, interval="jackknife")
            except (ValueError, np.linalg.LinAlgError):
                continue
            a_idx, b_idx = split_halves(len(shards), draw)
            half_var = []
            for idx in (a_idx, b_idx):
                try:
                    half = ntps_estimate([shards[i] for i in idx], ks, estimator="richardson", level=LEVEL, seed=draw,
                                         interval="jackknife")
                    half_var.append(half["se"].to_numpy() ** 2)
                except (ValueError, np.linalg.LinAlgError):
                    half_var.append(np.full(ks.shape, np.nan))
            rows.append(full[["k", "estimate", "se", "reliable"]].assign(
                h=np.mean(half_var, axis=0), truth=truth, n_over_d=ratio, draw=draw, task_family=family, task_d=d,
                task_n_classes=C, task_gap=gap))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def coverage_table(frame: pd.DataFrame, factors: dict[str, float], n_shards: int) -> pd.DataFrame:
    """Per cell, on the accepted rows: coverage and mean width of the jackknife interval and of the
    two two-size intervals."""
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, n_shards - 1)
    f = frame["se"].to_numpy() ** 2
    v, clipped = two_size_variance(f, frame["h"].to_numpy(), factors)
    out = frame.copy()
    crosses = (out["estimate"] - t * out["se"] < 0) | (out["estimate"] + t * out["se"] > 1)
    hybrid = np.where(crosses, clipped, f)
    for name, variance in (("jackknife", f), ("two_size", v), ("two_size_clipped", clipped), ("hybrid", hybrid)):
        half = t * np.sqrt(np.maximum(variance, 0.0))
        out[f"covered_{name}"] = (out["estimate"] - half <= out["truth"]) & (out["truth"] <= out["estimate"] + half)
        out[f"width_{name}"] = 2 * half
        out[f"negative_{name}"] = variance <= 0
    accepted = out[out["reliable"].astype(bool)]
    keys = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k"]
    return accepted.groupby(keys).agg(
        truth=("truth", "first"), accepted=("estimate", "size"), sd=("estimate", "std"),
        cov_jackknife=("covered_jackknife", "mean"), cov_two_size=("covered_two_size", "mean"),
        cov_two_size_clipped=("covered_two_size_clipped", "mean"), cov_hybrid=("covered_hybrid", "mean"),
        width_jackknife=("width_jackknife", "mean"), width_two_size_clipped=("width_two_size_clipped", "mean"),
        width_hybrid=("width_hybrid", "mean"), nonpositive_two_size=("negative_two_size", "sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--gaps", nargs="+", default=["separated", "moderate", "tied"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=1, help="split each model's draws into this many tasks")
    parser.add_argument("--reps", type=int, default=100_000, help="toy samples for the procedure's factors")
    parser.add_argument("--out", default=None, help="CSV of the per-draw rows (optional)")
    parser.add_argument("--from-csv", nargs="+", default=None, help="report saved per-draw rows (--out) instead")
    args = parser.parse_args()
    start = time.time()
    factors = procedure_factors(args.shards, reps=args.reps)
    coef_f, coef_h = combination(factors)
    print("Procedure factors (E f and E h over the variance; linear a, pairwise b): "
          + ", ".join(f"{k} = {v:.3f}" for k, v in factors.items())
          + f"; so v_L + v_Q = {coef_f:.3f} f {coef_h:+.3f} h")
    if args.from_csv:
        for path in args.from_csv:
            print(f"\n{path}")
            report(pd.read_csv(path), factors, args.shards)
        return
    edges = [round(i * args.draws / args.chunks) for i in range(args.chunks + 1)]
    spans = [(a, b - a) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    tasks = [(fam, args.d, C, g, args.ratios, args.ks, span, args.shards, args.seed)
             for fam, C, g in itertools.product(args.families, args.classes, args.gaps) if C <= args.d // 2
             for span in spans]
    with ProcessPoolExecutor(args.processes) as pool:
        frame = pd.concat(list(pool.map(one_model, tasks)), ignore_index=True)
    if args.out:
        frame.to_csv(args.out, index=False)
    print(f"{len(frame):,} rows, {time.time() - start:.0f} s")
    report(frame, factors, args.shards)


def report(frame: pd.DataFrame, factors: dict[str, float], n_shards: int) -> None:
    """Print the per-cell table (cells with >= 10 accepted draws) and the pooled row."""
    table = coverage_table(frame, factors, n_shards)
    table = table[table["accepted"] >= 10]
    print("\nCells with >= 10 accepted draws:\n")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    pooled = coverage_table(frame.assign(task_family="all", task_n_classes=0, task_gap="all", k=0), factors, n_shards)
    print("\nPooled over every accepted row:\n")
    print(pooled.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
