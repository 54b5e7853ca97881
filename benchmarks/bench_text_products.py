"""What forming Sxx and Sxy in float64 costs under precision "float32" (extraction version 2), side by side.

`ntps_nb.extract.TEXT_PRODUCTS`: since extraction version 2 the products of one pooled vector a text are
float64 whatever the precision, which keeps Sxx's retained rank at most the number of texts. This times
`extract(precision="float32")` as it is (version 2) against the same extraction with those products in
float32 (version 1, by substituting the per-batch factors), alternating the two over ``--repeats`` rounds
on the same texts, and prints the median seconds, their ratio and the retained rank of each version's
Sxx at the last hidden state against the number of texts.

The extra work is d^2 a text against the token products' d^2 a token, so it is largest for short texts;
on GPUs whose float64 runs at a small fraction of float32 (most consumer parts, where "auto" resolves to
float32) it costs more than on a CPU, where it was measured (`benchmarks/results/precision/text_products_*`).

    python benchmarks/bench_text_products.py --real smollm2-135m --dataset trec6 --n-texts 64   # CPU, real model
    python benchmarks/bench_text_products.py --shape qwen2-0.5b --n-texts 512 --min-len 8 --max-len 48   # GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_extract import (IdTokenizer, add_model_arguments, random_model, reporter, synchronize,  # noqa: E402
                           synthetic_texts)

import ntps_nb.extract as extraction  # noqa: E402
from ntps_nb.core.score import InterpolationWarning, theory_geometry  # noqa: E402

_VERSION_2_FACTORS = extraction.layer_factors


def _version_1_factors(h, valid, pair_rows, counts, y, compute_dtype, token_moments, shh_from_identity=False):
    """The per-batch factors of extraction version 1: Sxx and Sxy in the token products' precision."""
    factors, xbar = _VERSION_2_FACTORS(h, valid, pair_rows, counts, y, compute_dtype, token_moments,
                                       shh_from_identity)
    factors["Sxx"] = (xbar, xbar)
    factors["Sxy"] = (xbar, y)
    return factors, xbar


def _run(version: int, model, tokenizer, data, args, device):
    extraction.layer_factors = _VERSION_2_FACTORS if version == 2 else _version_1_factors
    try:
        synchronize(device)
        start = time.perf_counter()
        result = extraction.extract(model, tokenizer, data, batch_size=args.batch_size, max_length=args.max_len,
                                    device=device, progress=False, precision="float32")
        synchronize(device)
        return time.perf_counter() - start, result
    finally:
        extraction.layer_factors = _VERSION_2_FACTORS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--min-len", type=int, default=8, help="random shapes: shortest text in tokens")
    parser.add_argument("--max-len", type=int, default=64, help="longest text in tokens (truncation for --real)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    say = reporter(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    say(f"text products in float64 (extraction version 2) against float32 (version 1), precision float32  "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(f"device: {name} ({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.real:
        from ntps_nb.datasets import load_dataset
        from ntps_nb.models import load_model

        model, tokenizer, _ = load_model(args.real, device=device)
        columns = load_dataset(args.dataset, max_train=args.n_texts)["train"][:]
        data = (columns["text"], np.asarray(columns["label"]))
        what = f"{args.real} on {args.dataset}"
    else:
        model = random_model(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = IdTokenizer()
        data = synthetic_texts(args.n_texts, args.min_len, args.max_len, model.config.vocab_size, seed=0)
        what = f"random {args.shape}"
    say(f"{what}: {args.n_texts} texts, d = {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
        f"batch {args.batch_size}, max_len {args.max_len}; {args.repeats} alternating rounds")
    seconds = {1: [], 2: []}
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolationWarning)
        _run(2, model, tokenizer, data, args, device)  # warm-up: kernels, allocator
        for _ in range(args.repeats):
            for version in (1, 2):
                spent, results[version] = _run(version, model, tokenizer, data, args, device)
                seconds[version].append(spent)
    last = max(results[2].moments.layers)
    n = results[2].moments[last].n_texts
    for version in (1, 2):
        rank = theory_geometry(results[version].moments[last]).r_U
        say(f"  version {version}: median {statistics.median(seconds[version]):.2f} s "
            f"({', '.join(f'{s:.2f}' for s in seconds[version])}); rank(Sxx) at layer {last}: {rank} for {n} texts")
    mean_length = float(results[2].lengths.mean())
    say(f"  version 2 / version 1: {statistics.median(seconds[2]) / statistics.median(seconds[1]):.3f} "
        f"(mean length {mean_length:.1f} tokens)")


if __name__ == "__main__":
    main()
