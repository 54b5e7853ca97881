"""The tie rule of the next-token eigenvalues at the paper's widths: how far a hidden layer's smallest
eigengap stays from the tolerance r_V x eps x mu_1 (`ntps_nb.core.score.next_token_tied_ks`) at d = 896
and 4096, where r_V and the spectrum's reach are larger than at SmolLM2's d = 576.

A random-initialised model is built from the real config of each shape (bench_extract.SHAPES: Qwen2-0.5B,
Llama-3-8B; no download); N texts of token ids drawn from a Zipf law over the vocabulary (so that tokens
repeat, as in text; lengths uniform in [--min-len, --max-len]) go through `ntps_nb.extract.extract` (precision
"auto") for the embedding layer and a grid of hidden layers, and the theory geometry of each layer is solved
(on the device, `theory_geometry_torch`, float64). Printed per layer: r_V, the k the rule calls tied, how
far the tie can move NTPS there (`next_token_tie_spread`) and the k the warning names (a move above
`NEXT_TOKEN_TIE_SPREAD`), the eigenvalues at or below the tolerance (zero), the smallest gap between
neighbouring eigenvalues at the other k over mu_1, the tolerance over mu_1 and their ratio (the margin). Random weights are not a trained model's
(no massive activations): the margin at trained layers is what benchmarks/next_token_null_block.py measures.

    python benchmarks/next_token_ties_gpu.py --shapes qwen2-0.5b llama3-8b --texts 1000 4000     (a GPU)
    python benchmarks/next_token_ties_gpu.py --shapes tiny --texts 40 400 --device cpu            (a check, < 1 min)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_extract import SHAPES, IdTokenizer, random_model  # noqa: E402

from ntps_nb.core.backends.torch import theory_geometry_torch  # noqa: E402
from ntps_nb.core.score import (InterpolationWarning, integer_ranges, moving_next_token_ties,  # noqa: E402
                                next_token_tie_spread, next_token_tie_tolerance, next_token_tied_ks)
from ntps_nb.extract import extract  # noqa: E402


def zipf_texts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` texts of token ids 1..vocab-1 drawn from a Zipf law (exponent 1.1), and 4 balanced labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    texts = [" ".join(map(str, np.minimum(rng.zipf(1.1, T), vocab - 1))) for T in lengths]
    return texts, np.arange(n) % 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen2-0.5b", "llama3-8b"])
    parser.add_argument("--texts", type=int, nargs="+", default=[1000, 4000], help="numbers of texts N")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4, help="hidden layers besides the embeddings (evenly spaced)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"$ python benchmarks/next_token_ties_gpu.py {' '.join(sys.argv[1:])}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'host'}); "
          f"torch {torch.__version__}")
    for shape in args.shapes:
        spec = SHAPES[shape]
        d, depth = spec["hidden_size"], spec["num_hidden_layers"]
        layers = sorted({0, *np.linspace(1, depth, args.layers).round().astype(int).tolist()})
        model = random_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        for n in args.texts:
            texts, labels = zipf_texts(n, args.min_len, args.max_len, spec["vocab_size"], seed=n)
            start = time.perf_counter()
            ex = extract(model, IdTokenizer(), (texts, labels), layers=layers, batch_size=args.batch_size,
                         max_length=args.max_len, drop_bos=False, device=device, progress=False, token_moments=False)
            print(f"\n{shape} (d = {d}): N = {n} texts, {ex.moments[0].n_tokens} token pairs "
                  f"({ex.moments[0].n_tokens / d:.1f} d), token products {ex.metadata['token_precision']}, "
                  f"extracted in {time.perf_counter() - start:.0f} s")
            for layer in layers:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InterpolationWarning)
                    geometry = theory_geometry_torch(ex.moments[layer], device=device)
                mu = np.sort(np.asarray(geometry.next_token_eigenvalues, dtype=np.float64))[::-1]
                spread = next_token_tie_spread(geometry)
                said = moving_next_token_ties(geometry)
                tolerance = next_token_tie_tolerance(mu) / mu[0]  # over mu_1
                tied = next_token_tied_ks(mu)
                zero = int(np.count_nonzero(mu <= tolerance * mu[0]))
                gaps = (mu[:-1] - mu[1:]) / mu[0]  # gaps[k - 1] = (mu_k - mu_{k+1}) / mu_1
                gaps[np.array(tied, dtype=int) - 1] = np.inf  # the other k
                at = int(np.argmin(gaps)) + 1
                moves = f" (NTPS moves by up to {max(spread.values()):.1e})" if spread else ""
                print(f"  layer {layer:2d}: r_V {mu.size:4d}; tied k {integer_ranges(tied) or 'none'}{moves}, "
                      f"the warning's {integer_ranges(said) or 'none'}; {zero} zero; "
                      f"smallest gap elsewhere / mu_1 {gaps[at - 1]:.1e} at k = {at}; "
                      f"tolerance / mu_1 {tolerance:.1e}; "
                      f"margin {gaps[at - 1] / tolerance:.0f}; smallest eigenvalue / mu_1 {mu[-1] / mu[0]:.1e}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
