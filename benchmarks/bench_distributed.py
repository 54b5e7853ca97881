"""Extraction on several GPUs (torchrun, NCCL) against one GPU: equality and speed, in one run.

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --out benchmarks/results/x.txt

Every rank builds the same random-initialised model (rank 0's weights are broadcast), the texts
are sharded by rank inside `ntps_nb.extract.extract`, and the sums are all-reduced. Then rank 0
repeats the extraction alone on its GPU and prints, side by side:

  1. equality: a float64 forward of a small shape (Qwen2-0.5B's), so that the only differences
     left are round-off in how texts are grouped into batches: max relative difference of every
     moment and of the pooled features, several GPUs vs one;
  2. speed: a bf16 forward of a large shape (Llama-3-8B's) over texts of random lengths: seconds
     on one GPU and on all of them, the speed-up, and the same differences (bf16 forward, so
     batch grouping shows at bf16 round-off).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import IdTokenizer, SHAPES, random_model, synchronize, synthetic_texts  # noqa: E402
from ntps_nb.extract import extract  # noqa: E402


def max_relative_differences(a, b) -> dict[str, float]:
    """Largest |a - b| / max|b| per moment name over all layers, and for the pooled features."""
    out: dict[str, float] = {}
    for layer in b.moments.layers:
        for name, value in b.moments[layer].arrays().items():
            diff = np.abs(getattr(a.moments[layer], name) - value).max() / max(np.abs(value).max(), 1e-300)
            out[name] = max(out.get(name, 0.0), float(diff))
    if b.pooled:
        out["pooled"] = max(float(np.abs(a.pooled[k] - v).max() / max(np.abs(v).max(), 1e-300)) for k, v in b.pooled.items())
    return out


def build(shape: str, device: torch.device, dtype: torch.dtype):
    model = random_model(shape, device, dtype)
    for p in model.parameters():  # identical weights on every rank, whatever each GPU's generator does
        dist.broadcast(p.data, src=0)
    return model


def timed_extract(model, texts, labels, device, **kwargs):
    synchronize(device)
    start = time.perf_counter()
    result = extract(model, IdTokenizer(), (texts, labels), device=device, progress=False, drop_bos=False, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--equal-shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--equal-n", type=int, default=128)
    parser.add_argument("--speed-shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--speed-n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--out")
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        name = f"{torch.cuda.get_device_name(device)}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    else:  # a CPU rehearsal of the script (gloo), e.g. with --equal-shape tiny --speed-shape tiny
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        name = "CPU (gloo)"
    lines: list[str] = []

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)
            lines.append(text)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text("\n".join(lines) + "\n")

    import transformers

    say(f"ntps_nb distributed extraction benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(f"{world} x {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    common = dict(batch_size=args.batch_size, max_length=args.max_len, precision="float64", pooled_layers=[0, 1])

    jobs = [("equality", args.equal_shape, args.equal_n, torch.float64),
            ("speed", args.speed_shape, args.speed_n, torch.bfloat16)]
    results = {}
    for label, shape, n, dtype in jobs:
        model = build(shape, device, dtype)
        texts, labels = synthetic_texts(n, args.min_len, args.max_len, SHAPES[shape]["vocab_size"], seed=0)
        timed_extract(model, texts[: 2 * world], labels[: 2 * world], device, **common)  # warm-up
        dist.barrier()
        seconds, result = timed_extract(model, texts, labels, device, **common)
        results[label] = (shape, n, dtype, seconds, result, texts, labels)
        say(f"{label}: {shape} shape, {str(dtype).split('.')[-1]} forward, N={n}: {world} processes {seconds:.2f} s "
            f"(world_size recorded: {result.metadata['world_size']}; timings {result.metadata['timings_s']})")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return

    for label, (shape, n, dtype, seconds_many, many, texts, labels) in results.items():
        model = random_model(shape, device, dtype)  # rank 0 built these weights and broadcast them
        timed_extract(model, texts[:2], labels[:2], device, **common)
        seconds_one, one = timed_extract(model, texts, labels, device, **common)
        diffs = max_relative_differences(many, one)
        say(f"{label}: 1 process {seconds_one:.2f} s vs {world} processes {seconds_many:.2f} s: speed-up "
            f"{seconds_one / seconds_many:.2f}x; max relative difference per moment: "
            + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        del model, one
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
