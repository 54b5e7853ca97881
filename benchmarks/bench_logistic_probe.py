"""The held-out logistic probe: scikit-learn's lbfgs against the torch backend's batched Newton-CG
(`ntps_nb.core.backends.torch.logistic_probe_torch`) at a probe's shape, on one device.

    PYTHONPATH=$PWD python benchmarks/bench_logistic_probe.py                   # d = 896, N = 2000, C = 6, CPU
    PYTHONPATH=$PWD python benchmarks/bench_logistic_probe.py --device cuda --layers 25

Synthetic features per layer: class means plus a correlated low-rank factor with a decaying
spectrum plus noise, seen through uneven feature scales (a probe's features are far from
isotropic; the scaler undoes the scales, not the correlation). Times one layer (sklearn, then
torch), then ``--layers`` layers one at a time and as one batched call, and prints how the fits
agree (test predictions that differ, max |accuracy difference|, Newton iterations, Hessian-vector
products). Thread counts are whatever the environment gives (set OMP_NUM_THREADS etc.).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.backends.torch import logistic_probe_torch  # noqa: E402
from ntps_nb.core.probes import LOGISTIC_MAX_ITER, LOGISTIC_TOL  # noqa: E402


def layer_features(seed: int, labels: np.ndarray, d: int, n_classes: int, rank: int = 32):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, d)) * 0.1
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    factor = (rng.standard_normal((labels.size, rank)) * 10.0 / np.arange(1, rank + 1)) @ basis.T
    X = means[labels] + factor + rng.standard_normal((labels.size, d))
    return X * rng.uniform(0.5, 3.0, d) + rng.standard_normal(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    def clock(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.n_train + args.n_test)
    labels[:args.classes] = np.arange(args.classes)
    ytr, yte = labels[:args.n_train], labels[args.n_train:]
    layers = [layer_features(seed, labels, args.d, args.classes) for seed in range(args.layers)]
    train, test = [X[:args.n_train] for X in layers], [X[args.n_train:] for X in layers]
    print(f"d = {args.d}, N = {args.n_train} train + {args.n_test} test, C = {args.classes}, {args.layers} layers, "
          f"device {device}, torch threads {torch.get_num_threads()}, tol {LOGISTIC_TOL:g}")

    def sklearn_fit(i):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=LOGISTIC_MAX_ITER, tol=LOGISTIC_TOL))
        model.fit(train[i], ytr)
        return model[-1].n_iter_[0], model.predict(test[i])

    def torch_fit(indices):
        return logistic_probe_torch([train[i] for i in indices], ytr, [test[i] for i in indices], Cs=1.0,
                                    tol=LOGISTIC_TOL, device=device)

    torch_fit([0])  # warm-up: allocator, kernels
    t_sk, (n_iter, sk_pred) = clock(lambda: sklearn_fit(0))
    t_torch, (fit,) = clock(lambda: torch_fit([0]))
    print(f"one layer: sklearn lbfgs {t_sk:.2f} s ({n_iter} iterations); torch {t_torch:.2f} s "
          f"({fit.n_iter[0]} Newton iterations, {fit.n_hessian_products[0]} Hessian products); "
          f"{np.count_nonzero(fit.eval_predictions[0] != sk_pred)} of {yte.size} test predictions differ, "
          f"test accuracy {np.mean(sk_pred == yte):.3f}")

    t_sk_all, sk_all = clock(lambda: [sklearn_fit(i)[1] for i in range(args.layers)])
    t_alone, alone = clock(lambda: [torch_fit([i])[0] for i in range(args.layers)])
    t_batch, batched = clock(lambda: torch_fit(range(args.layers)))
    differ = sum(int(np.count_nonzero(b.eval_predictions[0] != s)) for b, s in zip(batched, sk_all))
    worst = max(abs(np.mean(b.eval_predictions[0] == yte) - np.mean(s == yte)) for b, s in zip(batched, sk_all))
    same = all(np.array_equal(b.eval_predictions, a.eval_predictions) for b, a in zip(batched, alone))
    print(f"{args.layers} layers: sklearn one at a time {t_sk_all:.2f} s; torch one at a time {t_alone:.2f} s; "
          f"torch batched {t_batch:.2f} s (batched/one at a time {t_batch / t_alone:.2f})")
    print(f"  agreement with sklearn: {differ} of {args.layers * yte.size} test predictions differ, accuracy max "
          f"|torch - sklearn| {worst:.2e}; batched predictions equal one at a time: {same}; Newton iterations "
          f"{[int(b.n_iter[0]) for b in batched]}, all converged: {all(bool(b.converged[0]) for b in batched)}")


if __name__ == "__main__":
    main()
