"""Does extraction version 2 (Sxx and Sxy products in float64 under precision "float32") move NTPS above
N = d? Run once with the package before the change and once after, then compare the two files:

    git worktree add /tmp/v1 <commit before version 2>
    (cd /tmp/v1 && PYTHONPATH=/tmp/v1 python /work/main/benchmarks/extract_version_check.py /tmp/v1.npz 1200)
    PYTHONPATH=. python benchmarks/extract_version_check.py /tmp/v2.npz 1200
    python benchmarks/extract_version_check.py --compare /tmp/v1.npz /tmp/v2.npz

SmolLM2, rt-polarity, the last layer, 20 shards, float32 products, max_length 64; the default row of
`ntps_estimate` (richardson, rotation condition off) at k = 1-64 and the plug-in at every k.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np


def compare(first: str, second: str) -> None:
    """Print the largest differences between two files this script wrote."""
    a, b = np.load(first), np.load(second)
    print(f"extraction versions {int(a['version'])} and {int(b['version'])}, {int(a['n'])} texts")
    print("richardson estimate / lower / upper, largest |difference|:",
          " / ".join(f"{x:.1e}" for x in np.nanmax(np.abs(a["est"] - b["est"]), axis=0)))
    print(f"plug-in at all {len(a['plug'])} k, largest |difference|: {np.nanmax(np.abs(a['plug'] - b['plug'])):.1e}")


def measure(out: str, n: int) -> None:
    """Extract ``n`` texts with the installed package and save its default row and plug-in sweep to ``out``."""
    import torch

    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.intervals import layer_shards
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import ntps_sweep
    from ntps_nb.datasets import load_dataset
    from ntps_nb.extract import EXTRACT_VERSION, extract
    from ntps_nb.models import load_model

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model, tok, _ = load_model("smollm2-135m", device="cpu")
    data = load_dataset("rt-polarity", max_train=n, max_test=10)["train"]
    last = model.config.num_hidden_layers
    start = time.time()
    ex = extract(model, tok, data, layers=[last], max_length=64, shards=20, shard_layers=[last], progress=False,
                 precision="float32")
    shards = layer_shards(ex.shards)[last]
    est = ntps_estimate(shards, [1, 2, 4, 8, 16, 32, 64], rotation_flag=False)
    plug = ntps_sweep(Moments.combine(shards), estimator="plugin")
    np.savez(out, est=est[["estimate", "lower", "upper"]].to_numpy(), plug=plug["ntps"].to_numpy(),
             version=EXTRACT_VERSION, n=len(data), seconds=time.time() - start)
    print(out, EXTRACT_VERSION, len(data), round(time.time() - start))


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        measure(sys.argv[1], int(sys.argv[2]))
