"""Whether the flag's new refusal at tied next-token eigenvalues (`eigengap_ratios`: gap_ratio_V = 0 where
`ntps_nb.core.score.next_token_tied_ks` names k) can change a committed study's `reliable` column, without
recomputing it: per committed estimates table, the rows, the rows the flag accepts, and the smallest next-token
gap (gap_V, absolute) among those. A tie needs gap_V <= r_V x eps x mu_1 (r_V <= d <= 4096 here), so an accepted
row with gap_V = g could turn only where mu_1 >= g / (4096 x 2.2e-16); the largest mu_1 in the committed
benchmark outputs is 3.9e8 (Gemma-3's layer 9, benchmarks/results/precision/gemma3-270m_next_token_null_block.txt).

    python benchmarks/estimates_tie_check.py
"""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd

EPS = float(np.finfo(np.float64).eps)


def main() -> None:
    files = [path for path in subprocess.run(["git", "ls-files", "data/results/*/estimates.csv"], capture_output=True,
                                             text=True, check=True).stdout.split()
             if path.count("/") == 3]  # the studies' combined tables (their units' rows, once)
    print("$ python benchmarks/estimates_tie_check.py")
    print("table                                          rows  accepted  smallest gap_V accepted  mu_1 a tie needs")
    for path in files:
        table = pd.read_csv(path)
        accepted = table[table["reliable"].astype(bool)]
        smallest = float(accepted["gap_V"].min()) if len(accepted) else float("nan")
        print(f"{path:<46} {len(table):5d}  {len(accepted):8d}  {smallest:23.3g}  {smallest / (4096 * EPS):.1e}")


if __name__ == "__main__":
    main()
