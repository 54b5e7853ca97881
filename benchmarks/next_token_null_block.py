"""Where V_k is not unique: the block of (numerically) zero eigenvalues of the next-token problem.

V_k is spanned by the k leading generalized eigenvectors of (C1 C1^T, C0) among C0's r_V retained directions
(`ntps_nb.core.subspaces.next_token_subspace`). Where C1 C1^T has lower rank than C0 retains, the eigenvalues
below the top rank(C1 C1^T) are zero in exact arithmetic: every k inside that block takes some of its
directions, and which ones rounding decides, as classes of equal size decide U_k where the labels are fitted
exactly. This extracts the train split of a study's first unit with the study's layers, length, batch size and
precision (the pooled moments only, no shards; the token products' precision is printed) and prints,
per layer, r_V, the largest eigenvalue, the eigenvalues below `NULL_RTOL` times it (the block, and the k it
spans) and the last eigenvalues above it.

At the embedding layer (hidden state 0) the block is predicted by the tokenization alone: a pair's prefix sum
is E^T c (c the token counts of the prefix, E the embeddings) and its next state E^T e_b, so C0's rank is that
of the count vectors c and C1's that of sum c e_b^T (prefix counts x next token) where the embeddings of the
tokens met are independent; the script prints both ranks and their difference, the zeros it predicts.

    python benchmarks/next_token_null_block.py studies/ci_unit.toml
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

#: Eigenvalues below this times the largest count as zero (float64 rounding of the generalized problem is
#: ~1e-16 relative; in ci_unit's layer 0 the block sits at 3e-17 and below, the eigenvalue before it at 3.7e-7).
NULL_RTOL = 1e-12


def embedding_layer_ranks(tok, texts, max_length: int, drop_bos: bool) -> tuple[int, int]:
    """Ranks of the prefixes' token-count vectors and of (prefix counts x next token), from the tokenization."""
    from ntps_nb.batching import pooling_tokens

    ids, starts, lengths = pooling_tokens(tok, texts, max_length, drop_bos=drop_bos)
    tokens = sorted({t for i in range(len(ids)) for t in ids[i][starts[i]:starts[i] + lengths[i]]})
    column = {t: j for j, t in enumerate(tokens)}
    counts, following = [], []
    for i in range(len(ids)):
        c = np.zeros(len(tokens))
        for j in range(lengths[i] - 1):
            c[column[ids[i][starts[i] + j]]] += 1
            counts.append(c.copy())
            following.append(column[ids[i][starts[i] + j + 1]])
    counts = np.array(counts)
    nexts = np.zeros_like(counts)
    nexts[np.arange(len(following)), following] = 1
    return int(np.linalg.matrix_rank(counts)), int(np.linalg.matrix_rank(counts.T @ nexts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a study TOML (its first model and dataset)")
    args = parser.parse_args()

    from ntps_nb.core.score import InterpolationWarning, theory_geometry
    from ntps_nb.extract import as_text_set, extract
    from ntps_nb.models import load_model
    from ntps_nb.study.config import load_config
    from ntps_nb.study.stages import load_unit_dataset, resolve_layers

    cfg = load_config(args.config)
    model_name, dataset_name = cfg.units()[0]
    model, tok, info = load_model(model_name)
    ds, _ = load_unit_dataset(cfg, dataset_name)
    layers = resolve_layers(cfg.layers, list(range(info.n_hidden_states)), "layers")
    ex = extract(model, tok, as_text_set(ds["train"]), layers=layers, max_length=cfg.max_length,
                 batch_size=cfg.batch_size, drop_bos=cfg.drop_bos, precision=cfg.precision, progress=False)
    print(f"$ python benchmarks/next_token_null_block.py {args.config}")
    print(f"{model_name} x {dataset_name}: {ex.moments[layers[0]].n_texts} texts, {ex.moments[layers[0]].n_tokens} "
          f"token pairs, token products {ex.metadata['token_precision']}; zero: below {NULL_RTOL:g} x the largest")
    if 0 in layers:
        r0, r1 = embedding_layer_ranks(tok, as_text_set(ds["train"]).texts, cfg.max_length, cfg.drop_bos)
        print(f"from the tokenization, at the embeddings: rank of the prefixes' token counts {r0}, of (counts x next "
              f"token) {r1}: {r0 - r1} zero eigenvalues at k = {r1 + 1}-{r0} where the embeddings met are independent")
    for layer in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            eig = theory_geometry(ex.moments[layer]).next_token_eigenvalues  # descending, r_V of them
        zero = np.flatnonzero(np.abs(eig) < NULL_RTOL * eig[0])
        if zero.size:
            first = int(zero[0]) + 1  # k of the first zero eigenvalue
            above = ", ".join(f"{v / eig[0]:.1e}" for v in eig[max(first - 4, 0):first - 1])
            print(f"layer {layer:2d}: r_V {eig.size}, largest {eig[0]:.3g}; {zero.size} zero eigenvalues at k = "
                  f"{first}-{eig.size} (contiguous: {bool(np.all(np.diff(zero) == 1))}); the three before, "
                  f"/ largest: {above}")
        else:
            print(f"layer {layer:2d}: r_V {eig.size}, largest {eig[0]:.3g}; no zero eigenvalue (smallest / largest "
                  f"{eig[-1] / eig[0]:.1e})")


if __name__ == "__main__":
    main()
