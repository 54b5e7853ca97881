"""Device -> host copies of finalised moments: where extraction's fixed per-pass cost goes.

An extraction of every layer ends by bringing n float64 d x d matrices to the host (for the
Llama-3-8B shape, 33 layers x 4 moments x 134 MB = 17.7 GB) and wrapping them as `Moments`.
This times, side by side on the same matrices:

  (1) ``tensor.cpu().numpy()``: pageable copy into fresh host memory (what extraction does);
  (2) the same copy into host memory already touched once (isolates first-touch page faults);
  (3) through a reusable pinned staging buffer into fresh numpy arrays (one-threaded memcpy);
  (4) what extraction does: `ntps_nb.extract._Staging` (pinned chunks, then torch's
      multi-threaded copy into fresh host memory);
  (5) ``Moments`` construction on the host arrays (finiteness and symmetry checks).

    python benchmarks/bench_host_copy.py --d 4096 --n 132
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ntps_nb.core.moments import Moments
from ntps_nb.extract import _Staging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--n", type=int, default=132, help="matrices (layers x moments)")
    args = parser.parse_args()
    device = torch.device("cuda")
    d, n = args.d, args.n
    gib = n * d * d * 8 / 2**30
    x = torch.randn(256, d, dtype=torch.float64, device=device)
    sym = x.T @ x
    mats = [sym.clone() for _ in range(n)]
    torch.cuda.synchronize()
    print(f"{n} float64 {d} x {d} matrices, {gib:.1f} GiB, {torch.cuda.get_device_name(device)}")

    def timed(label, fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{label:58s} {seconds:7.2f} s  {gib / seconds:6.1f} GiB/s", flush=True)
        return out

    hosts = timed("(1) .cpu().numpy(), fresh host memory", lambda: [m.cpu().numpy() for m in mats])
    targets = [torch.from_numpy(h) for h in hosts]
    timed("(2) copy_ into host memory touched before", lambda: [t.copy_(m) for t, m in zip(targets, mats)])
    del targets

    def staged():
        stage = [torch.empty(d * d, dtype=torch.float64, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        out = []
        for i, m in enumerate(mats):
            slot = i % 2
            stage[slot].copy_(m.reshape(-1), non_blocking=True)
            events[slot].record()
            events[slot].synchronize()
            host = np.empty((d, d))
            host.reshape(-1)[:] = stage[slot].numpy()
            out.append(host)
        return out

    timed("(3) pinned staging buffer (2 x one matrix) -> fresh numpy", staged)
    staging = _Staging()
    hosts = timed(f"(4) _Staging (pinned chunks, {torch.get_num_threads()} copy threads), fresh host memory",
                  lambda: [staging.to_host(m) for m in mats])
    y = np.zeros((d, 3))
    y[0, 0] = 1.0
    timed("(5) Moments(...) on the host arrays of (4)", lambda: [
        Moments(Sxx=hosts[i], Sxy=y, Syy=np.diag([1.0, 0, 0]), C0=hosts[i + 1], C1=hosts[i + 2], Shh=hosts[i + 3],
                n_texts=1, n_tokens=1)
        for i in range(0, n - 3, 4)])


if __name__ == "__main__":
    main()
