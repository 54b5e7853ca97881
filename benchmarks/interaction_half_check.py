"""The default interval with T-hat from five shards of each half against every shard, on the same draws of
generators with known truth (issue 21, performance; docs/estimator.md, "The interactions from five shards of
each half", session 34).

The quadratic interval estimates T (the quadratic part of the error) from the plug-in's interactions between
shards of the two halves of richardson's split: one plug-in per pair, 100 at 20 shards. Since session 34 at
most `ntps_nb.core.quadratic.INTERACTION_HALF` (5) shards of each half enter, 25 plug-ins, what the estimator
map checked the interval with (10 shards). This script runs `ntps_estimate` twice on each draw, with the
default and with ``interaction_half=None`` (every shard; ``--other 3``: three shards of each half), and
reports per cell the coverage of each one's reliable rows and of every row, with the exact band tests of
`stationary_flag_check.band`, and the ratio of their widths.

    python benchmarks/interaction_half_check.py --cells SPEC.json --shards 20 --out CSV [--other 3] [--processes 2]
    python benchmarks/interaction_half_check.py --report CSV...

SPEC.json as in `quadratic_variance_check.py` (a list of {"family", "settings", "ratio", "ks", "draws", "seed"}).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quadratic_variance_check import FAMILIES  # noqa: E402
from stationary_flag_check import EDGE, band  # noqa: E402
from ntps_nb.core.estimators import ntps_estimate  # noqa: E402
from ntps_nb.core.simulate import sample_shards  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402

COLUMNS = ["estimate", "lower", "upper", "df", "reliable"]


def one_draw(args) -> pd.DataFrame:
    spec, draw, shards, other = args
    ks = np.asarray(spec["ks"])
    model = FAMILIES[spec["family"]](**spec["settings"])
    rng = np.random.default_rng([spec["seed"], int(round(spec["ratio"] * 1000)), draw])
    with analysis_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moments = sample_shards(model, int(round(spec["ratio"] * model.d)), shards, rng)
        five = ntps_estimate(moments, ks, seed=draw)
        compared = ntps_estimate(moments, ks, seed=draw, interaction_half=other)
    settings = spec["settings"]
    cell = (f"{spec['family']}" + (" angle 0" if settings.get("angle", None) == 0 else "")
            + f" d={settings['d']} C={settings['n_classes']} {settings.get('gap', 'moderate')} seed "
            f"{settings['seed']} N/d={spec['ratio']}")
    out = five[["k"] + COLUMNS].add_suffix("_five").rename(columns={"k_five": "k"})
    out[[c + "_other" for c in COLUMNS]] = compared[COLUMNS].to_numpy()
    return out.assign(cell=cell, draw=draw, truth=model.population_ntps(ks), angle0=settings.get("angle") == 0,
                      shards=shards, other="every" if other is None else str(other))


def report(paths: list[str]) -> None:
    f = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    f["stationary"] = (np.minimum(f["truth"], 1 - f["truth"]) <= EDGE) | f["angle0"]
    others = sorted(set(f["other"].astype(str)))
    if len(others) != 1:
        raise SystemExit(f"the frames compare the default with different settings: {others}")
    print(f"{len(paths)} frames, {len(f)} rows, shards {sorted(set(f['shards']))}; cells with >= 10 kept rows; "
          "exact one-sided binomial tests against 0.85 / 0.95 at 2.5%; stationary: truth within "
          f"{EDGE} of 0 or 1, or the reflection family at angle 0; five: the default (5 shards of each half), other: "
          f"interaction_half={'None (every shard)' if others[0] == 'every' else others[0]}\n")
    tables = []
    for which in ("five", "other"):
        g = f.assign(covered=(f[f"lower_{which}"] <= f["truth"]) & (f["truth"] <= f[f"upper_{which}"]))
        for rows, kept in (("reliable", g[f"reliable_{which}"].astype(bool)), ("every row", pd.Series(True, g.index))):
            cells = band(g, kept)
            tables.append(cells.assign(interval=which, rows_kind=rows))
            print(f"{which:5s} {rows:9s}: {len(cells)} cells, {int(cells['rows'].sum())} rows, coverage "
                  f"{cells['covered'].sum() / max(cells['rows'].sum(), 1):.3f}; below {int(cells['below'].sum())}, "
                  f"above {int(cells['above'].sum())}")
    t = pd.concat(tables).reset_index()
    t["coverage"] = (t["covered"] / t["rows"]).round(3)
    wide = t.pivot_table(index=["cell", "k", "stationary"], columns=["rows_kind", "interval"],
                         values=["coverage", "rows"], aggfunc="first")
    width = f.assign(ratio=(f["upper_five"] - f["lower_five"]) / (f["upper_other"] - f["lower_other"]))
    wide[("width five / other", "median", "")] = width.groupby(["cell", "k", "stationary"])["ratio"].median().round(3)
    both = f["reliable_five"].astype(bool) & f["reliable_other"].astype(bool)
    print(f"\nreliable under both: {int(both.sum())}; under one only: five {int((f['reliable_five'] & ~both).sum())}, "
          f"other {int((f['reliable_other'] & ~both).sum())}; width five / other:")
    for name, ratio in (("all rows", width["ratio"]), ("reliable under both", width["ratio"][both])):
        print(f"  {name:20s} mean {ratio.mean():.3f}, median {ratio.median():.3f}, 5%-95% {ratio.quantile(0.05):.3f}-"
              f"{ratio.quantile(0.95):.3f}, share above 1.1 {(ratio > 1.1).mean():.3f}, below 0.9 "
              f"{(ratio < 0.9).mean():.3f}")
    print()
    print("cells outside the band:")
    outside = t[t["below"] | t["above"]]
    print(outside[["interval", "rows_kind", "cell", "k", "covered", "rows", "below", "above"]].to_string(index=False)
          if len(outside) else "none")
    pd.set_option("display.width", 250)
    print("\nper cell:")
    print(wide.to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--out")
    parser.add_argument("--other", type=int, default=None,
                        help="the interaction_half to compare the default with (default: None, every shard)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--report", nargs="+")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    specs = json.loads(Path(args.cells).read_text())
    tasks = [(spec, draw, args.shards, args.other) for spec in specs for draw in range(spec["draws"])]
    with Pool(args.processes) as pool:
        frames = pool.map(one_draw, tasks, chunksize=4)
    pd.concat(frames, ignore_index=True).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
