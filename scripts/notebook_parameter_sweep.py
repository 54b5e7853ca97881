"""Run the notebooks headlessly with parameters other than their defaults, as a papermill user would.

    .venv/bin/python scripts/notebook_parameter_sweep.py [--out out/notebook_sweep] [--only NAME ...]

Each variant executes one notebook through ``python -m ntps_nb notebooks run`` with the parameters below
(offline models and datasets only) and prints its exit status and time; a failed variant also prints the
last lines of its log. Variants are chosen to reach the code paths a default run does not: another model
and dataset, the fewest shards the default estimator takes, an estimator of the pooled moments alone, a
shard estimator on every layer, another generator in notebook 02. The CI's smoke runs (tests/notebooks)
cover the defaults on tiny models; this takes about half an hour on two CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name -> (notebook, parameters)
VARIANTS = {
    "00_plugin": ("00", {"estimator": "plugin"}),
    "00_four_shards": ("00", {"shards": 4}),
    "00_gemma_rt_polarity": ("00", {"model": "gemma3-270m", "dataset": "rt-polarity", "k": 1, "shards": 5}),
    "00_pooled_estimator": ("00", {"estimator": "pca"}),
    "00_jackknife_every_layer": ("00", {"estimator": "jackknife", "shards": 4, "interval_layers": "all",
                                        "max_train": 150}),
    "00_crossfit_below_rank": ("00", {"estimator": "crossfit", "shards": 6, "k": 32, "interval_layers": "all"}),
    # 40 texts: fewer token pairs than 4 d (float64 token products under "float32"), every part interpolating
    "00_forty_texts": ("00", {"max_train": 40, "shards": 4}),
    "02_markov": ("02", {"truth_family": "markov", "truth_k": 1, "truth_draws": 20}),
    "06_plugin_four_shards": ("06", {"estimator": "plugin", "shards": 4}),
    "06_k20_seven_shards": ("06", {"k": 20, "shards": 7}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "notebook_sweep"))
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    args = parser.parse_args()
    failed = []
    for name in args.only or VARIANTS:
        notebook, parameters = VARIANTS[name]
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "ntps_nb", "notebooks", "run", notebook, "--out", str(out)]
        for key, value in parameters.items():
            command += ["-p", key, str(value)]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(f"{name}: {'ok' if done.returncode == 0 else 'FAILED'} ({seconds:.0f} s) {parameters}", flush=True)
        if done.returncode:
            failed.append(name)
            print("    " + "\n    ".join((done.stdout + done.stderr).strip().splitlines()[-8:]), flush=True)
    names = ", ".join(failed)
    print(f"{len(failed)} of {len(args.only or VARIANTS)} variants failed" + (f": {names}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
