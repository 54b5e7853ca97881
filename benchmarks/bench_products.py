"""The moment products alone, per precision, on the same hidden states: time and error.

Besides the package's float64 and float32 products it tries "bf16x3": each float64 factor split
exactly into three bfloat16 pieces whose products run on tensor cores with float32 accumulation
(the 6 largest piece products, float32 partial sums over 512-token chunks added in float64;
"unchunked": one float32 sum per batch). On an H200 (benchmarks/results) it was slower than
float64 when chunked and less precise than float32 when not, so the package does not offer it.

For each batch, one forward pass (untimed) feeds every precision's accumulator, so the errors
against float64 products measure the products only (no second forward). A second float64
extraction end to end measures the floor set by the forward itself: two runs of the same bf16
forward need not give identical states on a GPU (kernels may reduce in a different order), and
no choice of products can be closer to float64 than that floor.

    python benchmarks/bench_products.py --shape llama3-8b --n-texts 256 --out benchmarks/results/x.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_extract import SHAPES, IdTokenizer, random_model, reporter, synchronize, synthetic_texts  # noqa: E402

from ntps_nb.batching import pad_batch, valid_mask as _valid_mask  # noqa: E402
from ntps_nb.extract import _Accumulator, _batches, extract, layer_factors  # noqa: E402
from ntps_nb.models import hidden_states  # noqa: E402


def _forward(model, batch_ids, pad_id, padding_side, device):
    """The extraction's forward pass: padded batch in, every hidden state out."""
    return hidden_states(model, pad_batch(batch_ids, pad_id, padding_side, device))


PRECISIONS = ["float64", "float32", "bf16x3", "bf16x3-unchunked"]


def bf16_pieces(x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    """``x`` (float64) as ``n`` bfloat16 pieces, largest first, by exact float64 subtraction:
    ``x - sum(pieces)`` is at most ~2^-(8n) |x| elementwise (3 pieces: float32-like, 24 bits)."""
    pieces, rest = [], x
    for i in range(n):
        piece = rest.to(torch.bfloat16)
        pieces.append(piece)
        if i + 1 < n:
            rest = rest - piece.to(x.dtype)
    return pieces


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched product of bfloat16 operands with float32 output (and float32 accumulation).

    On CUDA a tensor-core kernel (``out_dtype``); elsewhere the same arithmetic in float32 (a
    product of two bfloat16 numbers is exact in float32): slow, for CPU runs of this script.
    """
    if a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def split_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None, *, symmetric: bool = False,
                  a_pieces: int = 3, b_pieces: int = 3, chunk: int = 512) -> None:
    """``total += a^T b`` (float64, in place) from bfloat16 tensor-core products ("bf16x3").

    Each factor is split into bfloat16 pieces (`bf16_pieces`); the products of pieces whose
    combined size is above ~2^-24 of the leading one are summed: a0 b0 + a0 b1 + a1 b0 + a0 b2 +
    a2 b0 + a1 b1 (pieces of a factor known to be exact in bfloat16, e.g. the states of a bfloat16
    forward, are 1). ``symmetric`` (b is a) adds a0 a0 + 2 a0 a1 + 2 a0 a2 + a1 a1 instead, whose
    symmetric part is a^T a: the caller symmetrises at the end (the accumulator does). All products
    of one chunk of ``chunk`` rows are summed in float32 on the tensor cores, the chunks in float64.
    """
    K = a.shape[0]
    if K == 0:
        return
    pa = bf16_pieces(a, a_pieces)
    if symmetric:
        pairs = [(i, j, 1 if i == j else 2) for i in range(a_pieces) for j in range(i, a_pieces) if i + j <= 2]
        pb = pa
    else:
        pb = bf16_pieces(b, b_pieces)
        pairs = [(i, j, 1) for i in range(a_pieces) for j in range(b_pieces) if i + j <= 2]
    n_chunks = -(-K // chunk)
    pad = n_chunks * chunk - K

    def slabs(parts: list[torch.Tensor]) -> torch.Tensor:  # (n_chunks, len(parts) * chunk, cols)
        x = torch.stack(parts)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(len(parts), n_chunks, chunk, -1).transpose(0, 1).reshape(n_chunks, len(parts) * chunk, -1)

    left = slabs([pa[i] for i, _, _ in pairs])
    right = slabs([pb[j] * w if w != 1 else pb[j] for _, j, w in pairs])  # x2 is exact in bfloat16
    partial = _bmm_float32(left.transpose(1, 2), right)
    total += partial.sum(dim=0, dtype=torch.float64)


def finalised(acc: _Accumulator) -> dict:
    """The sums as moments (Shh formed, symmetric ones symmetrised, divided by N), on the device."""
    acc.finalise_on_device()
    return acc.sums


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    say = reporter(args.out)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"ntps_nb moment products benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  {name}, torch {torch.__version__}")
    model = random_model(args.shape, device, torch.bfloat16)
    spec = SHAPES[args.shape]
    texts, labels = synthetic_texts(args.n_texts, args.min_len, args.max_len, spec["vocab_size"], seed=0)
    ids = [[int(x) for x in t.split()] for t in texts]
    lengths = np.array([len(t) for t in ids])
    say(f"model: random {args.shape} (d={spec['hidden_size']}, {spec['num_hidden_layers']} layers), bf16 forward, "
        f"N={len(ids)} texts, {lengths.sum()} tokens, batch {args.batch_size}")

    n_classes = 4
    accs: dict[str, _Accumulator] = {}
    seconds = {p: 0.0 for p in PRECISIONS}
    batches = _batches(np.arange(len(ids)), lengths, args.batch_size)
    for i, batch in enumerate(batches):
        hidden = _forward(model, [ids[j] for j in batch], 0, "right", device)
        valid = _valid_mask([len(ids[j]) for j in batch], np.zeros(len(batch), int), hidden[0].shape[1], "right", device)
        pair = (valid[:, :-1] & valid[:, 1:]).flatten().nonzero().squeeze(1)
        counts = valid.sum(dim=1, keepdim=True)
        for precision in PRECISIONS:
            split = precision.startswith("bf16x3")
            dtype = torch.float32 if precision == "float32" else torch.float64
            if precision not in accs:
                # split products form Shh directly (the identity needs float64-exact C1): the accumulator
                # of float32 products has that layout; its totals are float64 like every accumulator's
                accs[precision] = _Accumulator(list(range(len(hidden))), hidden[0].shape[-1], n_classes, device, True,
                                               torch.float32 if split else dtype)
            acc = accs[precision]
            acc.n_texts += len(batch)
            synchronize(device)
            start = time.perf_counter()
            y = torch.nn.functional.one_hot(torch.as_tensor(labels[batch], device=device), n_classes).to(dtype)
            for layer, h in enumerate(hidden):
                factors, xbar = layer_factors(h, valid, pair, counts, y, dtype, True, acc.shh_from_identity)
                for key, (a, b) in factors.items():
                    if split and key in ("C0", "C1", "Shh"):  # states of a bfloat16 forward are one piece
                        chunk = a.shape[0] if precision == "bf16x3-unchunked" else 512
                        total = acc.sums[layer][key]
                        if key == "C1":
                            split_product(total, a, b, b_pieces=1, chunk=chunk)
                        else:
                            split_product(total, a, symmetric=True, a_pieces=3 if key == "C0" else 1, chunk=chunk)
                    else:
                        acc.add(layer, key, a, b)
            synchronize(device)
            if i > 0:  # the first batch warms every kernel up
                seconds[precision] += time.perf_counter() - start
        del hidden
    reference = finalised(accs.pop("float64"))
    say(f"products alone, batches 2..{len(batches)} (forward untimed), and their error against float64 products on "
        "the same states (max |diff| / max |float64| over layers, per moment):")
    say(f"  float64            {seconds['float64']:7.2f} s")
    for precision, acc in list(accs.items()):
        errors = {}
        for layer, sums in finalised(acc).items():
            for key, value in sums.items():
                ref = reference[layer][key]
                err = float((value.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
                errors[key] = max(errors.get(key, 0.0), err)
        del accs[precision], acc
        say(f"  {precision:18s} {seconds[precision]:7.2f} s  ({seconds[precision] / seconds['float64']:.2f} x float64)  "
            + "  ".join(f"{k} {v:.1e}" for k, v in sorted(errors.items())))
    del reference
    torch.cuda.empty_cache() if device.type == "cuda" else None

    last = spec["num_hidden_layers"]
    run = dict(batch_size=args.batch_size, max_length=args.max_len, device=device, progress=False, drop_bos=False,
               layers=[0, last], precision="float64")
    tok = IdTokenizer()
    first = extract(model, tok, (texts, labels), **run).moments
    again = extract(model, tok, (texts, labels), **run).moments
    floor = max(float(np.abs(getattr(again[l], n) - v).max() / np.abs(v).max())
                for l in first for n, v in first[l].arrays().items())
    say(f"forward floor: two float64-product extractions of the same texts (layers 0 and {last}): moments max relative "
        f"difference {floor:.1e}")


if __name__ == "__main__":
    main()
