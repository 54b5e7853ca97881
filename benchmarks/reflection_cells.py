"""The flag on the reflection family: per cell, how often it accepts a row and how its rows cover.

`ntps_nb.core.simulate.reflection_model` puts the population NTPS at k = 1 at a stationary point of the
rotation of U's top pair (a maximum), where the estimate's error is quadratic in that rotation. The
exact two-dimensional model (`gap_selection_check.py --toy-stable`) says the rotation condition then
keeps mostly the draws whose Fieller set misses the truth; this prints what the flag does on map frames
of the family (`estimator_map.py --families reflection`): for every design x population x N/d x k, the
draws, the share the flag accepts, how many rows its rotation condition takes out, U's median sample
eigengap ratio at k, the jackknife's mean standard error over the estimate's SD and the bias across all
draws (sqrt(R(S)) = 1.5 at S = 10 where the error is purely quadratic), and the accepted rows'
coverage (exact one-sided binomial tests against 0.85 / 0.95 at 0.025) and bias over the mean width.

    python benchmarks/reflection_cells.py benchmarks/results/estimator_map/reflection/draws_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import CELL, MIN_ACCEPTED  # noqa: E402
from rotation_flag_report import cell_table  # noqa: E402

def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the frame: over all draws, the draws, the accepted rows and their share, the
    rows the rotation condition takes out, U's median eigengap ratio, the mean se over the estimate's SD
    and the bias; over the accepted rows (`rotation_flag_report.cell_table`, cells with >= `MIN_ACCEPTED`
    of them), coverage, bias over the mean width and the band tests (NaN / False below that)."""
    f = frame.assign(reliable=frame["reliable"].astype(bool),
                     taken=~frame["rotation_stable"].fillna(True).astype(bool) & frame["rotation_lower"].notna())
    key = [c for c in CELL + ["task_seed"] if c in f]
    out = f.groupby(key).agg(truth=("truth", "first"), draws=("estimate", "size"), accepted=("reliable", "sum"),
                             rotation_taken=("taken", "sum"), gap_ratio_U=("gap_ratio_U", "median"),
                             se=("se", "mean"), sd=("estimate", "std"), bias_all=("error", "mean")).reset_index()
    out = out.assign(accepted_share=out["accepted"] / out["draws"], se_over_sd=out["se"] / out["sd"])
    kept = cell_table(f, f["reliable"]).rename(columns={"sum": "covered", "size": "kept"})
    out = out.merge(kept.assign(coverage=kept["covered"] / kept["kept"],
                                bias_over_width=kept["bias"] / kept["width"])[key + ["covered", "coverage",
                                                                                   "bias_over_width", "below",
                                                                                   "above"]],
                    on=key, how="left")
    out[["below", "above"]] = out[["below", "above"]].fillna(False).astype(bool)
    out["covered"] = out["covered"].astype("Int64")
    return out[key + ["truth", "draws", "accepted", "accepted_share", "rotation_taken", "gap_ratio_U", "se_over_sd",
                      "bias_all", "covered", "coverage", "bias_over_width", "below", "above"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", help="estimator_map per-draw frames of the reflection family")
    args = parser.parse_args()
    table = pd.concat([cells(pd.read_csv(p)) for p in args.frames], ignore_index=True)
    table = table.sort_values([c for c in CELL + ["task_seed"] if c in table]).reset_index(drop=True)
    print(f"## every cell (accepted rows' coverage and bias where >= {MIN_ACCEPTED})")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    assessed = table[table["accepted"] >= MIN_ACCEPTED]
    print(f"\n## cells with >= {MIN_ACCEPTED} accepted rows, by k (at the default angle k = 1 is the stationary point)")
    for k, g in assessed.groupby("k"):
        print(f"k = {k}: {len(g)} cells, coverage {g['coverage'].min():.3f}-{g['coverage'].max():.3f}, "
              f"pooled {g['covered'].sum():.0f} of {g['accepted'].sum()} "
              f"({g['covered'].sum() / g['accepted'].sum():.3f}); "
              f"significantly below 0.85: {int(g['below'].sum())}, above 0.95: {int(g['above'].sum())}; "
              f"|bias| / width {g['bias_over_width'].abs().max():.3f} at most")
    none = table[table["accepted"] == 0]
    print(f"\ncells where the flag accepts no row: {len(none)} of {len(table)}; "
          f"it accepts fewer than {MIN_ACCEPTED} in {int((table['accepted'] < MIN_ACCEPTED).sum())}")


if __name__ == "__main__":
    main()
