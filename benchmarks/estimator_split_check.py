"""Does a split-half check catch what the jackknife reliability flag accepts wrongly?

The reliability flag of `ntps_estimate` accepts a row when the leave-one-shard-out (jackknife)
noise of the estimated subspaces U_k and V_k is small. Where the population's eigenvalues around k
are tied, every jackknife replicate shares (S - 1) / S of the texts and picks nearly the same
direction inside the tie, so the jackknife sees little noise while the direction is arbitrary: the
estimator maps hold accepted rows off by 0.2-0.5 in such cells (LDS, C = 2, k = 1). Two disjoint
halves of the sample do not share texts: in a tie they pick unrelated directions. Where the
subspaces are well determined, the squared sines between the halves' subspaces are about four
times the full sample's noise (each half has twice the variance, and the two are independent), so
``split / 4`` is on the jackknife noise's scale there and far above it in a tie.

This script regenerates the draws of committed estimator-map runs (the same generators and seeded
draws as ``benchmarks/estimator_map.py``), computes the halves' squared sines for the split that
"richardson" uses (``split_halves(S, seed=draw)``), joins them to the committed richardson rows and
reports, for the rows the current flag accepts, what a flag that also asks ``split / 4 <=
NOISE_MAX`` would keep: coverage, the rows with |error| > 0.2, and the share accepted. It also
tries a second candidate: each eigengap at k (perception after k_U, next-token after k) over its
delete-one-shard jackknife standard error (`ntps_nb.core.estimators.eigengap_ratios`, the
flag's second condition since), small where the sample cannot separate
the directions around k. Example:

    python benchmarks/estimator_split_check.py \
        benchmarks/results/estimator_map/richardson/heldout_draws_d256_ratio32_seed1.csv.gz --ratios 32
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.core.estimators import NOISE_MAX, _halves, eigengap_ratios, _nested_overlap, _Whitening, _whitened_bases  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, sample_shards  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402

FAMILIES = {"factor": factor_model, "lds": lds_model}
#: |estimate - truth| above which an accepted row counts as badly wrong.
BAD_ERROR = 0.2
#: The halves' squared sines over this factor are on the full sample's noise scale (see above).
SPLIT_SCALE = 4.0
CELL = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d"]


def split_noise(shards: list[Moments], ks: np.ndarray, seed: int, rtol: float = RANGE_RTOL) -> pd.DataFrame:
    """Squared sines between the two halves' U_k and V_k (the richardson split), in the pooled
    sample's whitened coordinates, at each k; NaN where a half has fewer directions than k."""
    full = Moments.combine(shards)
    white = _Whitening.of(full.Sxx, rtol)
    a, b = _halves(shards, seed, None)
    ua, va = _whitened_bases(a, white, rtol)
    ub, vb = _whitened_bases(b, white, rtol)
    m = min(ua.shape[1], ub.shape[1])
    k_u = np.minimum(ks, max(m, 1))
    split_u = k_u - _nested_overlap(ua, ub, k_u)
    split_v = ks - _nested_overlap(va, vb, ks)
    split_v[ks > min(va.shape[1], vb.shape[1])] = np.nan
    return pd.DataFrame({"k": ks, "split_U": split_u, "split_V": split_v})


def regenerate(draws: pd.DataFrame, ratios: list[float]) -> pd.DataFrame:
    """The split-half squared sines of every draw of ``draws``'s cells at ``ratios``."""
    rows = []
    cells = draws[draws["n_over_d"].isin(ratios)].groupby(CELL + ["task_seed", "n_shards"])
    for (family, d, C, gap, ratio, seed, shards), cell in cells:
        model = FAMILIES[family](d=int(d), n_classes=int(C), n_tokens=8, gap=gap, seed=int(seed))
        ks = np.sort(cell["k"].unique()).astype(np.int64)
        n_texts = max(int(round(ratio * model.d)), int(shards))
        for draw in sorted(cell["draw"].unique()):
            rng = np.random.default_rng([int(seed), 0, int(round(ratio * 1000)), int(draw)])
            sample = sample_shards(model, n_texts, int(shards), rng)
            try:
                frame = split_noise(sample, ks, seed=int(draw)).merge(
                    eigengap_ratios(sample, ks)[["k", "gap_ratio_U", "gap_ratio_V"]], on="k")
            except (ValueError, np.linalg.LinAlgError):
                continue
            rows.append(frame.assign(task_family=family, task_d=d, task_n_classes=C, task_gap=gap, n_over_d=ratio,
                                     draw=draw))
    return pd.concat(rows, ignore_index=True)


#: Thresholds of the smaller eigengap ratio (`eigengap_ratios`) tried as a second condition.
GAP_MINS = (2.0, 3.0, 5.0, 8.0)


def report(joined: pd.DataFrame) -> pd.DataFrame:
    """Per d: the current flag's accepted rows against those a second condition would also accept
    (the halves' squared sines / `SPLIT_SCALE` within NOISE_MAX; the smaller eigengap ratio at
    least each of `GAP_MINS`)."""
    out = []
    for d, g in joined.groupby("task_d"):
        jackknife = g["reliable"].fillna(False).astype(bool)
        split = np.fmax(g["split_U"], g["split_V"]) / SPLIT_SCALE
        gap = np.fmin(g["gap_ratio_U"], g["gap_ratio_V"])
        flags = [("jackknife flag (current)", jackknife), ("and split-half noise", jackknife & (split <= NOISE_MAX))]
        flags += [(f"and eigengap ratio >= {t:g}", jackknife & (gap >= t)) for t in GAP_MINS]
        for name, accepted in flags:
            a = g[accepted.to_numpy()]
            out.append({"d": d, "flag": name, "rows": len(g), "accepted": len(a),
                        "kept_of_current": len(a) / max(int(jackknife.sum()), 1),
                        "coverage": a["covered"].mean() if len(a) else np.nan,
                        f"abs_error_over_{BAD_ERROR}": int((a["error"].abs() > BAD_ERROR).sum()),
                        "mean_abs_error": a["error"].abs().mean() if len(a) else np.nan})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draws", nargs="+", help="per-draw frames of benchmarks/estimator_map.py (richardson rows)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8.0, 32.0],
                        help="N/d of the cells to regenerate (the flag accepts almost only at 8 and 32)")
    parser.add_argument("--out", help="also write the joined per-draw frame (csv.gz)")
    parser.add_argument("--joined", action="store_true",
                        help="the files are joined frames this script wrote (--out): report them, regenerate nothing")
    args = parser.parse_args()
    frames = []
    for path in args.draws:
        draws = pd.read_csv(path)
        if not args.joined:
            draws = draws[draws["estimator"] == "richardson"]
            draws = draws.merge(regenerate(draws, args.ratios), on=CELL + ["draw", "k"], how="inner")
        frames.append(draws)
    joined = pd.concat(frames, ignore_index=True)
    if args.out:
        joined.to_csv(args.out, index=False)
    print(report(joined).round(3).to_string(index=False))
    bad = joined[joined["reliable"].astype(bool) & (joined["error"].abs() > BAD_ERROR)]
    columns = CELL + ["k", "draw", "estimate", "truth", "subspace_noise", "split_U", "split_V", "gap_ratio_U",
                      "gap_ratio_V"]
    print(f"\naccepted by the jackknife flag with |error| > {BAD_ERROR}:")
    print(bad[columns].round(3).to_string(index=False) if len(bad) else "none")


if __name__ == "__main__":
    main()
