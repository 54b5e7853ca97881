"""Why the default interval over-covers where the population NTPS is 0 or 1: the jackknife at a
stationary point.

NTPS is an overlap between two subspaces and lies in [0, 1]; at 0 (U orthogonal to V) or 1 (U inside
V) it is at an extremum, so its first-order change under sampling noise vanishes and the estimate's
sampling error is quadratic in the noise. The delete-one-shard jackknife variance of a statistic
whose Hoeffding decomposition over S independent shards is purely pairwise (degree 2) has
expectation

    R(S) = 2 (S - 1) / (S - 2)

times the statistic's variance (2.25 at the default S = 10 shards: a standard error 1.5x too large;
for a linear statistic the factor is 1). Efron & Stein (1981) show the jackknife never
under-estimates on average; this is the size of the over-estimate in the pairwise case, obtained by
writing each leave-one-out replicate's pairwise terms out. The delete-two jackknife over-estimates
more, (2S - 3) / (S - 3) = 2.43 at S = 10, so combining the two to remove the pairwise part
multiplies the noise of their difference by (R(S) - 1) / ((2S - 3) / (S - 3) - R(S)) = 7 at S = 10.

Part 1 (``--toy``) checks R(S) and the delete-two factor by simulation on shard means x_i ~ N(0, I_p / n): the pairwise
statistic sum_{i != j} x_i . x_j / (S (S - 1)), the same plus a linear term (the factor falls to 1
as the linear part dominates), and |x_bar|^2 (the plug-in's form, whose diagonal terms add to it).
Part 2 reads estimator-map draws (`benchmarks/estimator_map.py` outputs) and, per grid cell,
compares the median jackknife standard error of the richardson estimate with the standard deviation
of the estimate over the cell's draws, binned by the population NTPS's distance to the nearer end of
[0, 1], with the coverage of the rows the reliability flag accepts. Example (docs/estimator.md):

    python benchmarks/jackknife_boundary_check.py --toy \\
        benchmarks/results/estimator_map/richardson/heldout_draws_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import MIN_ACCEPTED, exact_band_tests  # noqa: E402

CELL = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k"]
#: Distance of the population NTPS to the nearer of 0 and 1: the bins' edges.
EDGE_BINS = (0.0, 0.005, 0.02, 0.1, 0.5)
LEVEL = 0.90


def pairwise_factor(n_shards: int) -> float:
    """Expected delete-one jackknife variance over the variance, for a purely pairwise statistic."""
    return 2 * (n_shards - 1) / (n_shards - 2)


def delete_two_factor(n_shards: int) -> float:
    """The same for the delete-two jackknife variance, (S - 2) / (2 C(S, 2)) sum (theta_(ij) - mean)^2."""
    return (2 * n_shards - 3) / (n_shards - 3)


def jackknife_variance(replicates: np.ndarray) -> np.ndarray:
    """Delete-one jackknife variance along the last axis of (..., S) leave-one-out replicates."""
    S = replicates.shape[-1]
    dev = replicates - replicates.mean(axis=-1, keepdims=True)
    return (S - 1) / S * np.sum(dev**2, axis=-1)


def toy_ratios(n_shards: int, p: int, linear: float, reps: int, rng: np.random.Generator) -> dict[str, float]:
    """E[jackknife variance] / variance of three statistics of S shard means in p dimensions."""
    x = rng.standard_normal((reps, n_shards, p))
    total = x.sum(axis=1)  # (reps, p)
    squares = np.sum(x**2, axis=2)  # (reps, S)
    loo_total = total[:, None, :] - x  # (reps, S, p)
    S = n_shards
    # pairwise (U-statistic) form: sum over ordered pairs i != j of x_i . x_j
    pair_full = (np.sum(total**2, axis=1) - squares.sum(axis=1)) / (S * (S - 1))
    pair_loo = (np.sum(loo_total**2, axis=2) - (squares.sum(axis=1)[:, None] - squares)) / ((S - 1) * (S - 2))
    # a linear part beside it: linear * (first coordinate of the mean)
    lin_full, lin_loo = linear * total[:, 0] / S, linear * loo_total[:, :, 0] / (S - 1)
    # the plug-in's form, the squared norm of the mean (diagonal terms included)
    norm_full, norm_loo = np.sum(total**2, axis=1) / S**2, np.sum(loo_total**2, axis=2) / (S - 1) ** 2
    # the delete-two jackknife of the pairwise statistic: (S - 2) / (2 C(S, 2)) sum over pairs of
    # (theta_(ij) - their mean)^2, accumulated pair by pair
    total_squares = squares.sum(axis=1)
    first, second, n_pairs = np.zeros(reps), np.zeros(reps), 0
    for i in range(S):
        for j in range(i + 1, S):
            kept = total - x[:, i] - x[:, j]
            theta = (np.sum(kept**2, axis=1) - (total_squares - squares[:, i] - squares[:, j])) / ((S - 2) * (S - 3))
            first, second, n_pairs = first + theta, second + theta**2, n_pairs + 1
    delete_two = (S - 2) / (2 * n_pairs) * (second - first**2 / n_pairs)
    out = {"pairwise, delete-two": float(delete_two.mean() / pair_full.var())}
    for name, full, loo in (("pairwise", pair_full, pair_loo),
                            (f"pairwise + {linear:g} x linear", pair_full + lin_full, pair_loo + lin_loo),
                            ("squared norm of the mean", norm_full, norm_loo)):
        out[name] = float(jackknife_variance(loo).mean() / full.var())
    return out


def print_toy(reps: int, seed: int) -> None:
    """Part 1: the measured factor of three toy statistics beside R(S), and the coverage R(S) implies."""
    rng = np.random.default_rng(seed)
    print(f"Part 1: E[delete-one jackknife variance] / variance, {reps:,} simulated samples each, p = 8")
    print("| S | R(S) = 2(S-1)/(S-2) | pairwise | pairwise + 0.3 x linear | pairwise + 3 x linear "
          "| squared norm of the mean | delete-two (2S-3)/(S-3) | pairwise, delete-two |\n"
          "|---|---|---|---|---|---|---|---|")
    for S in (5, 10, 20, 32):
        weak, strong = toy_ratios(S, 8, 0.3, reps, rng), toy_ratios(S, 8, 3.0, reps, rng)
        print(f"| {S} | {pairwise_factor(S):.3f} | {weak['pairwise']:.3f} | {weak['pairwise + 0.3 x linear']:.3f} "
              f"| {strong['pairwise + 3 x linear']:.3f} | {weak['squared norm of the mean']:.3f} "
              f"| {delete_two_factor(S):.3f} | {weak['pairwise, delete-two']:.3f} |")
    S = 10
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, S - 1)
    inflated = 2 * scipy.stats.t.cdf(t * np.sqrt(pairwise_factor(S)), S - 1) - 1
    print(f"\nAt S = {S}, a nominal {LEVEL:.2f} jackknife-t interval whose standard error is sqrt(R(S)) = "
          f"{np.sqrt(pairwise_factor(S)):.2f} times too large covers about {inflated:.3f} "
          f"(P(|T_{S - 1}| <= t sqrt(R)) with t = {t:.3f}).")
    noise = (pairwise_factor(S) - 1) / (delete_two_factor(S) - pairwise_factor(S))
    print(f"Removing the pairwise part with the delete-two jackknife, variance = f1 - c (f2 - f1), takes "
          f"c = (R(S) - 1) / (delete-two factor - R(S)) = {noise:.2f} at S = {S}.")


def cell_table(draws: pd.DataFrame) -> pd.DataFrame:
    """Per grid cell: the population NTPS, the estimate's SD over draws, the median jackknife SE and
    the accepted rows' count and coverage (the ``reliable`` flag as the draws recorded it)."""
    rows = draws[draws["estimator"] == "richardson"].copy()
    accepted = rows["reliable"].astype(bool)
    rows["covered_accepted"] = rows["covered"].astype(float).where(accepted)
    rows["accepted"] = accepted
    cells = rows.groupby(CELL).agg(draws=("estimate", "size"), truth=("truth", "first"),
                                   sd=("estimate", "std"), se=("se", "median"),
                                   accepted=("accepted", "sum"), coverage=("covered_accepted", "mean"),
                                   covered=("covered_accepted", "sum"))
    cells["se_over_sd"] = cells["se"] / cells["sd"]
    cells["edge"] = np.minimum(cells["truth"], 1 - cells["truth"])
    cells["edge_bin"] = pd.cut(cells["edge"], EDGE_BINS, include_lowest=True)
    return cells.reset_index()


def print_draws(paths: list[str]) -> None:
    """Part 2: se / sd and the accepted rows' coverage by the truth's distance to 0 or 1."""
    cells = pd.concat([cell_table(pd.read_csv(p)).assign(file=Path(p).name) for p in paths], ignore_index=True)
    cells = cells[cells["draws"] >= MIN_ACCEPTED]
    print(f"\nPart 2: {len(paths)} draw files, {len(cells)} cells with >= {MIN_ACCEPTED} draws "
          "(richardson; se / sd = median jackknife SE over the SD of the estimate across draws)")
    print("\nEvery cell, by the population NTPS's distance to the nearer end of [0, 1]:")
    print(cells.groupby("edge_bin", observed=True).agg(
        cells=("se_over_sd", "size"), se_over_sd_median=("se_over_sd", "median"),
        q25=("se_over_sd", lambda v: v.quantile(0.25)), q75=("se_over_sd", lambda v: v.quantile(0.75)),
    ).to_string(float_format=lambda v: f"{v:.2f}"))
    accepted = cells[cells["accepted"] >= MIN_ACCEPTED].copy()
    print(f"\nCells with >= {MIN_ACCEPTED} rows the flag accepts (their coverage at nominal {LEVEL:.2f}):")
    print(accepted.groupby("edge_bin", observed=True).agg(
        cells=("se_over_sd", "size"), se_over_sd_median=("se_over_sd", "median"),
        coverage_median=("coverage", "median"), coverage_min=("coverage", "min"), coverage_max=("coverage", "max"),
        accepted_rows=("accepted", "sum"), covered_rows=("covered", "sum"),
    ).to_string(float_format=lambda v: f"{v:.3f}"))
    high = exact_band_tests(accepted["covered"], accepted["accepted"])[1]
    print("\nCells covering significantly above 0.95 (exact one-sided binomial test at 2.5%):")
    print(accepted[high][["file", *CELL, "truth", "accepted", "coverage", "se_over_sd"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draws", nargs="*", help="per-draw CSVs of benchmarks/estimator_map.py")
    parser.add_argument("--toy", action="store_true", help="check R(S) by simulation first")
    parser.add_argument("--reps", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.toy:
        print_toy(args.reps, args.seed)
    if args.draws:
        print_draws(args.draws)


if __name__ == "__main__":
    main()
