"""Float32 token products where C0 is rank deficient: what their rounding does to the next-token problem, and
whether the extraction's check (`ntps_nb.extract.token_rounding`) finds those layers and passes them again with
float64 products (`extract(float64_where_rounded=True)`, the default).

Precision "float32" (a study's default, and "auto" on GPUs without full-rate float64) forms C0 and C1 from
float32 products of the token states once a pass has more than `FLOAT64_TOKEN_PAIRS_PER_DIM` x d pairs. That
threshold assumes that many pairs give C0 full rank. At the embedding layer C0's rank is at most the number of
distinct tokens met (a prefix sum of embeddings is E^T c, c its token counts), which can stay below d however many
pairs there are; there the products' rounding, a symmetric error spread about zero, shows as negative eigenvalues
of C0 and as positive ones in its null directions, which the range tolerance keeps as directions of V.

Part 1, a random Llama-shaped model (bench_extract: "tiny", d = 64, and a one-layer d = 576 shape) whose texts
take their first token from ``first`` ids and the others from ``later`` more, at its embedding layer, float32
products kept (``float64_where_rounded=False``) against float64 products: the float64 rank of C0, the directions
the float32 C0 retains, the largest positive rounding eigenvalue over the magnitude of the most negative one (what
`token_rounding`'s docstring cites), the reach the check reports, whether the default pass forms the layer again
in float64 and its next-token rank then, and the largest |NTPS float32 - NTPS float64| at the
k both retain, at the k where float64 V_k is determined (untied, `next_token_tied_ks`) and at all of them, and
whether each sweep warns of the tie (`NextTokenTieWarning`).

Part 2, pretrained SmolLM2 on offline datasets under the study's float32 products: the reach per layer, the layers
the default pass forms again in float64, and the next-token rank r_V from float32 products kept, from the default
pass and from float64 products.

Part 4 (printed before part 3), what the check cannot see: C0 only one to five directions short of full rank (texts of
63 to 59 distinct tokens at d = 64, 600 texts, ten draws each), where the rounding of the few null directions can
come out positive with no negative eigenvalue to show it: how many draws' float32 C0 retains more directions than
the float64 one, in how many of those the check finds the layer, and in those draws how far NTPS moves at the k
below C0's rank where V_k is determined and how small the last next-token eigenvalue (a rounding direction's) is.

Part 3, the check's cost on this machine's CPU: `token_rounding` of a positive definite C0 (one Cholesky) and of
one with an eigenvalue at -1e-8 of the largest (the Cholesky fails; the eigenvalues follow), at d = 576 and 4096.

    python benchmarks/token_rounding_check.py            (about 5 minutes on 2 cores)
    python benchmarks/token_rounding_check.py --part 1   (seconds)
    python benchmarks/token_rounding_check.py --part 2 --model gemma3-270m --layers 0 2 9 18
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_extract  # noqa: E402
from bench_extract import IdTokenizer, random_model  # noqa: E402

from ntps_nb.core.score import (InterpolationWarning, NextTokenTieWarning, integer_ranges,  # noqa: E402
                                next_token_tied_ks, ntps_sweep, theory_geometry)
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.extract import extract, token_rounding  # noqa: E402

#: A one-layer model of SmolLM2's width (d = 576) for part 1.
WIDE = dict(arch="llama", hidden_size=576, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=256, vocab_size=2000)
#: (shape, first-token ids, later-token ids, texts, batch size) of part 1.
PART1 = [("tiny", 10, 4, 400, 32), ("tiny", 30, 20, 800, 8), ("tiny", 40, 10, 2000, 64),
         ("wide576", 100, 200, 800, 16), ("wide576", 200, 300, 1500, 32), ("wide576", 50, 50, 3000, 8)]
#: (dataset, texts, max_length, layers) of part 2.
PART2 = [("trec6", 1024, 32, [0, 2, 15, 22, 30]), ("rt-polarity", 120, 64, [0, 2, 15, 30]),
         ("20ng", 12, 512, [0, 2, 15, 30])]


def sweep(moments):
    """The theory geometry, NTPS at every k, and whether the sweep warned of tied next-token eigenvalues."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", InterpolationWarning)
        warnings.simplefilter("always", NextTokenTieWarning)
        result = theory_geometry(moments), ntps_sweep(moments).set_index("k")["ntps"]
    return (*result, any(w.category is NextTokenTieWarning for w in caught))


def part1() -> None:
    print("part 1: a random model's embedding layer, texts of few distinct tokens; float32 against float64 products")
    bench_extract.SHAPES["wide576"] = WIDE
    torch.set_num_threads(1)
    for shape, first, later, n, batch in PART1:
        model = random_model(shape, torch.device("cpu"), torch.float32)
        rng = np.random.default_rng(0)
        texts = [" ".join(map(str, [rng.integers(1, first + 1)]
                              + list(rng.integers(first + 1, first + later + 1, rng.integers(3, 20)))))
                 for _ in range(n)]
        labels = rng.integers(0, 3, n)
        run = dict(layers=[0], batch_size=batch, max_length=64, drop_bos=False, device="cpu", progress=False,
                   token_moments=False)
        e32 = extract(model, IdTokenizer(), (texts, labels), precision="float32", float64_where_rounded=False, **run)
        fixed = extract(model, IdTokenizer(), (texts, labels), precision="float32", **run)
        e64 = extract(model, IdTokenizer(), (texts, labels), precision="float64", **run)
        m32, m64 = e32.moments[0], e64.moments[0]
        s32, s64 = np.linalg.eigvalsh(m32.C0)[::-1], np.linalg.eigvalsh(m64.C0)[::-1]
        rank = int((s64 > RANGE_RTOL * s64[0]).sum())
        kept = int((s32 > RANGE_RTOL * s32[0]).sum())
        spurious = s32[rank:]  # the float32 eigenvalues in the float64 C0's null directions
        g64, n64, said64 = sweep(m64)
        _, n32, said32 = sweep(m32)
        both = n64.index.intersection(n32.index)
        tied = set(next_token_tied_ks(g64.next_token_eigenvalues))
        untied = [k for k in both if k not in tied]
        moved = (n32[both] - n64[both]).abs()
        print(f"  {shape} (d = {m32.d}), first tokens of {first} ids, later of {later}, {n} texts: "
              f"{m32.n_tokens / m32.d:.0f} d pairs, products {e32.metadata['token_precision']}; C0's rank {rank} "
              f"(float64), retained {kept} (float32); largest positive rounding eigenvalue / |most negative| "
              f"{spurious.max() / -s32[-1]:.2f}; reach {token_rounding(m32.C0):.1e}; passed again in float64 by "
              f"default: {fixed.metadata['float64_layers'] == [0]}, its r_V {sweep(fixed.moments[0])[0].r_V}; "
              f"|NTPS float32 - float64| at k <= {len(both)}: untied k {moved[untied].max():.1e}, "
              f"tied k ({integer_ranges(sorted(tied)) or 'none'}) {moved.max():.2f}; the tie said: float64 {said64}, "
              f"float32 {said32}")


def part2(model_name: str, chosen: list[int] | None) -> None:
    from ntps_nb.extract import as_text_set
    from ntps_nb.models import load_model
    from ntps_nb.study.config import load_config
    from ntps_nb.study.stages import load_unit_dataset

    print(f"part 2: pretrained {model_name} under float32 token products (drop_bos, batch 8)")
    model, tok, _ = load_model(model_name)
    for dataset, n, length, layers in PART2:
        layers = chosen or layers
        cfg = load_config(HERE.parent / "studies" / "ci_unit.toml", max_train=n, datasets=[dataset], max_length=length)
        ds, _ = load_unit_dataset(cfg, dataset)
        run = dict(layers=layers, max_length=length, batch_size=8, drop_bos=True, progress=False)
        texts = as_text_set(ds["train"])
        e32 = extract(model, tok, texts, precision="float32", float64_where_rounded=False, **run)
        fixed = extract(model, tok, texts, precision="float32", **run)
        e64 = extract(model, tok, texts, precision="float64", **run)
        first = e32.moments[layers[0]]
        print(f"  {dataset}: {first.n_texts} texts of at most {length} tokens, {first.n_tokens / first.d:.1f} d pairs, "
              f"products {e32.metadata['token_precision']}; the default pass formed layer(s) "
              f"{integer_ranges(fixed.metadata['float64_layers']) or 'none'} again in float64 "
              f"({fixed.metadata['timings_s'].get('float64_pass', 0):.0f} s, the first pass "
              f"{fixed.metadata['timings_s']['pass']:.0f} s)")
        for layer in layers:
            reach = e32.metadata["token_rounding"][str(layer)]
            r32, rfixed, r64 = (sweep(e.moments[layer])[0].r_V for e in (e32, fixed, e64))
            print(f"    layer {layer:2d}: reach {reach:.1e}; r_V {r32} (float32 kept), {rfixed} (default), "
                  f"{r64} (float64)")


def part4() -> None:
    print("part 4: C0 a few directions short of full rank (tiny model, d = 64, embedding layer, 600 texts, 10 draws)")
    torch.set_num_threads(1)
    model = random_model("tiny", torch.device("cpu"), torch.float32)
    run = dict(layers=[0], batch_size=32, max_length=64, drop_bos=False, device="cpu", progress=False,
               token_moments=False)
    for null in (1, 2, 3, 5):
        spurious = found = 0
        moved = last = 0.0
        where = 0
        ranks = set()
        for seed in range(10):
            rng = np.random.default_rng(seed)
            texts = [" ".join(map(str, rng.integers(1, 64 - null + 1, rng.integers(6, 20)))) for _ in range(600)]
            data = (texts, np.arange(600) % 3)
            e32 = extract(model, IdTokenizer(), data, precision="float32", float64_where_rounded=False, **run)
            e64 = extract(model, IdTokenizer(), data, precision="float64", **run)
            s32, s64 = np.linalg.eigvalsh(e32.moments[0].C0), np.linalg.eigvalsh(e64.moments[0].C0)
            rank = int((s64 > RANGE_RTOL * s64[-1]).sum())
            ranks.add(rank)
            if (s32 > RANGE_RTOL * s32[-1]).sum() > rank:
                spurious += 1
                found += e32.metadata["token_rounding"]["0"] > 0
                (g32, n32, _), (g64, n64, _) = sweep(e32.moments[0]), sweep(e64.moments[0])
                below = [k for k in range(1, rank) if k not in next_token_tied_ks(g64.next_token_eigenvalues)]
                gaps = (n32[below] - n64[below]).abs()
                if float(gaps.max()) > moved:
                    moved, where = float(gaps.max()), rank - int(gaps.idxmax())
                last = max(last, float(g32.next_token_eigenvalues[-1] / g32.next_token_eigenvalues[0]))
        print(f"  {64 - null} distinct tokens (C0's float64 rank {'/'.join(map(str, sorted(ranks)))} of 64): {spurious} "
              f"of 10 draws keep rounding directions under float32 products; the check finds {found} of them; in "
              f"those draws |NTPS float32 - float64| at the untied k below C0's rank r is at most {moved:.1e} (at k = "
              f"r - {where}), the "
              f"float32 problem's last next-token eigenvalue at most {last:.1e} of its first")


def part3() -> None:
    import time

    print(f"part 3: the check's cost, {torch.get_num_threads()} torch threads on the CPU")
    rng = np.random.default_rng(0)
    for d in (576, 4096):
        Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        eigenvalues = np.geomspace(1.0, 1e-6, d)
        seconds = {}
        for name, last in (("positive definite", 1e-6), ("reaching -1e-8", -1e-8)):
            eigenvalues[-1] = last
            C0 = (Q * eigenvalues) @ Q.T
            start = time.perf_counter()
            reach = token_rounding(C0)
            seconds[name] = (time.perf_counter() - start, reach)
        print(f"  d = {d}: " + "; ".join(f"{name} {t:.2f} s (reach {r:.1e})" for name, (t, r) in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", type=int, choices=[1, 2, 3, 4], nargs="+", default=[1, 2, 4, 3])
    parser.add_argument("--model", default="smollm2-135m", help="part 2's model (ntps_nb.models.load_model)")
    parser.add_argument("--layers", type=int, nargs="+", help="part 2's layers (default: SmolLM2's, as in PART2)")
    args = parser.parse_args()
    parts = "" if args.part == [1, 2, 4, 3] else " --part " + " ".join(map(str, args.part))
    parts += "".join(f" --{key} {value}" for key, value in (("model", args.model if args.model != "smollm2-135m" else None),
                                                           ("layers", " ".join(map(str, args.layers or [])))) if value)
    print(f"$ python benchmarks/token_rounding_check.py{parts}")
    if 1 in args.part:
        part1()
    if 2 in args.part:
        part2(args.model, args.layers)
    if 4 in args.part:
        part4()
    if 3 in args.part:
        part3()


if __name__ == "__main__":
    main()
