"""How ill-conditioned is C0 at each layer? The spread of the next-token problem's second moment.

Float32 token products round each batch's C0 to about 6e-8 of its largest entries; where C0's largest
eigenvalue exceeds its smallest by more than 1 / float32 epsilon (8.4e6), the smallest directions are below
that rounding whatever the number of texts. This extracts the texts once with float64 products and prints,
for each layer asked, C0's largest and d-th eigenvalue (descending), their ratio, the share of the trace in the
largest, and the root mean square of the three largest coordinates of the states against the median
coordinate's (a "massive activation": one coordinate far larger than the rest).

    python benchmarks/c0_spectrum_check.py --dataset trec6 --texts 256 --layers 2 15 30
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_rank_check import load_last_layer  # noqa: E402

#: 1 / float32's machine epsilon: a condition number above it leaves C0's smallest eigenvalues to rounding.
FLOAT32_INVERSE_EPS = 1 / np.finfo(np.float32).eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="trec6")
    parser.add_argument("--texts", type=int, default=256, help="train texts (stratified subsample)")
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    from ntps_nb.extract import extract

    model, tok, info, data, last, header = load_last_layer(args.model, args.dataset, args.texts)
    print(f"$ python benchmarks/c0_spectrum_check.py --model {args.model} --dataset {args.dataset} "
          f"--texts {args.texts} --layers {' '.join(map(str, args.layers))}")
    print(f"{header}; float64 products; float32's 1 / eps = {FLOAT32_INVERSE_EPS:.2g}")
    ex = extract(model, tok, data, layers=args.layers, max_length=args.max_length, progress=False,
                 precision="float64")
    d = model.config.hidden_size
    print(f"{ex.moments[args.layers[0]].n_tokens} token pairs ({ex.moments[args.layers[0]].n_tokens / d:.1f} d)")
    print("layer  C0 largest eig  d-th eig  ratio     trace share  rms of 3 largest coordinates / median")
    for layer in args.layers:
        C0 = np.asarray(ex.moments[layer].C0, dtype=np.float64)
        eig = np.sort(np.linalg.eigvalsh(C0))[::-1]  # descending
        rms = np.sqrt(np.diag(C0))
        largest = np.sort(rms)[::-1][:3]
        print(f"{layer:5d}  {eig[0]:14.3g}  {eig[d - 1]:8.3g}  {eig[0] / eig[d - 1]:8.2g}  {eig[0] / eig.sum():11.3f}"
              f"  {', '.join(f'{v:.0f}' for v in largest)} / {np.median(rms):.1f}")


if __name__ == "__main__":
    main()
