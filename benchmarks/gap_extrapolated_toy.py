"""Does an eigengap extrapolated as richardson extrapolates NTPS tell the nearly tied draws apart? (issue 21, item 4;
docs/estimator.md, "Rows at a stationary point are unreliable", session 59.)

The exact two-dimensional model of `gap_selection_check.py --toy` (`ntps_nb.core.simulate.pair_shards`: the leading
eigenvector of a mean of S = 10 shards' 2 x 2 matrices, population gap ``delta`` SDs of its diagonal noise; the
score (u . v)^2 with the failing design's truths). A sample eigengap is inflated by the very noise that rotates the
eigenvector (eigenvalue repulsion, larger in a half-sample), so the richardson combination of the gaps of the pooled
shards and of the two halves, 2 gap(N) - mean gap(N / 2), removes that inflation to first order. Printed per
population ratio: the share of draws each rule accepts (the gap over its delete-one-shard jackknife SE at least
`GAP_MIN`: "gap" the flag's, "gapR" the extrapolated gap's, "both") and how the richardson score's jackknife-t
interval covers on them ("all": every draw).

    python benchmarks/gap_extrapolated_toy.py SEED DRAWS
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.estimators import GAP_MIN  # noqa: E402
from ntps_nb.core.simulate import pair_shards  # noqa: E402

#: Shards of the toy and richardson's two halves (exchangeable shards: any split is as good).
S = 10
HALVES = (np.arange(0, 5), np.arange(5, 10))
#: (alpha^2, beta^2) truths of the failing design's tie-broken pairs (`gap_selection_check.EXACT_PAIRS`).
PAIRS = [(0.1513, 0.6087), (0.2892, 0.4787), (0.3786, 0.3942)]


def gap_and_score(a: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eigengap of each 2 x 2 matrix and the score (u . v)^2 of its leading eigenvector."""
    w, vectors = np.linalg.eigh(a)
    return w[..., 1] - w[..., 0], (vectors[..., :, 1] @ v) ** 2


def jackknife_se(replicates: np.ndarray) -> np.ndarray:
    """Delete-one-shard jackknife SE of each row of (draws, S) replicates."""
    deviation = replicates - replicates.mean(axis=1, keepdims=True)
    return np.sqrt((S - 1) / S * (deviation**2).sum(axis=1))


def richardson(full: np.ndarray, a: np.ndarray, b: np.ndarray, sizes: tuple[int, int], n: int) -> np.ndarray:
    """w * full + (1 - w) * mean of the halves, w = h / (h - 1 / n), h the mean 1 / size of the halves."""
    h = (1 / sizes[0] + 1 / sizes[1]) / 2
    w = h / (h - 1 / n)
    return w * full + (1 - w) * (a + b) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int, nargs="?", default=0)
    parser.add_argument("draws", type=int, nargs="?", default=20_000)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t = scipy.stats.t.ppf(0.95, S - 1)
    rows = []
    for alpha2, beta2 in PAIRS:
        v = np.array([np.sqrt(alpha2), np.sqrt(beta2)])
        for delta in [2, 3, 4, 6, 10, 20]:
            m = pair_shards(delta, args.draws, S, rng)
            total = m.sum(axis=1)
            sums = [m[:, half].sum(axis=1) for half in HALVES]
            gap, score = gap_and_score(total / S, v)
            (gap_a, score_a), (gap_b, score_b) = (gap_and_score(h / 5, v) for h in sums)
            gap_r = richardson(gap, gap_a, gap_b, (5, 5), S)
            score_r = richardson(score, score_a, score_b, (5, 5), S)
            loo = {name: np.empty((args.draws, S)) for name in ("gap", "gap_r", "score_r")}
            for i in range(S):
                gap_i, score_i = gap_and_score((total - m[:, i]) / (S - 1), v)
                side = 0 if i < 5 else 1
                parts = [(gap_a, score_a), (gap_b, score_b)]
                parts[side] = gap_and_score((sums[side] - m[:, i]) / 4, v)
                sizes = (4, 5) if side == 0 else (5, 4)
                loo["gap"][:, i] = gap_i
                loo["gap_r"][:, i] = richardson(gap_i, parts[0][0], parts[1][0], sizes, S - 1)
                loo["score_r"][:, i] = richardson(score_i, parts[0][1], parts[1][1], sizes, S - 1)
            ratio, ratio_r = gap / jackknife_se(loo["gap"]), gap_r / jackknife_se(loo["gap_r"])
            covered = np.abs(score_r - alpha2) <= t * jackknife_se(loo["score_r"])
            for name, accepted in (("all", np.ones(args.draws, bool)), ("gap", ratio >= GAP_MIN),
                                   ("gapR", ratio_r >= GAP_MIN), ("both", (ratio >= GAP_MIN) & (ratio_r >= GAP_MIN))):
                rows.append({"alpha2": alpha2, "delta": delta, "rule": name, "share": accepted.mean(),
                             "cover_richardson": covered[accepted].mean() if accepted.any() else np.nan})
    frame = pd.DataFrame(rows)
    print(f"exact 2 x 2 model, {S} shards, {args.draws:,} draws per population ratio, seed {args.seed}, "
          f"GAP_MIN = {GAP_MIN:g}; richardson score, jackknife-t 90% interval")
    print(frame.pivot_table(index=["alpha2", "delta"], columns="rule",
                            values=["share", "cover_richardson"]).round(3).to_string())


if __name__ == "__main__":
    main()
