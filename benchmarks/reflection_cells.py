"""The flag on the reflection family: per cell, how often it accepts a row and how its rows cover.

`ntps_nb.core.simulate.reflection_model` puts the population NTPS at k = 1 at a stationary point of the
rotation of U's top pair (a maximum), where the estimate's error is quadratic in that rotation. The
exact two-dimensional model (`gap_selection_check.py --toy-stable`) says the rotation condition then
keeps mostly the draws whose Fieller set misses the truth; this prints what the flag does on map frames
of the family (`estimator_map.py --families reflection`): for every design x population x N/d x k, the
draws, the share the flag accepts, how many rows its rotation condition takes out, the jackknife's mean
standard error over the estimate's SD across all draws (sqrt(R(S)) = 1.5 at S = 10 where the error is
purely quadratic), and the accepted rows' coverage (exact one-sided binomial tests against 0.85 / 0.95
at 0.025), bias over the mean width, and median sample eigengap ratio of U at k.

    python benchmarks/reflection_cells.py benchmarks/results/estimator_map/reflection/draws_*.csv.gz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimator_flag_report import MIN_ACCEPTED, exact_band_tests  # noqa: E402

KEY = ["task_angle", "task_d", "task_n_classes", "task_gap", "task_seed", "n_over_d", "k"]


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the frame: draws, accepted share, rotation-condition share, accepted rows'
    coverage, bias / mean width and the band tests (NaN / False below `MIN_ACCEPTED` accepted rows)."""
    f = frame.assign(reliable=frame["reliable"].astype(bool), width=frame["upper"] - frame["lower"])
    stable = f["rotation_stable"].fillna(True).astype(bool)
    f = f.assign(taken=~stable & f["rotation_lower"].notna())
    key_columns = [c for c in KEY if c in f]  # frames slimmed before the angle was kept are at the default
    rows = []
    for key, g in f.groupby(key_columns):
        r = g[g["reliable"]]
        rows.append(dict(zip(key_columns, key), truth=g["truth"].iloc[0], draws=len(g), accepted=len(r),
                         accepted_share=len(r) / len(g), rotation_taken=int(g["taken"].sum()),
                         gap_ratio_U=g["gap_ratio_U"].median(),
                         se_over_sd=g["se"].mean() / g["estimate"].std(),
                         covered=int(r["covered"].sum()),
                         coverage=r["covered"].mean() if len(r) >= MIN_ACCEPTED else np.nan,
                         bias_over_width=(r["error"].mean() / r["width"].mean()) if len(r) >= MIN_ACCEPTED else np.nan))
    out = pd.DataFrame(rows)
    enough = out["accepted"] >= MIN_ACCEPTED
    below, above = exact_band_tests(out.loc[enough, "covered"], out.loc[enough, "accepted"])
    out["below"], out["above"] = False, False
    out.loc[enough, "below"], out.loc[enough, "above"] = np.asarray(below, bool), np.asarray(above, bool)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", help="estimator_map per-draw frames of the reflection family")
    args = parser.parse_args()
    table = pd.concat([cells(pd.read_csv(p)) for p in args.frames], ignore_index=True)
    table = table.sort_values([c for c in KEY if c in table]).reset_index(drop=True)
    print(f"## every cell (accepted rows' coverage and bias where >= {MIN_ACCEPTED})")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    assessed = table[table["accepted"] >= MIN_ACCEPTED]
    print(f"\n## cells with >= {MIN_ACCEPTED} accepted rows, by k (at the default angle k = 1 is the stationary point)")
    for k, g in assessed.groupby("k"):
        print(f"k = {k}: {len(g)} cells, coverage {g['coverage'].min():.3f}-{g['coverage'].max():.3f}, "
              f"pooled {g['covered'].sum()} of {g['accepted'].sum()} ({g['covered'].sum() / g['accepted'].sum():.3f}); "
              f"significantly below 0.85: {int(g['below'].sum())}, above 0.95: {int(g['above'].sum())}; "
              f"|bias| / width {g['bias_over_width'].abs().max():.3f} at most")
    none = table[table["accepted"] == 0]
    print(f"\ncells where the flag accepts no row: {len(none)} of {len(table)}; "
          f"it accepts fewer than {MIN_ACCEPTED} in {int((table['accepted'] < MIN_ACCEPTED).sum())}")


if __name__ == "__main__":
    main()
