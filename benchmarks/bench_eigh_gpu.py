"""Where a bootstrap replicate's time goes on a GPU, and which way of solving it is fastest.

    PYTHONPATH=$PWD python benchmarks/bench_eigh_gpu.py                  # d = 896 and 4096, cuda
    PYTHONPATH=$PWD python benchmarks/bench_eigh_gpu.py --d 64 --device cpu --batch 8   # smoke run

For each hidden size d, on a batch of random symmetric positive definite d x d matrices in
float64, one run times side by side (median of ``--repeats``):

- the linear-algebra pieces of a theory replicate: ``torch.linalg.eigh`` (batched; one matrix at a
  time; the batch split over 2 / 4 / 8 CUDA streams driven by as many threads), eigh in float32
  (the reference variant's precision), ``cholesky_ex``, a triangular solve with d right-hand sides,
  a Householder QR;
- a block of theory replicates as `ntps_nb.core.backends.torch._grouped_geometries` solves it,
  with Sxx and C0 whitened by certified Cholesky factors (the default for full-rank replicates)
  against whitening by eigh (the path rank-deficient replicates take), with their largest
  difference in NTPS;
- a block of the reference variant's replicates (`_reference_rows`, float32 as released).

Each line gives milliseconds per matrix (or per replicate) and the ratio to the batched eigh.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntps_nb.core.backends import torch as backend  # noqa: E402
from ntps_nb.core.intervals import theory_values  # noqa: E402
from ntps_nb.core.score import REFERENCE_ABS_TOL, REFERENCE_FRACTIONS, SPAN_RTOL  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spd_batch(n: int, d: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(n, d, 2 * d, generator=g, dtype=torch.float64)
    return (A @ A.mT / (2 * d)).to(device)


def on_streams(B: torch.Tensor, n_streams: int) -> None:
    """eigh of a batch split into ``n_streams`` chunks, each on its own CUDA stream and thread."""
    streams = [torch.cuda.Stream(device=B.device) for _ in range(n_streams)]
    chunks = B.chunk(n_streams)
    current = torch.cuda.current_stream(B.device)

    def work(i: int) -> None:
        streams[i].wait_stream(current)
        with torch.cuda.stream(streams[i]):
            torch.linalg.eigh(chunks[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in streams:
        current.wait_stream(s)


def replicate_arrays(n: int, d: int, n_classes: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    Sxx, C0 = spd_batch(n, d, device, seed), spd_batch(n, d, device, seed + 2)
    Sxy = (Sxx.cpu() @ torch.randn(n, d, n_classes, generator=g, dtype=torch.float64) / d).to(device)
    Syy = torch.diag_embed(torch.full((n, n_classes), 1.0 / n_classes, dtype=torch.float64)).to(device)
    C1 = (torch.randn(n, d, d, generator=g, dtype=torch.float64) / d**0.5).to(device)
    return {"Sxx": Sxx, "Sxy": Sxy, "Syy": Syy, "C0": C0, "C1": C1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, nargs="+", default=[896, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="matrices per batch, one per d (default 64 at d <= 1024, else 8)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="also append every line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    def say(text: str) -> None:  # every line goes to --out as soon as it is measured: a cut run keeps it
        print(text, flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    say(f"# bench_eigh_gpu: torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"CPU threads {torch.get_num_threads()}")
    batches = args.batch or [64 if d <= 1024 else 8 for d in args.d]
    for d, n in zip(args.d, batches):
        say(f"\n## d = {d}, batch of {n}, float64 unless said, median of {args.repeats} (ms per matrix)")
        B = spd_batch(n, d, device, seed=d)
        base = timed(lambda: torch.linalg.eigh(B), device, args.repeats) / n

        def row(name: str, seconds_per: float) -> None:
            say(f"{name:<52s} {1e3 * seconds_per:10.2f} ms   {seconds_per / base:6.2f} x batched eigh")

        row("eigh, one batched call", base)
        row("eigh, one matrix at a time", timed(lambda: [torch.linalg.eigh(B[i]) for i in range(n)], device,
                                                 args.repeats) / n)
        if device.type == "cuda":
            for k in (2, 4, 8):
                row(f"eigh, batch split over {k} streams (threads)", timed(lambda: on_streams(B, k), device,
                                                                            args.repeats) / n)
        B32 = B.float()
        row("eigh, float32", timed(lambda: torch.linalg.eigh(B32), device, args.repeats) / n)
        row("eigvalsh (eigenvalues only)", timed(lambda: torch.linalg.eigvalsh(B), device, args.repeats) / n)
        row("cholesky_ex", timed(lambda: torch.linalg.cholesky_ex(B), device, args.repeats) / n)
        L = torch.linalg.cholesky(B)
        row("solve_triangular, d right-hand sides", timed(lambda: torch.linalg.solve_triangular(L, B, upper=False),
                                                          device, args.repeats) / n)
        row("qr (reduced)", timed(lambda: torch.linalg.qr(B), device, args.repeats) / n)
        row("matmul d x d", timed(lambda: B @ B, device, args.repeats) / n)

        arrays = replicate_arrays(n, d, args.classes, device, seed=d + 7)
        tokens, ok = np.full(n, 10_000), np.ones(n, dtype=bool)

        def theory(whitening: str):
            return backend._grouped_geometries(arrays["Sxx"], arrays["Sxy"], arrays["Syy"], arrays["C0"], arrays["C1"],
                                               tokens, ok, tol=None, rtol=RANGE_RTOL, span_rtol=SPAN_RTOL,
                                               whitening=whitening)[0]

        t_eigh = timed(lambda: theory("eigh"), device, args.repeats) / n
        t_chol = timed(lambda: theory("auto"), device, args.repeats) / n
        ks = np.array([1, 2, 4, 8, 16, 32, 64])
        fast, slow = theory("auto"), theory("eigh")
        diff = max(float(np.nanmax(np.abs(theory_values(f, ks, "ntps") - theory_values(s, ks, "ntps"))))
                   for f, s in zip(fast, slow))
        row("theory replicate, whitening by eigh", t_eigh)
        row("theory replicate, certified Cholesky (default)", t_chol)
        say(f"    Cholesky / eigh whitening: {t_chol / t_eigh:.2f}; largest |NTPS difference| at k in {ks.tolist()}: "
            f"{diff:.1e}")
        fractions = np.asarray(REFERENCE_FRACTIONS)
        row("reference replicate (float32, as released)",
            timed(lambda: backend._reference_rows(arrays["Sxx"], arrays["Sxy"], arrays["C0"], arrays["C1"], ok,
                                                  fractions, precision="float32", tol=REFERENCE_ABS_TOL,
                                                  span_rtol=SPAN_RTOL), device, args.repeats) / n)
        del B, B32, L, arrays
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
