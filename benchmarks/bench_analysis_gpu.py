"""The analysis of one layer on the CPU (numpy, the core) and on a GPU (the torch backend), side by side.

    PYTHONPATH=$PWD python benchmarks/bench_analysis_gpu.py [--dims 896 4096] [--n-boot 200] [--budget-s 380]

Synthetic moments at the paper's hidden sizes (Qwen2-0.5B: d = 896; Llama-3-8B: d = 4096):
random positive definite Sxx and C0, random Sxy (C = 6 classes) and C1, as 20 shards of N = 2,000
texts (each shard the base moments plus its own low-rank and dense perturbations, so that
resamples differ). Per hidden size it prints, for numpy on the CPU (BLAS threads bounded by
`ntps_nb.analysis_threads`, i.e. all cores of this process) and for `ntps_nb.core.backends.torch`
on the GPU (float64 for the theory variant, float32 for the reference variant, as released):

- the theory sweep of one layer (NTPS, excess loss and bounds at every k);
- the reference sweep (19 fractions);
- the interval sweep with ``--n-boot`` bootstrap replicates plus 20 leave-one-shard-out
  replicates. numpy is too slow to run it at full size here: its time is extrapolated from a few
  replicates (``--cpu-replicates``) timed through the core's own replicate loop, and said so;
- agreement: the largest difference between the two backends' frames, relative to each
  column's largest magnitude (theory sweep at every d; the full interval sweep frame with a few
  replicates at d <= 1024). The reference variant with C = 6 < d is ill-posed (U's first
  columns are an arbitrary basis of a null eigenspace, SPEC section 4), so its two backends
  agree only in ranks and counts: reported, not compared.

``--budget-s`` bounds the whole run: the GPU interval at the largest d is sized from a short
timed run to fit in what is left (and says so when it runs fewer replicates), and the CPU
reference sweep at the largest d is skipped when it would not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import torch

from ntps_nb import Moments, ntps_sweep
from ntps_nb.core.backends.torch import interval_sweep_torch, ntps_sweep_torch, theory_sweep_torch
from ntps_nb.core.intervals import ShardStack, _Curve, _evaluate, bootstrap_counts, ntps_interval_sweep
from ntps_nb.core.score import theory_geometry

START = time.perf_counter()


def say(*parts) -> None:
    print(*parts, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def synthetic_shards(d: int, n_classes: int, n_texts: int, n_shards: int, seed: int, device: str) -> list[Moments]:
    """Random valid shard moments, generated on ``device`` in float64 and returned as numpy Moments."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64)

    eye = torch.eye(d, device=device, dtype=torch.float64)
    A, B = randn(d, d) / d**0.5, randn(d, d) / d**0.5
    Sxx0, C00 = A @ A.T + 0.1 * eye, 10 * (B @ B.T) + eye
    C10 = randn(d, d) / d**0.5
    Sxy0 = Sxx0 @ randn(d, n_classes) / d**0.5
    rng = np.random.default_rng(seed)
    sizes = np.full(n_shards, n_texts // n_shards) + (np.arange(n_shards) < n_texts % n_shards)
    shards = []
    for n in sizes:
        E, F = randn(d, 32) * 0.1, randn(d, 32) * 0.3
        freqs = rng.multinomial(int(n), np.full(n_classes, 1.0 / n_classes)) / n
        Sxx, C0 = Sxx0 + E @ E.T, C00 + F @ F.T
        shards.append(Moments(
            Sxx=((Sxx + Sxx.T) / 2).cpu().numpy(), Sxy=(Sxy0 + 0.05 * randn(d, n_classes) / d**0.5).cpu().numpy(),
            Syy=np.diag(freqs), C0=((C0 + C0.T) / 2).cpu().numpy(),
            C1=(C10 + 0.1 * randn(d, d) / d**0.5).cpu().numpy(), n_texts=int(n), n_tokens=int(n) * 100))
    return shards


def frame_difference(got: pd.DataFrame, want: pd.DataFrame) -> float:
    """Largest |difference| over the numeric columns, relative to each column's largest magnitude (>= 1)."""
    if list(got.columns) != list(want.columns) or got.shape != want.shape:
        return float("inf")
    worst = 0.0
    for column in want.columns:
        if want[column].dtype.kind not in "fiu":
            if list(got[column]) != list(want[column]):
                return float("inf")
            continue
        a, b = got[column].to_numpy(np.float64), want[column].to_numpy(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        finite = ~np.isnan(b)
        if finite.any():
            worst = max(worst, float(np.abs(a[finite] - b[finite]).max() / max(1.0, np.abs(b[finite]).max())))
    return worst


def cpu_threads():
    """analysis_threads() when threadpoolctl is installed (it comes with scikit-learn), else nothing."""
    try:
        import threadpoolctl  # noqa: F401

        from ntps_nb.core.threads import analysis_threads
    except ImportError:
        say("note: threadpoolctl is not installed; numpy runs with its default BLAS threads")
        return contextlib.nullcontext(None)
    return analysis_threads()


def row(part: str, cpu: str, gpu: str, ratio: str) -> None:
    say(f"{part:<44} {cpu:>34} {gpu:>26} {ratio:>9}")


def seconds(t: float) -> str:
    return f"{t:.3f} s" if t < 10 else f"{t:.1f} s"


def bench(d: int, args, device: str, last: bool) -> None:
    say(f"\n=== d = {d}, C = {args.classes}, N = {args.n_texts} texts in {args.shards} shards "
        f"(elapsed {elapsed():.0f} s) ===")
    t_gen, shards = timed(lambda: synthetic_shards(d, args.classes, args.n_texts, args.shards, seed=d, device=device))
    full = Moments.combine(shards)
    say(f"synthetic moments: {t_gen:.1f} s")
    results = {}

    # GPU first: theory sweep, reference sweep
    t_gpu_theory, gpu_theory = timed(lambda: theory_sweep_torch(full, device=device))
    t_gpu_ref, gpu_ref = timed(lambda: ntps_sweep_torch(full, variant="reference", device=device))
    say(f"GPU theory sweep {seconds(t_gpu_theory)}, reference sweep {seconds(t_gpu_ref)} (elapsed {elapsed():.0f} s)")

    # GPU interval: a short timed run sizes the full one
    probe_boot = 4
    t_probe, _ = timed(lambda: interval_sweep_torch(shards, n_boot=probe_boot, device=device))
    per_replicate_gpu = t_probe / (probe_boot + args.shards)
    say(f"GPU interval probe: {probe_boot} + {args.shards} replicates in {seconds(t_probe)} "
        f"({per_replicate_gpu:.3f} s per replicate, stacking included)")

    # CPU: theory sweep and per-replicate cost
    with cpu_threads() as n_threads:
        t_cpu_theory, cpu_theory = timed(lambda: ntps_sweep(full))
        say(f"CPU theory sweep {seconds(t_cpu_theory)} (threads: {n_threads}, elapsed {elapsed():.0f} s)")
        if d <= 1024:  # the whole numpy interval sweep with a few replicates, to compare frames
            kw = dict(n_boot=args.cpu_replicates, seed=0)
            t_cpu_iv, cpu_iv = timed(lambda: ntps_interval_sweep(shards, **kw))
            per_replicate_cpu = t_cpu_iv / (args.cpu_replicates + args.shards)
            gpu_iv_small = interval_sweep_torch(shards, device=device, **kw)
            results["interval sweep (n_boot=%d) frame" % args.cpu_replicates] = frame_difference(gpu_iv_small, cpu_iv)
            cpu_note = f"{args.cpu_replicates} + {args.shards} replicates"
        else:  # a few bootstrap replicates through the core's own replicate loop
            counts = bootstrap_counts(args.shards, args.cpu_replicates, 0)
            ks = np.arange(1, theory_geometry(full).r_V + 1)
            stack = ShardStack(shards)
            t_cpu_reps, _ = timed(lambda: _evaluate(_Curve("ntps", "theory", ks=ks), stack.combined(counts),
                                                    counts.shape[0], ks.size))
            per_replicate_cpu = t_cpu_reps / args.cpu_replicates
            del stack
            cpu_note = f"{args.cpu_replicates} replicates"
        say(f"CPU per replicate {per_replicate_cpu:.2f} s (timed over {cpu_note}; elapsed {elapsed():.0f} s)")

    # GPU interval at full size, within the budget
    n_boot = args.n_boot
    if last:
        left = args.budget_s - elapsed() - args.reserve_s
        fit = int(left / per_replicate_gpu) - args.shards
        if fit < n_boot:
            n_boot = max(probe_boot, fit)
            say(f"budget: {left:.0f} s left for the GPU interval sweep; running {n_boot} bootstrap replicates "
                f"instead of {args.n_boot}")
    t_gpu_iv, gpu_iv = timed(lambda: interval_sweep_torch(shards, n_boot=n_boot, device=device))
    say(f"GPU interval sweep: {n_boot} + {args.shards} replicates in {seconds(t_gpu_iv)} (elapsed {elapsed():.0f} s)")

    # CPU reference sweep last (the slowest single call), if it fits
    expected_cpu_ref = 3.5 * t_cpu_theory
    t_cpu_ref = None
    if not last or elapsed() + expected_cpu_ref < args.budget_s - 10:
        with cpu_threads():
            t_cpu_ref, cpu_ref = timed(lambda: ntps_sweep(full, variant="reference"))
        same = all(list(gpu_ref[c]) == list(cpu_ref[c]) for c in ("k_U", "k_V", "r_U", "r_V"))
        results["reference sweep: ranks and counts equal"] = same
        results["reference sweep: max |NTPS difference| (ill-posed, C < d)"] = float(
            np.abs(gpu_ref["ntps"].to_numpy() - cpu_ref["ntps"].to_numpy()).max())
    results["theory sweep frame"] = frame_difference(gpu_theory, cpu_theory)

    say(f"\n--- d = {d}: CPU ({platform.processor() or platform.machine()}, numpy) vs GPU "
        f"({torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch) ---")
    row("part", "CPU numpy", "GPU torch", "CPU/GPU")
    row("theory sweep, 1 layer (float64)", seconds(t_cpu_theory), seconds(t_gpu_theory),
        f"{t_cpu_theory / t_gpu_theory:.0f}x")
    if t_cpu_ref is None:
        row("reference sweep, 19 fractions (float32)", "skipped (budget)", seconds(t_gpu_ref), "")
    else:
        row("reference sweep, 19 fractions (float32)", seconds(t_cpu_ref), seconds(t_gpu_ref),
            f"{t_cpu_ref / t_gpu_ref:.0f}x")
    total = n_boot + args.shards
    cpu_iv_time = per_replicate_cpu * total
    row(f"interval sweep, {n_boot} + {args.shards} replicates", f"~{seconds(cpu_iv_time)} (extrapolated)",
        seconds(t_gpu_iv), f"~{cpu_iv_time / t_gpu_iv:.0f}x")
    if n_boot != 200:
        row(f"  (200 + {args.shards} at the same rate)", f"~{seconds(per_replicate_cpu * (200 + args.shards))}",
            f"~{seconds(t_gpu_iv / total * (200 + args.shards))}", "")
    for name, value in results.items():
        say(f"agreement, {name}: {value if isinstance(value, bool) else f'{value:.2e}'}")
    del shards, full
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[896, 4096])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--cpu-replicates", type=int, default=2,
                        help="bootstrap replicates numpy runs (the rest is extrapolated)")
    parser.add_argument("--budget-s", type=float, default=380.0, help="wall-clock budget of the whole run")
    parser.add_argument("--reserve-s", type=float, default=30.0, help="kept free after the GPU interval sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    say(f"bench_analysis_gpu: python {sys.version.split()[0]}, numpy {np.__version__}, torch {torch.__version__}, "
        f"device {args.device}, CPU cores available {len(os.sched_getaffinity(0))}")
    # warm-up: CUDA context, cuSOLVER/cuBLAS handles
    warm = synthetic_shards(32, args.classes, 40, 2, seed=0, device=args.device)
    theory_sweep_torch(Moments.combine(warm), device=args.device)
    interval_sweep_torch(warm, n_boot=2, device=args.device)
    ntps_sweep_torch(Moments.combine(warm), variant="reference", device=args.device)
    for i, d in enumerate(args.dims):
        bench(d, args, args.device, last=i == len(args.dims) - 1)
    say(f"\ntotal wall time {elapsed():.0f} s")


if __name__ == "__main__":
    main()
