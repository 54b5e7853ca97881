"""Does the extraction's product precision change NTPS below N = d? float32 against float64 products.

`ntps_nb.extract.extract(precision=...)`: "float32" forms each batch's products in float32 and sums them
into float64 totals (the study's default, and "auto"'s on a GPU); "float64" forms them in float64
("auto"'s on a CPU). Below N = d the pooled Sxx has rank N in exact arithmetic; float32 products
left eigenvalues of rounding size above the range tolerance (`RANGE_RTOL`), retained as directions,
until extraction version 2 formed the text-level products (Sxx, Sxy) in float64 under either precision
(`ntps_nb.extract.TEXT_PRODUCTS`). Where the retained rank reaches the texts the labels are fitted
exactly and classes of equal size are tied, an order rounding decides: the class counts are printed.
This extracts the same texts both ways on this machine's CPU and prints, for nested subsets of the
fine shards (the first G, 2G, ... regrouped into G shards, as `real_data_drift.py`), the retained rank
of Sxx both ways and the largest differences of the default estimate and of its interval's lower bound.

    python benchmarks/precision_rank_check.py --dataset trec6 --texts 512 --shards 16 --groups 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data_drift import nested_subsets  # noqa: E402

from ntps_nb.core.estimators import ntps_estimate  # noqa: E402
from ntps_nb.core.intervals import layer_shards  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.score import InterpolationWarning, theory_geometry  # noqa: E402


def load_last_layer(model_name: str, dataset: str, texts: int):
    """The model on the CPU (one torch thread), ``texts`` train texts of ``dataset`` and a line naming them.

    Parameters
    ----------
    model_name, dataset : registry names (`ntps_nb.models.load_model`, `ntps_nb.datasets.load_dataset`).
    texts : train texts (stratified subsample).

    Returns
    -------
    (model, tokenizer, info, data, last layer, header line).
    """
    import torch

    from ntps_nb.datasets import load_dataset
    from ntps_nb.models import load_model

    torch.set_num_threads(1)
    model, tok, info = load_model(model_name, device="cpu")
    data = load_dataset(dataset, max_train=texts, max_test=10)["train"]
    last = model.config.num_hidden_layers
    header = (f"{model_name} (weights sha256 {info.weights_sha256[:12]}), {dataset}, {len(data)} texts, last layer "
              f"{last}, d = {model.config.hidden_size}")
    return model, tok, info, data, last, header


def extract_both(model, tok, data, layer: int, *, max_length: int, shards: int) -> dict[str, list[Moments]]:
    """The per-shard moments of ``layer`` from extractions with float64 and with float32 products.

    Parameters
    ----------
    model, tok : the causal LM and its tokenizer (on the CPU).
    data : the texts (`ntps_nb.datasets.load_dataset`'s split).
    layer : the layer whose shards are kept.
    max_length : tokens a text.
    shards : shards of the extraction.

    Returns
    -------
    dict precision -> list of the shards' `Moments`, in shard order.
    """
    from ntps_nb.extract import extract

    out = {}
    for precision in ("float64", "float32"):
        ex = extract(model, tok, data, layers=[layer], max_length=max_length, shards=shards,
                     shard_layers=[layer], progress=False, precision=precision)
        out[precision] = layer_shards(ex.shards)[layer]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="trec6")
    parser.add_argument("--texts", type=int, default=512, help="train texts (stratified subsample)")
    parser.add_argument("--shards", type=int, default=16, help="fine shards of the extraction")
    parser.add_argument("--groups", type=int, default=4, help="shards of each nested subset")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    start = time.time()
    model, tok, info, data, last, header = load_last_layer(args.model, args.dataset, args.texts)
    print(f"{header}; k = {args.ks}, richardson, rotation condition off")
    shards = extract_both(model, tok, data, last, max_length=args.max_length, shards=args.shards)
    print(f"two extractions: {time.time() - start:.0f} s")
    subsets = {p: list(nested_subsets(s, args.groups)) for p, s in shards.items()}
    for (n_fine, exact), (_, rounded) in zip(subsets["float64"], subsets["float32"]):
        ranks = [theory_geometry(Moments.combine(part)).r_U for part in (exact, rounded)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            a, b = (ntps_estimate(part, args.ks, rotation_flag=False, interval="jackknife") for part in (exact, rounded))
        texts = int(a["n_texts"].iloc[0])
        counts = np.rint(np.diag(Moments.combine(exact).Syy) * texts).astype(int)
        tied = len(counts) - len(set(counts.tolist()))
        print(f"  {texts:5d} texts: rank(Sxx) float64 {ranks[0]}, float32 {ranks[1]}; largest |difference| of the "
              f"estimate {np.nanmax(np.abs(a['estimate'] - b['estimate'])):.1e}, of the lower bound "
              f"{np.nanmax(np.abs(a['lower'] - b['lower'])):.1e}; class counts {counts.tolist()}"
              + (f", {tied} tied (rounding orders them where the labels are fitted exactly)" if tied else ""),
              flush=True)


if __name__ == "__main__":
    main()
