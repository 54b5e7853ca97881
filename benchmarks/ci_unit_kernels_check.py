"""How the committed ci_unit unit differs when recomputed with this CPU's own kernels instead of the pinned ones.

The regeneration test (tests/io/test_study.py, ``_REGENERATE``) recomputes the unit with torch's, OpenBLAS's and
MKL's kernels pinned (`ntps_nb.main_job.REFERENCE_KERNELS`) and requires equality. This runs the same script without the pins (and
with two analysis processes, as the tests do) and prints, for ntps.csv merged with the committed rows on
(variant, estimator, layer, k, fraction), how many rows differ, where and by how much, and whether r_V does;
and the largest difference of the probes' accuracies.

    python benchmarks/ci_unit_kernels_check.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from ntps_nb.main_job import REFERENCE_KERNELS

ROOT = Path(__file__).resolve().parent.parent
UNIT = "units/smollm2-135m__trec6"


def main() -> None:
    script = re.search(r'_REGENERATE = """(.*?)"""', (ROOT / "tests/io/test_study.py").read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k not in REFERENCE_KERNELS}
    env.update(NTPS_NB_ANALYSIS_PROCESSES="2", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as out:
        report = Path(out) / "report.json"
        subprocess.run([sys.executable, "-c", script, str(ROOT / "studies/ci_unit.toml"), out, str(report)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        print(f"kernels: {json.loads(report.read_text())['kernels']} (the committed unit: {REFERENCE_KERNELS})")
        fresh = next(Path(out).rglob(f"{UNIT}/ntps.csv")).parent
        committed = ROOT / "data/results/ci_unit" / UNIT
        keys = ["variant", "estimator", "layer", "k", "fraction"]
        m = pd.read_csv(committed / "ntps.csv").merge(pd.read_csv(fresh / "ntps.csv"), on=keys,
                                                      suffixes=("_committed", "_fresh"), validate="one_to_one")
        m["diff"] = (m.ntps_committed - m.ntps_fresh).abs()
        for variant, rows in m.groupby("variant"):
            moved = rows[rows["diff"] > 0]
            print(f"{variant}: {len(moved)} of {len(rows)} rows differ, largest {rows['diff'].max():.2g}; "
                  f"r_V differs in {int((rows.r_V_committed != rows.r_V_fresh).sum())}")
            if variant == "theory":
                by_k = moved.groupby(["layer", "k"])["diff"].max()
                for (layer, k), largest in by_k[by_k > 1e-3].items():
                    print(f"    layer {layer}, k = {int(k)}: {largest:.3g}")
                print(f"    at most {by_k[by_k <= 1e-3].max():.2g} at the other (layer, k)")
        probes = [pd.read_csv(folder / "probes.csv") for folder in (committed, fresh)]
        print(f"probe accuracy: largest difference {(probes[0]['accuracy'] - probes[1]['accuracy']).abs().max():.2g}")


if __name__ == "__main__":
    main()
