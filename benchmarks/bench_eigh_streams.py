"""Do symmetric eigensolves on a GPU go faster side by side? One after another, on 2 / 4 / 8 CUDA
streams driven from as many threads, as one batched call, and through MAGMA.

For the reference variant's replicates (three or four d x d eigensolves each, which cuSOLVER solves
one at a time even in a batched call). Eight random symmetric positive definite matrices at d = 896
and 4096, float32 and float64; per line the time a solve, the speed-up over one after another, and
whether the results are bitwise those of the sequential solves:

    python benchmarks/bench_eigh_streams.py

Output of an H200 run: benchmarks/results/eigh_gpu/h200_eigh_streams.txt (made by this code before
it was committed here; since then only its layout changed).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

N_MATRICES = 8


def matrices(n: int, d: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(n, d, d + 64, generator=g, device=device, dtype=torch.float64)
    return [((x @ x.T) / d).to(dtype) for x in X]


def sequential(As):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = [torch.linalg.eigh(A) for A in As]
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def on_streams(As, workers: int):
    streams = [torch.cuda.Stream() for _ in range(workers)]

    def one(i):
        stream = streams[i % workers]
        with torch.cuda.stream(stream):
            result = torch.linalg.eigh(As[i])
        stream.synchronize()
        return result

    torch.cuda.synchronize()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(one, range(len(As))))
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def batched(As):
    B = torch.stack(As)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = torch.linalg.eigh(B)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    device = torch.device("cuda")
    n = N_MATRICES
    for d in (896, 4096):
        for dtype in (torch.float32, torch.float64):
            As = matrices(n, d, dtype, device)
            sequential(As[:2])  # warm-up: kernels, handles
            on_streams(As[:2], 2)
            t0, want = sequential(As)
            line = f"d={d} {str(dtype)[6:]} n={n}: sequential {t0 / n * 1e3:.1f} ms/solve"
            for workers in (2, 4, 8):
                t, got = on_streams(As, workers)
                same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
                line += f" | {workers} streams {t / n * 1e3:.1f} ms ({t0 / t:.2f}x, identical {same})"
            t, got = batched(As)
            same = torch.equal(got[0], torch.stack([a[0] for a in want]))
            line += f" | batched {t / n * 1e3:.1f} ms ({t0 / t:.2f}x, identical {same})"
            print(line, flush=True)
            try:
                torch.backends.cuda.preferred_linalg_library("magma")
                sequential(As[:1])
                t, _ = sequential(As)
                print(f"   magma: {t / n * 1e3:.1f} ms/solve ({t0 / t:.2f}x)", flush=True)
            except Exception as error:  # a build without MAGMA
                print("   magma failed:", repr(error)[:200])
            finally:
                torch.backends.cuda.preferred_linalg_library("default")
    print(torch.__version__, torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
