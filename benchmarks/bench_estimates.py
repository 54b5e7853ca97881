"""`ntps_estimate` in numpy and on the torch backend (CPU, one thread each) at the study's shape of
an interval layer: d = 256, 20 shards, N = 2,000 synthetic texts, the study's k grid up to 128.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_estimates.py

Prints each estimator's two times, the largest difference over the numeric columns and whether
the reliable flags agree.
"""

import time
import warnings

import numpy as np
import torch

from ntps_nb.core.estimators import ntps_estimate
from ntps_nb.core.simulate import factor_model, sample_shards

KS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128]
COLUMNS = ["estimate", "se", "lower", "upper", "bias_jackknife", "noise_U", "noise_V", "subspace_noise"]


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)
    shards = sample_shards(factor_model(d=256, n_classes=6, seed=0), 2000, 20, np.random.default_rng(0))
    ntps_estimate(shards[:3], [1], device="cpu")  # torch's first call loads its kernels
    for estimator in ("richardson", "plugin"):
        start = time.perf_counter()
        want = ntps_estimate(shards, KS, estimator=estimator)
        middle = time.perf_counter()
        got = ntps_estimate(shards, KS, estimator=estimator, device="cpu")
        stop = time.perf_counter()
        diff = np.nanmax(np.abs(want[COLUMNS].to_numpy(float) - got[COLUMNS].to_numpy(float)))
        same = bool((want["reliable"] == got["reliable"]).all())
        print(f"{estimator}: numpy {middle - start:.2f} s, torch on the CPU {stop - middle:.2f} s, "
              f"max |torch - numpy| {diff:.1e}, reliable flags equal: {same}")


if __name__ == "__main__":
    main()
