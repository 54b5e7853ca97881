"""Where one layer's reference sweep spends its time on a GPU (random moments of the paper's 8B shape).

The reference variant is the released algorithm: four float32 eigendecompositions (the whitening of
Sxx and C0, the reduced problems of Sxy Sxy^T and C1 C1^T), V's nested orthonormal basis, and a
lookup at the 19 fractions. Where C0 is certified to keep all d directions its whitening is a
Cholesky factor instead of an eigendecomposition (the same V to rounding); the profile times both
and prints how far apart the 19 NTPS values are. This prints the best of three timings of the whole sweep, of each step,
and of the host copies the sweep no longer makes (U, V and the projection table), with the
moments resident on the device as the study keeps them:

    python benchmarks/bench_reference_sweep_gpu.py --d 4096 --n-texts 2000

Output of H200 runs: benchmarks/results/eigh_gpu/h200_reference_sweep_profile.txt (before the Cholesky
whitening of C0), h200_reference_sweep_profile_cholesky.txt (with it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eigh_gpu import sync  # noqa: E402

from ntps_nb.core.backends import torch as backend  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402


def clock(fn, device: torch.device, repeats: int = 3):
    """The best of ``repeats`` timings of ``fn`` (the device synchronised around each), and its result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--tokens-per-text", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    d, N, C, T = args.d, args.n_texts, args.classes, args.tokens_per_text
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(N, d, device=device, dtype=torch.float64, generator=g)
    H = torch.randn(T * N, d, device=device, dtype=torch.float64, generator=g)
    H_next = H + 0.3 * torch.randn(T * N, d, device=device, dtype=torch.float64, generator=g)
    Y = torch.nn.functional.one_hot(torch.randint(0, C, (N,), device=device, generator=g), C).double()
    m = Moments(Sxx=(X.T @ X / N).cpu().numpy(), Sxy=(X.T @ Y / N).cpu().numpy(), Syy=(Y.T @ Y / N).cpu().numpy(),
                C0=(H.T @ H / N).cpu().numpy(), C1=(H.T @ H_next / N).cpu().numpy(), n_texts=N, n_tokens=T * N)
    for name in ("Sxx", "Sxy", "C0", "C1"):  # resident, as the study keeps an extraction's moments
        backend.keep_resident(getattr(m, name), torch.tensor(np.array(getattr(m, name)), device=device))
    say = lambda label, t: print(f"{label} {t:.3g}", flush=True)  # noqa: E731
    print(f"d = {d}, N = {N}, C = {C}, device {device}; seconds, best of 3", flush=True)
    say("reference sweep", clock(lambda: backend.ntps_sweep_torch(m, variant="reference", device=device), device)[0])
    say("theory sweep", clock(lambda: backend.ntps_sweep_torch(m, device=device), device)[0])
    say("reference_geometry_torch", clock(lambda: backend.reference_geometry_torch(m, device=device), device)[0])
    f32 = torch.float32
    Sxx = torch.as_tensor(m.Sxx, device=device, dtype=f32)
    Sxy = torch.as_tensor(m.Sxy, device=device, dtype=f32)
    C1 = torch.as_tensor(m.C1, device=device, dtype=f32)
    say("host->device one matrix float32", clock(lambda: torch.as_tensor(m.C1, device=device, dtype=f32), device)[0])
    say("eigh f32", clock(lambda: torch.linalg.eigh(Sxx), device)[0])
    say("eigh f64", clock(lambda: torch.linalg.eigh(Sxx.double()), device)[0])
    t, U = clock(lambda: backend.generalized_eigh_torch(m.Sxx, A=Sxy @ Sxy.T, order="ascending", tol=1e-8, dtype=f32,
                                                         device=device, name="Sxx").vectors, device)
    say("generalized U", t)
    t, V_eigh = clock(lambda: backend.generalized_eigh_torch(m.C0, A=C1 @ C1.T, order="ascending", tol=1e-8, dtype=f32,
                                                         device=device, name="C0").vectors, device)
    say("generalized V, eigh whitening (before)", t)
    C0 = torch.as_tensor(m.C0, device=device, dtype=f32)
    say("C0 certified full rank (float32): ", float(backend._certified_cholesky(C0[None], 1e-8, 1e-10)[1][0]))
    t, (V,) = clock(lambda: backend._ascending_solutions(C0[None], (C1 @ C1.T)[None], 1e-8, cholesky=True), device)
    say("generalized V, Cholesky whitening (the sweep)", t)
    t, (basis, counts) = clock(lambda: backend._nested_basis(V.to(torch.float64), 1e-6), device)
    say("nested basis (QR f64)", t)
    fractions = np.arange(0.05, 1.0, 0.05)
    values = {}
    for name, vectors in (("eigh", V_eigh), ("cholesky", V)):
        nested, nested_counts = backend._nested_basis(vectors.to(torch.float64), 1e-6)
        values[name] = backend._reference_lookup(nested, nested_counts, U[None], fractions)[0]
    say("max |NTPS(eigh whitening of C0) - NTPS(Cholesky)| over the 19 fractions, float32:",
        float(np.nanmax(np.abs(values["eigh"] - values["cholesky"]))))
    U64 = U.double()
    t, projected = clock(lambda: torch.cumsum(torch.cumsum((basis.T @ U64) ** 2, dim=0), dim=1), device)
    say("projected", t)
    say("U, V to host", clock(lambda: (backend._numpy(U), backend._numpy(V)), device)[0])
    say("projected to host", clock(lambda: backend._numpy(projected), device)[0])


if __name__ == "__main__":
    main()
