"""What rerunning a study's estimates stage changed: the committed table against one at a git revision.

For every unit whose rows gained the version-2 gap columns since ``REV`` (its estimates stage was
rerun), prints how far its estimates moved, whether its reliable rows are the same, and the unit's
stage time from its unit.json; then how many units of the study carry version 2 and which do not.

    python benchmarks/estimates_update_check.py data/results/default-richardson da8716b \
        > benchmarks/results/estimator_map/richardson/estimates_update_check.txt
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
    both = then.merge(now, on=KEYS, suffixes=("_then", "_now"))
    rerun = both[both["gap_ratio_then"].isna() & both["gap_ratio_now"].notna()] if "gap_ratio" in then else \
        both[both["gap_ratio_now"].notna()]
    print(f"{folder}: estimates.csv now against {args.rev}; units whose estimates stage gained version 2's gap columns:")
    rows = []
    for (model, dataset), g in rerun.groupby(["model", "dataset"], sort=False):
        unit = json.loads((folder / "units" / f"{model.replace(':', '-')}__{dataset}" / "unit.json").read_text())
        rows.append({"model": model, "dataset": dataset, "rows": len(g),
                     "max_abs_change": (g["estimate_now"] - g["estimate_then"]).abs().max(),
                     "reliable_then": int(g["reliable_then"].sum()), "reliable_now": int(g["reliable_now"].sum()),
                     "same_reliable_rows": bool((g["reliable_then"] == g["reliable_now"]).all()),
                     "unit_seconds": unit.get("seconds")})
    rows = pd.DataFrame(rows)
    print(rows.to_string(index=False))
    print(f"\n{len(rows)} units, {int(rows['rows'].sum())} rows; largest change of an estimate "
          f"{rows['max_abs_change'].max():.3g}; reliable rows {int(rows['reliable_then'].sum())} then, "
          f"{int(rows['reliable_now'].sum())} now, the same rows in every unit: {bool(rows['same_reliable_rows'].all())}; "
          f"unit times {rows['unit_seconds'].min():.0f}-{rows['unit_seconds'].max():.0f} s")
    at_v2 = now[now["gap_ratio"].notna()].groupby(["model", "dataset"]).ngroups
    units = now.groupby(["model", "dataset"])
    v1 = [f"{m} x {d}" for (m, d), g in units if g["gap_ratio"].isna().all()]
    v2_reliable = int(now.loc[now["gap_ratio"].notna(), "reliable"].sum())
    print(f"\nthe study now: {at_v2} of {units.ngroups} units at version 2 ({v2_reliable} reliable rows among them); "
          f"still version 1: {len(v1)}: {', '.join(v1)}")


if __name__ == "__main__":
    main()
