"""How far apart are the moments and NTPS of one model on the CPU and on a GPU?

A study's units record the device they ran on but not in the config hash, so units computed on a
GPU combine with units computed on a CPU. This measures what that mixing costs: the same model
(a ``:random`` control is built on the CPU from its seed, so both devices hold identical weights;
the printed weights hash shows it) extracts the same texts on each device with the extraction
settings of a study config (``--config``; the default study: all layers, float32 products summed
in float64, max_length 256, drop_bos), then prints per layer the largest difference of Sxx, C0
and C1 relative to the largest entry, and theory NTPS at k = 8 from each.

    python benchmarks/check_device_agreement.py --model gemma3-270m:random --dataset reuters-r8 --n 128

``--texts FILE`` reads {"texts": [...], "labels": [...], "n_classes": C} instead of the dataset
(for a machine without the ``datasets`` package; write it where the dataset loads, with
``--write-texts FILE``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ntps_nb import study
from ntps_nb.core.score import ntps
from ntps_nb.extract import extract
from ntps_nb.models import load_model

MOMENTS = ("Sxx", "C0", "C1")


def _texts(args, cfg: study.StudyConfig) -> tuple[list[str], list[int], int]:
    if args.texts:
        data = json.loads(Path(args.texts).read_text())
        return data["texts"][: args.n], data["labels"][: args.n], data["n_classes"]
    from ntps_nb.datasets import load_dataset

    train = load_dataset(args.dataset, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed)["train"]
    n_classes = len(train.features["label"].names)
    return list(train["text"][: args.n]), [int(y) for y in train["label"][: args.n]], n_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "studies" / "default.toml"),
                        help="study config whose sizes, seed and extraction settings are used")
    parser.add_argument("--model", default="gemma3-270m:random")
    parser.add_argument("--dataset", default="reuters-r8", help="first N texts of the study's train split")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    parser.add_argument("--texts", help="JSON file of texts, labels and n_classes (instead of --dataset)")
    parser.add_argument("--write-texts", help="write the texts JSON for --texts and stop")
    args = parser.parse_args()
    cfg = study.load_config(args.config)
    texts, labels, n_classes = _texts(args, cfg)
    if args.write_texts:
        Path(args.write_texts).write_text(json.dumps({"texts": texts, "labels": labels, "n_classes": n_classes}))
        return
    print(f"texts {len(texts)}, model {args.model}, torch {torch.__version__}")
    runs = {}
    for device in args.devices:
        start = time.perf_counter()
        model, tok, info = load_model(args.model, seed=cfg.seed, device=device)
        layers = list(range(info.n_hidden_states))
        settings = study._extraction_settings(cfg, layers, train=True, pooled=[], shard_layers=[])
        runs[device] = extract(model, tok, (texts, labels), **settings, n_classes=n_classes)
        print(f"{device}: weights {info.weights_sha256[:16]}, {time.perf_counter() - start:.1f} s", flush=True)
        del model
    a_dev, b_dev = args.devices
    worst = dict.fromkeys((*MOMENTS, "ntps"), 0.0)
    print(f"layer  {'  '.join(f'rel_{m:<4}' for m in MOMENTS)}  ntps_k{args.k}_{a_dev}  ntps_k{args.k}_{b_dev}  |diff|")
    for layer in runs[a_dev].moments.layers:
        a, b = runs[a_dev].moments[layer], runs[b_dev].moments[layer]
        rel = {m: float(np.abs(getattr(a, m) - getattr(b, m)).max() / np.abs(getattr(a, m)).max()) for m in MOMENTS}
        score_a, score_b = ntps(a, args.k), ntps(b, args.k)
        for m in MOMENTS:
            worst[m] = max(worst[m], rel[m])
        worst["ntps"] = max(worst["ntps"], abs(score_a - score_b))
        print(f"{layer:5d}  {'  '.join(f'{rel[m]:.1e}  ' for m in MOMENTS)}  {score_a:.6f}  {score_b:.6f}  {abs(score_a - score_b):.1e}")
    print("largest:", ", ".join(f"{key} {value:.2e}" for key, value in worst.items()))


if __name__ == "__main__":
    main()
