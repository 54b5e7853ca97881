"""Host analysis with every BLAS thread: the package at a git revision against the working tree, side by side.

pip's numpy and scipy wheels each bundle their own OpenBLAS, each with a thread pool of one thread per core by
default. A pool's threads keep spinning for a while after each call, so code that alternates scipy's LAPACK
(`scipy.linalg.eigh`) with numpy's products runs the two pools against each other. Since this benchmark's
change the analysis solves on numpy's LAPACK (`ntps_nb.core.subspaces.symmetric_eigh`); the reference variant
keeps scipy's, as the released code did.

Each round runs one interpreter per side (the package at ``REV``, extracted with ``git archive``, then the
working tree), alternately, so both meet the same machine noise. Each interpreter bounds every BLAS pool to
``--threads`` (default: the cores it may run on, as ``ntps_nb.analysis_threads()`` does in a notebook), times
each call once after an untimed warm-up, and reports. Printed: the median seconds over ``--repeats`` rounds per
side and call, and the ratio then / now. The calls, on one layer's shards from the LDS generator (d hidden
dimensions, N texts, S shards, C = 6): the pooled moments' `theory_geometry`, `ntps_sweep` (plug-in, every k),
`ntps_estimate` with the plug-in and with the default (richardson, quadratic interval, flag) at k = 1, 2, 4, 8,
16, and `reference_geometry` (scipy on both sides: a control that should not move).

    python benchmarks/bench_blas_pools.py f3c7fa1 --d 256 --texts 2000 --shards 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KS = [1, 2, 4, 8, 16]


def timed_calls(d: int, texts: int, shards: int, threads: int) -> dict:
    """Seconds of each call in this interpreter (every BLAS pool at ``threads``), and the pools found."""
    import numpy as np
    from threadpoolctl import threadpool_info

    import ntps_nb
    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import ntps_sweep, reference_geometry, theory_geometry
    from ntps_nb.core.simulate import lds_model, sample_shards

    ntps_nb.analysis_threads(threads)
    parts = sample_shards(lds_model(d=d, n_classes=6, seed=1), texts, shards, np.random.default_rng(0))
    pooled = Moments.combine(parts)
    calls = {
        "theory_geometry (pooled)": lambda: theory_geometry(pooled),
        "ntps_sweep plugin": lambda: ntps_sweep(parts),
        "ntps_estimate plugin": lambda: ntps_estimate(parts, KS, estimator="plugin"),
        "ntps_estimate default": lambda: ntps_estimate(parts, KS),
        "reference_geometry (control)": lambda: reference_geometry(pooled),
    }
    seconds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            call()
            seconds[name] = time.perf_counter() - start
    pools = sorted({(info["internal_api"], Path(info["filepath"]).name, info["num_threads"])
                    for info in threadpool_info() if info["user_api"] == "blas"})
    return {"seconds": seconds, "pools": pools, "package": str(Path(ntps_nb.__file__).parent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="the git revision to compare with")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the available cores)")
    parser.add_argument("--then-package", default=None,
                        help="a folder holding the package at REV (ntps_nb/), where there is no git history to extract "
                             "it from (REV then only names it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one side's timings as JSON
    args = parser.parse_args()
    from ntps_nb.core.threads import available_cores

    threads = args.threads or available_cores()
    if args.child:
        print(json.dumps(timed_calls(args.d, args.texts, args.shards, threads)))
        return
    if not args.rev:
        parser.error("give the git revision to compare with")
    import numpy as np
    import pandas as pd

    from frames_at_revision import package_at

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                           "MKL_NUM_THREADS", "NTPS_NB_ANALYSIS_PROCESSES")}
    given = [str(Path(path).resolve()) for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        then = Path(args.then_package).resolve() if args.then_package else package_at(args.rev, Path(tmp) / "then")
        sides = {"then": then, "now": REPO}
        for round_ in range(args.repeats):
            for side, root in sides.items():
                side_env = dict(env, PYTHONPATH=os.pathsep.join([str(root), str(REPO)] + given))
                command = [sys.executable, str(Path(__file__).resolve()), "--child", "--d", str(args.d), "--texts",
                           str(args.texts), "--shards", str(args.shards), "--threads", str(threads)]
                out = subprocess.run(command, cwd=tmp, env=side_env, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if Path(result["package"]) != Path(root) / "ntps_nb":
                    raise SystemExit(f"the {side} side imported the package from {result['package']}, not {root}")
                if round_ == 0:
                    name = args.rev if side == "then" else "working tree"
                    print(f"{side} ({name}): BLAS pools {result['pools']}", flush=True)
                seconds = ", ".join(f"{call} {s:.3f}" for call, s in result["seconds"].items())
                print(f"round {round_ + 1}, {side}: {seconds}", flush=True)  # a long run killed midway keeps these
                rows += [{"side": side, "call": call, "seconds": s} for call, s in result["seconds"].items()]
    table = pd.DataFrame(rows).groupby(["call", "side"], sort=False)["seconds"].median().unstack("side")
    table["then / now"] = table["then"] / table["now"]
    print(f"d = {args.d}, {args.texts} texts in {args.shards} shards, {threads} BLAS threads a pool, "
          f"{args.repeats} rounds (median seconds; cores available: {available_cores()}, numpy {np.__version__})")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
