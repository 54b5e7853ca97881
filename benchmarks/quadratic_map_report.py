"""The quadratic interval on the estimator map: item 4 of issue 21 for `ntps_estimate(interval="quadratic")`
and its flag against the jackknife-t interval with the flag as it stands, on the same draws.

Input: per-draw frames of `benchmarks/estimator_map.py --estimators richardson --interval quadratic` (the
columns the device runs kept: the quadratic interval in lower / upper / covered and its flag in reliable,
the jackknife-t interval in lower_jackknife / upper_jackknife / se_jackknife, the Fieller range of the
rotation condition in rotation_lower / rotation_upper). The flag as it stands is recomputed from the
columns (`as_it_stands`): noise, eigengaps, a finite jackknife-t interval meeting [0, 1], not `at_bound` on
the jackknife SE, and the Fieller range inside the jackknife-t interval. Its rows are a subset of the rows on which the
range was computed (those the quadratic flag's other conditions accept: a row not at_bound has its
estimate inside [0, 1] by a jackknife SE, so the narrower interval meets [0, 1] too), which the script
checks.

Per frame and flag: rows kept, cells with at least `MIN_ACCEPTED` rows, cells significantly below 0.85 /
above 0.95 (exact one-sided binomial tests at 2.5%), cells whose |bias| reaches a quarter of the mean
width as a point value and by more than `BIAS_Z` Monte Carlo SEs; then every cell outside on either flag.
Frames with a df column (the Satterthwaite interval, session 31) are also read as session 30's
interval: the Student t on S - 1 degrees of freedom on the same SE, its flag recomputed
(`session30_view`). Last, the default flag's rows (in the cells counted) by their estimated quadratic share, the part of
the variance the interval gives the error's quadratic part (`quadratic_share`): the coverage of a cell
is an average over rows whose variance estimates err in both directions, and this table shows how.

    python benchmarks/quadratic_map_report.py benchmarks/results/estimator_map/quadratic_map/*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gap_selection_check import _flag_accepted  # noqa: E402
from rotation_flag_report import BIAS_Z, cell_table  # noqa: E402

from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX, flag_conditions  # noqa: E402
from ntps_nb.core.quadratic import quadratic_factors  # noqa: E402
from ntps_nb.core.rotation import STABLE_ATOL  # noqa: E402

#: A cell is "stationary" where its truth lies within this of 0 or 1 (or the reflection family at angle 0).
EDGE = 0.005
#: Bins of the estimated quadratic share (the last holds the rows at the interval's floor, share 1).
SHARE_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 0.999, 1.0]


#: The default interval and flag as the frames hold them.
DEFAULT = "quadratic, no bound condition"


def session30_view(f: pd.DataFrame, n_shards: int, level: float = 0.90) -> tuple[pd.DataFrame, pd.Series]:
    """Session 30's quadratic interval (the Student t on S - 1 degrees of freedom on the same SE) in
    lower / upper / covered, and its flag recomputed from the columns: noise, eigengaps, the interval
    meeting [0, 1], and the rotation condition's Fieller range inside the interval. The range is
    computed wherever the other conditions hold on the default interval, which is at least as wide, so
    every row session 30's flag needs has it."""
    t = scipy.stats.t.ppf((1 + level) / 2, n_shards - 1)
    lower, upper = f["estimate"] - t * f["se"], f["estimate"] + t * f["se"]
    inside = (f["rotation_lower"] >= lower - STABLE_ATOL) & (f["rotation_upper"] <= upper + STABLE_ATOL)
    kept = flag_conditions(lower.to_numpy(), upper.to_numpy(), f["subspace_noise"], f["gap_ratio"],
                           noise_max=NOISE_MAX, gap_min=GAP_MIN) & inside.to_numpy()
    view = f.assign(lower=lower, upper=upper, covered=(lower <= f["truth"]) & (f["truth"] <= upper))
    return view, pd.Series(kept, index=f.index)


def quadratic_share(f: pd.DataFrame, n_shards: int) -> pd.Series:
    """Each row's estimated share of the quadratic part in the quadratic interval's variance.

    With J = se_jackknife^2 and the excess removed J - se^2 = (jackknife - variance) T-hat
    (`ntps_nb.core.quadratic.quadratic_factors`), the quadratic part's variance is variance T-hat; at
    the floor (se^2 = J variance / jackknife) the whole variance is the quadratic part's (share 1).
    The factors depend on the number of shards only, not on the split's seed.
    """
    variance, jackknife = quadratic_factors(n_shards, 0)
    J, se2 = f["se_jackknife"] ** 2, f["se"] ** 2
    quadratic = (J - se2) * variance / (jackknife - variance)
    return (quadratic / se2).clip(0.0, 1.0)


def jackknife_view(f: pd.DataFrame) -> pd.DataFrame:
    """The frame with the jackknife SE and interval in se / lower / upper / covered."""
    return f.assign(se=f["se_jackknife"], lower=f["lower_jackknife"], upper=f["upper_jackknife"],
                    covered=(f["lower_jackknife"] <= f["truth"]) & (f["truth"] <= f["upper_jackknife"]))


def as_it_stands(f: pd.DataFrame) -> pd.Series:
    """The flag as it stands (the "jackknife" interval's) from the quadratic frame's columns: the flag
    without the rotation condition (`gap_selection_check._flag_accepted`) on the jackknife view, and the
    Fieller range inside the jackknife interval."""
    view = jackknife_view(f)
    inside = ((f["rotation_lower"] >= view["lower"] - STABLE_ATOL)
              & (f["rotation_upper"] <= view["upper"] + STABLE_ATOL))
    return _flag_accepted(view) & inside


def load(path: str) -> pd.DataFrame:
    f = pd.read_csv(path, low_memory=False).assign(estimator="richardson", frame=Path(path).name.split(".")[0])
    angle0 = "angle0" in Path(path).name
    stationary = (np.minimum(f["truth"], 1 - f["truth"]) <= EDGE) | angle0
    return f.assign(stationary=stationary, task_family=np.where(angle0, "reflection angle 0", f["task_family"]))


def tally(cells: pd.DataFrame) -> dict:
    biased = cells["bias"].abs() >= cells["width"] / 4
    z = (cells["bias"].abs() - cells["width"] / 4) / (cells["sd"] / np.sqrt(cells["size"]))
    return {"cells": len(cells), "below": int(cells["below"].sum()), "above": int(cells["above"].sum()),
            "bias >= width/4": int(biased.sum()), "significantly": int((z > BIAS_Z).sum()),
            "max |bias|/width": round(float((cells["bias"].abs() / cells["width"]).max()), 3) if len(cells) else np.nan,
            "coverage (pooled)": round(cells["sum"].sum() / cells["size"].sum(), 3) if len(cells) else np.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+")
    parser.add_argument("--shards", type=int, default=10, help="shards per draw of the frames (estimator_map.py's)")
    args = parser.parse_args()
    rows, outside, stationary_rows, per_cell, shares, accepted = [], [], [], [], [], []
    for path in args.frames:
        f = load(path)
        accepted.append(f[["task_d", "n_over_d", "reliable", "covered"]])
        stands = as_it_stands(f)
        if (stands & f["rotation_lower"].isna()).any():
            raise SystemExit(f"{path}: a row the flag as it stands keeps has no Fieller range")
        views = [("as it stands (jackknife-t)", jackknife_view(f), stands),
                 (DEFAULT, f, f["reliable"].astype(bool))]
        if "df" in f.columns:  # frames of the Satterthwaite interval (session 31): session 30's beside it
            views.append(("quadratic, t on S - 1 (session 30)", *session30_view(f, args.shards)))
        for name, view, kept in views:
            cells = cell_table(view, kept)
            stationary = view.groupby(["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k",
                                       "estimator", "task_seed"])["stationary"].first().rename("stationary_cell")
            cells = cells.join(stationary, on=list(stationary.index.names))
            for part, sub in (("all", cells), ("stationary", cells[cells["stationary_cell"]]),
                              ("interior", cells[~cells["stationary_cell"]])):
                rows.append({"frame": f["frame"].iloc[0], "flag": name, "part": part, **tally(sub),
                             "rows": int(sub["size"].sum())})
            for part, sub in (("all", cells), ("stationary", cells[cells["stationary_cell"]]),
                              ("interior", cells[~cells["stationary_cell"]])):
                stationary_rows.append({"flag": name, "part": part, "covered": sub["sum"].sum(),
                                        "rows": sub["size"].sum()})
            z = (cells["bias"].abs() - cells["width"] / 4) / (cells["sd"] / np.sqrt(cells["size"]))
            if name == DEFAULT:
                keys = list(stationary.index.names)
                counted = view[kept].merge(cells[keys + ["stationary_cell"]], on=keys, how="inner")
                jk = jackknife_view(counted)["covered"]
                shares.append(counted[["covered", "stationary_cell"]].assign(
                    covered_jackknife=jk, share=quadratic_share(counted, args.shards)))
                for _, c in cells[cells["stationary_cell"]].iterrows():
                    per_cell.append({"family": c["task_family"], "d": c["task_d"], "C": c["task_n_classes"],
                                     "gap": c["task_gap"], "seed": c["task_seed"], "N/d": c["n_over_d"], "k": c["k"],
                                     "truth": round(c["truth"], 4), "covered": f"{int(c['sum'])}/{int(c['size'])}",
                                     "coverage": round(c["sum"] / c["size"], 3),
                                     "bias/width": round(c["bias"] / c["width"], 2)})
            bad = cells[cells["below"] | cells["above"] | (cells["bias"].abs() >= cells["width"] / 4)]
            for _, c in bad.iterrows():
                outside.append({"flag": name, "family": c["task_family"], "d": c["task_d"], "C": c["task_n_classes"],
                                "gap": c["task_gap"], "seed": c["task_seed"], "N/d": c["n_over_d"], "k": c["k"],
                                "truth": round(c["truth"], 4), "covered": f"{int(c['sum'])}/{int(c['size'])}",
                                "coverage": round(c["sum"] / c["size"], 3),
                                "band": "below" if c["below"] else "above" if c["above"] else "",
                                "bias/width": round(c["bias"] / c["width"], 2),
                                "bias significant": bool(z.loc[c.name] > BIAS_Z)})
    pd.set_option("display.width", 250)
    pd.set_option("display.max_rows", 500)
    table = pd.DataFrame(rows)
    print(f"cells with >= 10 kept rows; below / above: exact one-sided binomial tests against 0.85 / 0.95 at 2.5%; "
          f"bias significantly above a quarter of the width: z > {BIAS_Z}; stationary: truth within {EDGE} of 0 or 1, "
          "or the reflection family at angle 0\n")
    print(table.to_string(index=False))
    groups = table.groupby(["flag", "part"], sort=False)
    totals = groups[["rows", "cells", "below", "above", "bias >= width/4", "significantly"]].sum()
    totals["max |bias|/width"] = groups["max |bias|/width"].max()
    pooled = pd.DataFrame(stationary_rows).groupby(["flag", "part"], sort=False)[["covered", "rows"]].sum()
    totals["coverage (pooled)"] = (pooled["covered"] / pooled["rows"]).round(3)
    print("\nover all frames (rows in the cells counted):\n" + totals.to_string())
    print("\nthe stationary cells of the quadratic flag, one by one:")
    print(pd.DataFrame(per_cell).to_string(index=False))
    print("\ncells outside the band, or with |bias| >= a quarter of the width:")
    print(pd.DataFrame(outside).to_string(index=False) if outside else "none")
    share = pd.concat(shares, ignore_index=True)
    share["part"] = np.where(share["stationary_cell"], "stationary", "interior")
    share["estimated share"] = pd.cut(share["share"], SHARE_BINS, include_lowest=True)
    by_share = share.groupby(["part", "estimated share"], observed=True).agg(
        rows=("covered", "size"), coverage=("covered", "mean"), jackknife_t=("covered_jackknife", "mean"))
    print("\nthe quadratic flag's rows in the cells counted, by their estimated quadratic share "
          f"({args.shards} shards; "
          "coverage of the quadratic interval and of the jackknife-t interval on the same rows):")
    print(by_share.round(3).to_string())
    by_size = pd.concat(accepted, ignore_index=True).groupby(["task_d", "n_over_d"]).agg(
        rows=("covered", "size"), reliable=("reliable", "sum"), coverage_every_row=("covered", "mean"))
    print("\nthe default flag by d and N/d, every frame's rows (coverage_every_row: the default interval with "
          "the flag ignored):")
    print(by_size.round(3).to_string())


if __name__ == "__main__":
    main()
