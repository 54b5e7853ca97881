"""What rerunning a study's estimates stage changed: the committed table against one at a git revision.

A unit's estimates stage version shows in its rows: version 1 has no gap columns, version 2 has them
(gap_ratio), version 3 also has at_bound (`ntps_nb.core.estimators.flag_at_bound`). For every unit whose
rows gained the gap columns since ``REV`` (its estimates stage was recomputed), prints how far its
estimates moved, its reliable rows then and now, and its estimates stage's time from its unit.json (the run
that computed it; the forward pass is the extraction's, not counted); for
every unit whose rows had the gap columns then and gained at_bound since (refreshed from its
version-2 table), its reliable rows then and now and the rows that left; then how many units of the
study carry each version.

    python benchmarks/estimates_update_check.py data/results/default-richardson 21970e6 \
        > benchmarks/results/estimator_map/richardson/estimates_update_check_v3.txt
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path

import pandas as pd

KEYS = ["model", "dataset", "layer", "k"]


def table_at(rev: str, path: Path) -> pd.DataFrame:
    """The CSV at ``path`` as committed at ``rev``."""
    text = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True,
                          check=True).stdout
    return pd.read_csv(io.StringIO(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a study's results folder (holds estimates.csv and units/)")
    parser.add_argument("rev", help="the git revision to compare with")
    args = parser.parse_args()
    folder = Path(args.results)
    now = pd.read_csv(folder / "estimates.csv")
    then = table_at(args.rev, folder / "estimates.csv")
    for frame in (then, now):
        for column in ("gap_ratio", "at_bound"):
            if column not in frame:
                frame[column] = float("nan")
    both = then.merge(now, on=KEYS, suffixes=("_then", "_now"))
    rerun = both[both["gap_ratio_then"].isna() & both["gap_ratio_now"].notna()]
    print(f"{folder}: estimates.csv now against {args.rev}; units whose estimates stage was recomputed "
          f"(their rows gained the gap columns):")
    rows = []
    for (model, dataset), g in rerun.groupby(["model", "dataset"], sort=False):
        unit = json.loads((folder / "units" / f"{model.replace(':', '-')}__{dataset}" / "unit.json").read_text())
        rows.append({"model": model, "dataset": dataset, "rows": len(g),
                     "max_abs_change": (g["estimate_now"] - g["estimate_then"]).abs().max(),
                     "reliable_then": int(g["reliable_then"].sum()), "reliable_now": int(g["reliable_now"].sum()),
                     "same_reliable_rows": bool((g["reliable_then"] == g["reliable_now"]).all()),
                     "estimates_seconds": ((unit.get("stages") or {}).get("estimates") or {}).get("seconds")})
    rows = pd.DataFrame(rows)
    if len(rows):
        print(rows.to_string(index=False))
        print(f"\n{len(rows)} units, {int(rows['rows'].sum())} rows; largest change of an estimate "
              f"{rows['max_abs_change'].max():.3g}; reliable rows {int(rows['reliable_then'].sum())} then, "
              f"{int(rows['reliable_now'].sum())} now, the same rows in every unit: "
              f"{bool(rows['same_reliable_rows'].all())}; estimates stage times {rows['estimates_seconds'].min():.0f}-"
              f"{rows['estimates_seconds'].max():.0f} s (the run that computed it, forward pass not included)")
        gone = rerun[rerun["reliable_then"].astype(bool) & ~rerun["reliable_now"].astype(bool)]
        if len(gone):
            print("rows that left reliable (at_bound where the bound condition took them):")
            print(gone[KEYS + ["estimate_now", "se_now", "lower_now", "upper_now", "at_bound_now"]].to_string(index=False))
    else:
        print("none")
    refreshed = both[both["gap_ratio_then"].notna() & both["at_bound_then"].isna() & both["at_bound_now"].notna()]
    print(f"\nunits whose rows had the gap columns at {args.rev} and gained at_bound since (version 2 -> 3):")
    left = refreshed[refreshed["reliable_then"].astype(bool) & ~refreshed["reliable_now"].astype(bool)]
    print(f"{refreshed.groupby(['model', 'dataset']).ngroups} units, {len(refreshed)} rows; estimates unchanged: "
          f"{bool((refreshed['estimate_then'] == refreshed['estimate_now']).all())}; reliable rows "
          f"{int(refreshed['reliable_then'].astype(bool).sum())} then, {int(refreshed['reliable_now'].astype(bool).sum())} now; "
          f"rows that left reliable, all at_bound: {bool(left['at_bound_now'].astype(bool).all())}")
    if len(left):
        print(left[KEYS + ["estimate_now", "se_now", "lower_now", "upper_now"]].to_string(index=False))
    units = now.groupby(["model", "dataset"])
    version = {key: 3 if g["at_bound"].notna().all() else 2 if g["gap_ratio"].notna().all() else 1
               for key, g in units}
    print("\nthe study now:")
    for v in (3, 2, 1):
        keys = [key for key, got in version.items() if got == v]
        mask = now.set_index(["model", "dataset"]).index.isin(keys)
        names = ", ".join(f"{m} x {d}" for m, d in keys) if v < 3 else ""
        print(f"  version {v}: {len(keys)} of {units.ngroups} units, {int(now.loc[mask, 'reliable'].astype(bool).sum())} "
              f"reliable rows{': ' + names if names else ''}")


if __name__ == "__main__":
    main()
