"""Where the default flag's rows over-cover at stationary points: the interval, or the flag's selection?
(issue 21, item 4; docs/estimator.md, session 32).

The default interval ("quadratic", Satterthwaite degrees of freedom) covers significantly above 0.95 on
the flag's rows of some stationary cells (truth at 0 or 1, or every principal angle at 0 or 90 degrees).
This check follows the flag's conditions one at a time on the same rows:
  1. candidates: subspace noise at most `NOISE_MAX`, eigengap ratio at least `GAP_MIN`, a finite interval;
  2. and the interval meets [0, 1];
  3. and the rotation condition: NTPS's range over the Fieller sets inside the interval (the flag as it
     stands; the script checks that step 3 reproduces the frames' `reliable` column).
For each step it gives per cell (design x k, >= `MIN_ACCEPTED` rows) the coverage of the rows kept and of the
rows the step drops, and cells significantly outside [0.85, 0.95] (exact one-sided binomial tests at
2.5%), stationary and interior cells apart. Variants of the last step beside it: no rotation
condition; the rotation condition against the jackknife-t interval; against only the range's
first-order part; and the hull, which keeps every row of step 2 with a Fieller range and widens its
interval over the range instead of dropping it. Last, the rows of step 2 by how far the Fieller range
leaves the interval and by eigengap ratio, and the widths of the rows step 3 keeps and drops against
their cell's median width.

Input: frames of `estimator_map.py --interval quadratic` (the map's reduced columns, e.g.
`quadratic_map/satterthwaite/`, `quadratic_map/more/`'s LDS file) and of `quadratic_df_check.py`
(`quadratic_map/df_check/`, one file a cell). Frames without a df column hold session 30's interval and
are refused.

    python benchmarks/stationary_flag_check.py \\
        benchmarks/results/estimator_map/quadratic_map/satterthwaite/*.csv.gz \\
        benchmarks/results/estimator_map/quadratic_map/df_check/*.csv.gz \\
        benchmarks/results/estimator_map/quadratic_map/more/more_lds*.csv.gz
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
from estimator_flag_report import MIN_ACCEPTED, exact_band_tests  # noqa: E402
from quadratic_map_report import EDGE  # noqa: E402

from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX, flag_conditions  # noqa: E402
from ntps_nb.core.rotation import STABLE_ATOL  # noqa: E402

SHARDS = 10
LEVEL = 0.90


def load(path: str) -> pd.DataFrame:
    """One frame as rows with a cell name, the default and jackknife-t intervals, the flag's inputs."""
    f = pd.read_csv(path, low_memory=False)
    name = Path(path).name.split(".")[0]
    if "df" not in f.columns:
        raise SystemExit(f"{path}: no df column (session 30's interval, not the default's)")
    if "cell" in f.columns:  # quadratic_df_check.py: one file a cell; the jackknife-t interval from its SE
        t = scipy.stats.t.ppf((1 + LEVEL) / 2, SHARDS - 1)
        f = f.assign(cell=name, lower_jackknife=f["estimate"] - t * f["se_jackknife"],
                     upper_jackknife=f["estimate"] + t * f["se_jackknife"])
        angle0 = f["cell"].str.contains("angle_0")
    else:
        angle0 = pd.Series("angle0" in name, index=f.index)
        f = f.assign(cell=f["task_family"] + np.where(angle0, " angle 0", "") + " d=" + f["task_d"].astype(str)
                     + " C=" + f["task_n_classes"].astype(str) + " " + f["task_gap"] + " seed "
                     + f["task_seed"].astype(str) + " N/d=" + f["n_over_d"].astype(str))
    stationary = (np.minimum(f["truth"], 1 - f["truth"]) <= EDGE) | angle0
    return f.assign(stationary=stationary, covered=(f["lower"] <= f["truth"]) & (f["truth"] <= f["upper"]))[
        ["cell", "k", "truth", "stationary", "covered", "estimate", "lower", "upper", "lower_jackknife",
         "upper_jackknife", "subspace_noise", "gap_ratio", "rotation_lower", "rotation_upper", "reliable"]]


def candidates(f: pd.DataFrame) -> pd.Series:
    """The flag's first step: subspace noise at most `NOISE_MAX`, eigengap ratio at least `GAP_MIN`, a finite
    interval (`flag_conditions` without its [0, 1] condition)."""
    with np.errstate(invalid="ignore"):
        return ((f["subspace_noise"] <= NOISE_MAX) & (f["gap_ratio"] >= GAP_MIN)
                & np.isfinite(f["lower"]) & np.isfinite(f["upper"]))


def steps(f: pd.DataFrame) -> dict[str, pd.Series]:
    """The rows each step of the flag keeps, and variants of its last step (the hull is added in `main`)."""
    candidate = candidates(f)
    # step 2 is the package's own conditions before the rotation condition: the candidates and [0, 1]
    meets = pd.Series(flag_conditions(f["lower"], f["upper"], f["subspace_noise"], f["gap_ratio"],
                                      noise_max=NOISE_MAX, gap_min=GAP_MIN), index=f.index)
    inside = (f["rotation_lower"] >= f["lower"] - STABLE_ATOL) & (f["rotation_upper"] <= f["upper"] + STABLE_ATOL)
    inside_jackknife = ((f["rotation_lower"] >= f["lower_jackknife"] - STABLE_ATOL)
                        & (f["rotation_upper"] <= f["upper_jackknife"] + STABLE_ATOL))
    # the range's first-order part: as much as it reaches on both sides of the estimate (a response
    # linear in the pair's rotation reaches equally far on both; a quadratic one, at a stationary
    # point of the rotation, on one side only)
    first = np.minimum(f["estimate"] - f["rotation_lower"], f["rotation_upper"] - f["estimate"]).clip(lower=0)
    inside_first = ((f["estimate"] - first >= f["lower"] - STABLE_ATOL)
                    & (f["estimate"] + first <= f["upper"] + STABLE_ATOL) & f["rotation_lower"].notna())
    return {"1. candidates (noise, eigengaps)": candidate, "2. and meets [0, 1]": meets,
            "3. and rotation (the flag)": meets & inside,
            "variant: no rotation condition": meets, "variant: rotation on jackknife-t": meets & inside_jackknife,
            "variant: rotation, first-order part": meets & inside_first}


def hull(f: pd.DataFrame) -> pd.DataFrame:
    """The frame with the interval widened over the Fieller range wherever the range was computed (the
    rotation hull of "Why the near-tied design fails", on the default interval): the variant that keeps
    the rows step 3 drops, with a wider interval, instead of dropping them."""
    ranged = f["rotation_lower"].notna()
    lower = np.where(ranged, np.minimum(f["lower"], f["rotation_lower"]), f["lower"])
    upper = np.where(ranged, np.maximum(f["upper"], f["rotation_upper"]), f["upper"])
    return f.assign(lower=lower, upper=upper, covered=(lower <= f["truth"]) & (f["truth"] <= upper))


def band(f: pd.DataFrame, kept: pd.Series) -> pd.DataFrame:
    """Per cell of the kept rows (>= MIN_ACCEPTED): rows, covered, and the band tests."""
    g = f[kept].groupby(["cell", "k"]).agg(rows=("covered", "size"), covered=("covered", "sum"),
                                            stationary=("stationary", "first"))
    g = g[g["rows"] >= MIN_ACCEPTED]
    below, above = exact_band_tests(g["covered"], g["rows"])
    return g.assign(below=below, above=above)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+")
    args = parser.parse_args()
    f = pd.concat([load(p) for p in args.frames], ignore_index=True)
    kept = steps(f)
    mismatch = (kept["3. and rotation (the flag)"] != f["reliable"].astype(bool)).sum()
    if mismatch:
        raise SystemExit(f"step 3 differs from the frames' reliable column on {mismatch} rows")
    rows, outside = [], []
    previous = None
    widened = hull(f)
    kept["variant: hull instead of rotation"] = kept["2. and meets [0, 1]"] & f["rotation_lower"].notna()
    for name, rows_kept in kept.items():
        cells = band(widened if "hull" in name else f, rows_kept)
        dropped = (previous & ~rows_kept) if previous is not None and name[0].isdigit() else None
        for part, m in (("stationary", cells["stationary"]), ("interior", ~cells["stationary"])):
            c = cells[m]
            keys = c.index
            in_cells = f.set_index(["cell", "k"]).index.isin(keys)
            row = {"step": name, "part": part, "cells": len(c), "below": int(c["below"].sum()),
                   "above": int(c["above"].sum()), "rows": int(c["rows"].sum()),
                   "coverage": round(c["covered"].sum() / max(c["rows"].sum(), 1), 3)}
            if dropped is not None:
                d = f[dropped & in_cells]
                row.update({"rows dropped": len(d),
                            "their coverage": round(d["covered"].mean(), 3) if len(d) else np.nan})
            rows.append(row)
        for (cell, k), c in cells[cells["below"] | cells["above"]].iterrows():
            outside.append({"step": name, "cell": cell, "k": k, "covered": f"{int(c['covered'])}/{int(c['rows'])}",
                            "band": "below" if c["below"] else "above"})
        if name[0].isdigit():
            previous = rows_kept
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 120)
    print(f"{len(args.frames)} frames, {len(f)} rows; cells with >= {MIN_ACCEPTED} kept rows; exact one-sided "
          "binomial tests against 0.85 / 0.95 at 2.5%; rows dropped: by this step from the previous one, in the "
          f"cells counted at this step; stationary: truth within {EDGE} of 0 or 1, or the reflection family at "
          "angle 0\n")
    print(pd.DataFrame(rows).to_string(index=False))
    print("\ncells outside the band:")
    print(pd.DataFrame(outside).to_string(index=False) if outside else "none")
    print("\nstep 3 on the rows of step 2, by how far the Fieller range leaves the interval (in half-widths; 0: "
          "inside) and by the eigengap ratio, every row of step 2: rows and coverage, stationary and interior "
          "cells apart")
    print(rotation_bins(f, kept["2. and meets [0, 1]"]).to_string())
    meets = kept["2. and meets [0, 1]"]
    d = f[meets].assign(kept=kept["3. and rotation (the flag)"][meets], width=f["upper"] - f["lower"])
    d["relative width"] = d["width"] / d.groupby(["cell", "k"])["width"].transform("median")
    print("\nthe interval's width against its cell's median, rows of step 2 that step 3 keeps and drops (median):")
    print(d.groupby(["stationary", "kept"])["relative width"].median().round(2).to_string())


def rotation_bins(f: pd.DataFrame, meets: pd.Series) -> pd.DataFrame:
    """Rows meeting step 2, by how far the Fieller range leaves the interval (0: step 3 keeps the row) and
    by the eigengap ratio, the rows step 3 keeps and drops apart."""
    d = f[meets]
    raw = np.maximum(d["lower"] - d["rotation_lower"], d["rotation_upper"] - d["upper"])
    beyond = np.where(raw <= STABLE_ATOL, 0.0, raw / ((d["upper"] - d["lower"]) / 2))
    d = d.assign(part=np.where(d["stationary"], "stationary", "interior"), kept=beyond == 0,
                 range_beyond=pd.cut(beyond, [-np.inf, 0.0, 0.25, 0.5, 1.0, np.inf]),
                 gap_ratio_bin=pd.cut(d["gap_ratio"], [GAP_MIN, 7, 10, 20, np.inf], include_lowest=True))
    tables = []
    for by in ("range_beyond", "gap_ratio_bin"):
        t = d.groupby(["part", "kept", by], observed=True)["covered"].agg(["size", "mean"]).round(3)
        tables.append(t.rename_axis(["part", "kept", "bin"]).assign(by=by).set_index("by", append=True))
    return pd.concat(tables).reorder_levels(["by", "part", "kept", "bin"])


if __name__ == "__main__":
    main()
