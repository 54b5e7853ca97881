"""Which float32 products move NTPS where texts are few: the token products (C0, C1) or the rest?

`ntps_nb.extract.extract(precision="float32")` forms the token products C0 and C1 in float32 (summed into
float64 totals) and the text products Sxx and Sxy in float64 (`ntps_nb.extract.TEXT_PRODUCTS`). This
extracts the same texts with float32 and with float64 products on this machine's CPU and, for the pooled
moments of the first 1, 2, 3, ... of the extraction's shards, prints the token pairs against d, the
retained rank of C0 (the next-token problem's r_V) both ways beside the number of distinct token prefixes
among the pairs (C0's rank in exact arithmetic where the states are in general position: identical
prefixes give identical prefix vectors), and the largest |difference| of the theory plug-in NTPS over
k = 1..K from the float64 extraction's, with:

- the float32 extraction's C0 and C1 put into the float64 moments (the token products alone);
- the float32 extraction's other arrays (Sxx, Sxy, x_mean: the pooled states, formed from float32 states
  before their float64 products) put into them instead;
- the whole float32 extraction;

and the k at which classes of equal size tie where the labels are fitted exactly (`tied_ks`). With
``--batch-size-check B`` a third extraction, float64 products with B texts a forward pass instead of 16,
adds the difference that the forward pass's own rounding makes.

Since extraction version 3, "float32" forms the token products of a pass of at most
`ntps_nb.extract.FLOAT64_TOKEN_PAIRS_PER_DIM` x d pairs in float64 too: the subsets of a larger pass
(``--texts 1024``) show what float32 token products do to few texts, and a pass that small
(``--texts 64``) now compares equal (benchmarks/results/precision/token_products_trec6_64_extract_v3.txt).

    python benchmarks/token_products_check.py --dataset trec6 --texts 1024 --shards 32

``--layer`` compares another hidden state than the last, ``--model`` another model: the 4 d threshold was
measured on SmolLM2's last layer first (token_products_*_layer*.txt, token_products_gemma*.txt: the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_rank_check import extract_both, load_last_layer  # noqa: E402

from ntps_nb.core.intervals import layer_shards, theory_values  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.score import InterpolationWarning, theory_geometry, tied_ks  # noqa: E402

#: The arrays a float32 extraction forms from its token products, and the others.
TOKEN_ARRAYS = ("C0", "C1")
TEXT_ARRAYS = ("Sxx", "Sxy", "x_mean")
#: Pooled subsets: the first n shards for n in this list (those up to the extraction's shards).
SUBSET_SHARDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def largest_difference(reference: Moments, other: Moments, ks: np.ndarray) -> float:
    """max over ``ks`` of |theory plug-in NTPS of ``other`` - of ``reference``|."""
    return float(np.nanmax(np.abs(theory_values(theory_geometry(other), ks)
                                  - theory_values(theory_geometry(reference), ks))))


def distinct_prefixes(tok, texts, shard_of: np.ndarray, kept: int, max_length: int) -> int:
    """Distinct token prefixes among the (prefix, next state) pairs of the texts in shards 0..kept-1."""
    from ntps_nb.batching import pooling_tokens

    ids, starts, lengths = pooling_tokens(tok, texts, max_length, drop_bos=True)
    return len({tuple(ids[i][:starts[i] + j + 1]) for i in np.flatnonzero(shard_of < kept)
                for j in range(lengths[i] - 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="trec6")
    parser.add_argument("--texts", type=int, default=1024, help="train texts (stratified subsample)")
    parser.add_argument("--shards", type=int, default=32, help="shards of the extraction")
    parser.add_argument("--max-k", type=int, default=32, help="NTPS compared at k = 1..max-k")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--layer", type=int, default=None, help="hidden state compared (default: the last)")
    parser.add_argument("--batch-size-check", type=int, default=0,
                        help="also extract with float64 products at this batch size (0: not)")
    args = parser.parse_args()

    from ntps_nb.core.score import next_token_subspace
    from ntps_nb.extract import extract, shard_assignment

    start = time.time()
    model, tok, info, data, last, header = load_last_layer(args.model, args.dataset, args.texts)
    layer = last if args.layer is None else args.layer
    if layer != last:
        header = header.replace(f"last layer {last}", f"layer {layer} (of 0..{last})")
    print(f"{header}; theory plug-in at k = 1..{args.max_k}")
    shards = extract_both(model, tok, data, layer, max_length=args.max_length, shards=args.shards)
    if args.batch_size_check:
        ex = extract(model, tok, data, layers=[layer], max_length=args.max_length, shards=args.shards,
                     shard_layers=[layer], progress=False, precision="float64", batch_size=args.batch_size_check)
        shards["batch"] = layer_shards(ex.shards)[layer]
    print(f"{len(shards)} extractions: {time.time() - start:.0f} s")
    shard_of = shard_assignment(len(data), args.shards)
    batch = f" / float64 at batch {args.batch_size_check}" if args.batch_size_check else ""
    print(f"texts  pairs (/ d)  prefixes  r_V f64 / f32   float32 C0, C1 alone / Sxx, Sxy, x_mean alone / whole{batch}"
          "  tied k")
    for n in (n for n in SUBSET_SHARDS if n <= args.shards):
        exact, rounded = (Moments.combine(shards[p][:n]) for p in ("float64", "float32"))
        ks = np.arange(1, args.max_k + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            token = dataclasses.replace(exact, **{a: getattr(rounded, a) for a in TOKEN_ARRAYS})
            text = dataclasses.replace(exact, **{a: getattr(rounded, a) for a in TEXT_ARRAYS})
            parts = [token, text, rounded] + ([Moments.combine(shards["batch"][:n])] if args.batch_size_check else [])
            diffs = " / ".join(f"{largest_difference(exact, part, ks):.1e}" for part in parts)
        ranks = [next_token_subspace(m).rank_B for m in (exact, rounded)]
        prefixes = distinct_prefixes(tok, list(data["text"]), shard_of, n, args.max_length)
        print(f"{exact.n_texts:5d} {exact.n_tokens:6d} ({exact.n_tokens / exact.d:4.1f})  {prefixes:8d}  "
              f"{ranks[0]:4d} / {ranks[1]:4d}      {diffs}   {tied_ks(exact.Syy) or '-'}", flush=True)


if __name__ == "__main__":
    main()
