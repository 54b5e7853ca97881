"""Which units of a study form their token products in float64 under precision "float32", and where classes tie.

For every (model, dataset) of a study, from the tokenization alone (no forward pass): the train split's
(prefix, next state) token pairs, the pairs of the smallest part NTPS or its interval reads
(`ntps_nb.extract.fewest_pairs_read` over the study's shards as `extract` deals them), both against d, the token
products' precision that `ntps_nb.extract.token_precision` gives, and the train class counts with the k at which
classes of equal size tie (`ntps_nb.core.score.tied_ks`; they matter where the labels are fitted exactly, N no
more than the rank of Sxx).

    python benchmarks/study_token_pairs.py studies/fast.toml
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a study TOML")
    args = parser.parse_args()

    from ntps_nb.batching import pooling_tokens
    from ntps_nb.core.score import tied_ks
    from ntps_nb.extract import as_text_set, fewest_pairs_read, shard_assignment, token_precision
    from ntps_nb.models import load_model
    from ntps_nb.study.config import load_config
    from ntps_nb.study.stages import load_unit_dataset

    cfg = load_config(args.config)
    print(f"$ python benchmarks/study_token_pairs.py {args.config}")
    print(f"study {cfg.name}: precision {cfg.precision}, shards {cfg.shards or 'none'}, max_length {cfg.max_length}")
    print("model x dataset | texts | pairs (/ d) | smallest part read (/ d) | token products | train class counts "
          "| tied k")
    for model_name in cfg.models:
        model, tok, _ = load_model(model_name)
        d = model.config.hidden_size
        for dataset_name in cfg.datasets:
            text_set = as_text_set(load_unit_dataset(cfg, dataset_name)[0]["train"])
            n = len(text_set.texts)
            _, _, lengths = pooling_tokens(tok, text_set.texts, cfg.max_length, drop_bos=cfg.drop_bos)
            pairs = lengths - 1
            shard_pairs = (np.bincount(shard_assignment(n, cfg.shards, cfg.seed), weights=pairs, minlength=cfg.shards)
                           if cfg.shards else [pairs.sum()])
            fewest = fewest_pairs_read(shard_pairs)
            counts = np.bincount(np.asarray(text_set.labels), minlength=text_set.n_classes)
            print(f"{model_name} x {dataset_name} | {n} | {int(pairs.sum())} ({pairs.sum() / d:.1f}) | {fewest} "
                  f"({fewest / d:.2f}) | {token_precision(cfg.precision, fewest, d)} | {counts.tolist()} | "
                  f"{tied_ks(np.diag(counts / n)) or '-'}")


if __name__ == "__main__":
    main()
