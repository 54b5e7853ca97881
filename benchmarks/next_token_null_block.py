"""Where V_k is not unique: the block of (numerically) zero eigenvalues of the next-token problem.

V_k is spanned by the k leading generalized eigenvectors of (C1 C1^T, C0) among C0's r_V retained directions
(`ntps_nb.core.subspaces.next_token_subspace`). Where C1 C1^T has lower rank than C0 retains, the eigenvalues
below the top rank(C1 C1^T) are zero in exact arithmetic: every k inside that block takes some of its
directions, and which ones rounding decides, as classes of equal size decide U_k where the labels are fitted
exactly. This extracts the train split of a study's first unit with the study's layers, length, batch size and
precision (the pooled moments only, no shards; the token products' precision is printed) and prints,
per layer, r_V, the largest eigenvalue mu_1, the eigenvalues at or below r_V x eps x mu_1 (the block;
`ntps_nb.core.score.NEXT_TOKEN_TIE_EPS`) and the last eigenvalues above it, the k
`ntps_nb.core.score.next_token_tied_ks` names, those the warning of `ntps` and `ntps_sweep` names (where the
tie can move NTPS by more than `NEXT_TOKEN_TIE_SPREAD`: `moving_next_token_ties`) with the largest such move,
and
the smallest gap between neighbouring eigenvalues at the other k, against the largest (how far from the rule).
``--texts``, ``--layers`` and ``--model`` replace the study's train size, layers and (first) model.

At the embedding layer (hidden state 0) the block is predicted by the tokenization alone: a pair's prefix sum
is E^T c (c the token counts of the prefix, E the embeddings) and its next state E^T e_b, so C0's rank is that
of the count vectors c and C1's that of sum c e_b^T (prefix counts x next token) where the embeddings of the
tokens met are independent; the script prints both ranks and their difference, the zeros it predicts.

    python benchmarks/next_token_null_block.py studies/ci_unit.toml
    python benchmarks/next_token_null_block.py studies/ci_unit.toml --texts 1024 --layers 0 2 15 22 30
    python benchmarks/next_token_null_block.py studies/ci_unit.toml --model gemma3-270m --layers 0 9 18
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

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
    parser.add_argument("--texts", type=int, help="train texts (default: the study's max_train)")
    parser.add_argument("--layers", type=int, nargs="+", help="hidden states (default: the study's layers)")
    parser.add_argument("--model", help="a model name (default: the study's first)")
    args = parser.parse_args()

    from ntps_nb.core.score import (NEXT_TOKEN_TIE_EPS, InterpolationWarning, integer_ranges, moving_next_token_ties,
                                    next_token_tie_tolerance, next_token_tied_ks, theory_geometry)
    from ntps_nb.extract import as_text_set, extract
    from ntps_nb.models import load_model
    from ntps_nb.study.config import load_config
    from ntps_nb.study.stages import load_unit_dataset, resolve_layers

    overrides = {key: value for key, value in (("max_train", args.texts), ("layers", args.layers),
                                               ("models", [args.model] if args.model else None)) if value}
    cfg = load_config(args.config, **overrides)
    model_name, dataset_name = cfg.units()[0]
    model, tok, info = load_model(model_name)
    ds, _ = load_unit_dataset(cfg, dataset_name)
    layers = resolve_layers(cfg.layers, list(range(info.n_hidden_states)), "layers")
    ex = extract(model, tok, as_text_set(ds["train"]), layers=layers, max_length=cfg.max_length,
                 batch_size=cfg.batch_size, drop_bos=cfg.drop_bos, precision=cfg.precision, progress=False)
    options = "".join(f" --{key} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for key, v in (("texts", args.texts), ("layers", args.layers), ("model", args.model)) if v)
    print(f"$ python benchmarks/next_token_null_block.py {args.config}{options}")
    print(f"{model_name} x {dataset_name}: {ex.moments[layers[0]].n_texts} texts, {ex.moments[layers[0]].n_tokens} "
          f"token pairs, token products {ex.metadata['token_precision']}; zero, and tied: at or below r_V x eps x the "
          f"largest (eps = {NEXT_TOKEN_TIE_EPS:.2g})")
    if 0 in layers:
        r0, r1 = embedding_layer_ranks(tok, as_text_set(ds["train"]).texts, cfg.max_length, cfg.drop_bos)
        print(f"from the tokenization, at the embeddings: rank of the prefixes' token counts {r0}, of (counts x next "
              f"token) {r1}: {r0 - r1} zero eigenvalues at k = {r1 + 1}-{r0} where the embeddings met are independent")
    for layer in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterpolationWarning)
            geometry = theory_geometry(ex.moments[layer])
        eig = geometry.next_token_eigenvalues  # descending, r_V of them
        spread = moving_next_token_ties(geometry)
        tolerance = next_token_tie_tolerance(eig)
        zero = np.flatnonzero(eig <= tolerance)
        tied = np.array(next_token_tied_ks(eig), dtype=int)
        untied = np.setdiff1d(np.arange(1, eig.size), tied)  # k < r_V where mu_k and mu_{k+1} are apart
        nearest = f"{np.min(eig[untied - 1] - eig[untied]) / eig[0]:.1e}" if untied.size else "none"
        said = (f"tied k: {integer_ranges(tied.tolist()) or 'none'}, the warning's: {integer_ranges(spread) or 'none'}"
                + (f" (NTPS can move by up to {max(spread.values()):.2g})" if spread else "")
                + f"; smallest gap at the other k / largest: {nearest} (the tolerance {tolerance / eig[0]:.1e})")
        if zero.size:
            first = int(zero[0]) + 1  # k of the first zero eigenvalue
            above = ", ".join(f"{v / eig[0]:.1e}" for v in eig[max(first - 4, 0):first - 1])
            print(f"layer {layer:2d}: r_V {eig.size}, largest {eig[0]:.3g}; {zero.size} zero eigenvalues at k = "
                  f"{first}-{eig.size} (contiguous: {bool(np.all(np.diff(zero) == 1))}; the largest of them / largest: "
                  f"{np.max(np.abs(eig[zero])) / eig[0]:.1e}); the three before, "
                  f"/ largest: {above}; {said}")
        else:
            print(f"layer {layer:2d}: r_V {eig.size}, largest {eig[0]:.3g}; no zero eigenvalue (smallest / largest "
                  f"{eig[-1] / eig[0]:.1e}); {said}")

if __name__ == "__main__":
    main()
