"""Extraction speed, memory and precision, side by side in one run.

On random-initialised models of the paper's shapes (no weights needed) with texts of random
lengths in [min_len, max_len], it times over the same length-sorted batches:

  (a) a plain forward pass with output_hidden_states=True,
  (m) the moment matmuls alone (ntps_nb's per-layer products on each batch's states),
  (b) ntps_nb extraction end to end (forward + moments),
  (c) the released code's style of accumulation: per text and layer, a T x (T-1) lag matrix
      times the states for the prefix sums, products in float32,

and prints b/a, b/(a+m), c/b, the peak device memory of extraction for N and 4N texts, and the
relative error of the moments and of NTPS of the other precision (float32 products when (b) uses
float64, as on a GPU by default) against float64 products. (c+) also brings (c)'s moments to the
host, so that c+/b compares two pipelines that both end with the moments on the host.

    python benchmarks/bench_extract.py --shape qwen2-0.5b --n-texts 256          # GPU or CPU
    python benchmarks/bench_extract.py --shape llama3-8b --n-texts 128 --out benchmarks/results/x.txt
    python benchmarks/bench_extract.py --real smollm2-135m --dataset rt-polarity --n-texts 2000   # CPU, real model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb import ntps, ntps_sweep  # noqa: E402
from ntps_nb.batching import pad_batch, valid_mask as _valid_mask  # noqa: E402
from ntps_nb.extract import _Accumulator, _batches, extract, layer_factors  # noqa: E402
from ntps_nb.models import hidden_states  # noqa: E402


def _forward(model, batch_ids, pad_id, padding_side, device):
    """The extraction's forward pass: padded batch in, every hidden state out."""
    return hidden_states(model, pad_batch(batch_ids, pad_id, padding_side, device))

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab (the paper's Qwen2-0.5B and Llama-3-8B)
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "tiny": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=128, vocab_size=1000),
}


class IdTokenizer:
    """Texts that are space-separated token ids: lets the benchmark control lengths exactly."""

    bos_token_id = None
    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None, padding=False):
        ids = [[int(x) for x in text.split()] for text in texts]
        return {"input_ids": [row[:max_length] for row in ids]}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[spec.pop("arch")]
    config = config_class(**spec, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


@torch.no_grad()
def forward_only(model, ids, lengths, batch_size, device):
    for batch in _batches(np.arange(len(ids)), lengths, batch_size):
        _forward(model, [ids[i] for i in batch], 0, "right", device)


@torch.no_grad()
def moments_only(model, ids, lengths, labels, n_classes, batch_size, device, precision) -> float:
    """Seconds spent in ntps_nb's per-layer products and their float64 accumulation, forward untimed."""
    compute_dtype = torch.float32 if precision == "float32" else torch.float64
    spent = 0.0
    acc = None
    for batch in _batches(np.arange(len(ids)), lengths, batch_size):
        hidden = _forward(model, [ids[i] for i in batch], 0, "right", device)
        if acc is None:
            acc = _Accumulator(list(range(len(hidden))), hidden[0].shape[-1], n_classes, device, True, compute_dtype)
        synchronize(device)
        start = time.perf_counter()
        valid = _valid_mask([len(ids[i]) for i in batch], np.zeros(len(batch), int), hidden[0].shape[1], "right", device)
        pair = (valid[:, :-1] & valid[:, 1:]).flatten().nonzero().squeeze(1)
        counts = valid.sum(dim=1, keepdim=True)
        y = torch.nn.functional.one_hot(torch.as_tensor(labels[batch], device=device), n_classes).to(compute_dtype)
        for layer, h in enumerate(hidden):
            factors, xbar = layer_factors(h, valid, pair, counts, y, compute_dtype, True, acc.shh_from_identity)
            acc.sums[layer]["x_sum"] += xbar.sum(dim=0)
            for name, (a, b) in factors.items():
                acc.add(layer, name, a, b)
        synchronize(device)
        spent += time.perf_counter() - start
    return spent


@torch.no_grad()
def released_style(model, ids, lengths, batch_size, device):
    """Per text and layer: S = L H with L the (T-1) x T lower-triangular lag matrix, float32."""
    d = None
    C0 = C1 = None
    for batch in _batches(np.arange(len(ids)), lengths, batch_size):
        hidden = _forward(model, [ids[i] for i in batch], 0, "right", device)
        if C0 is None:
            d = hidden[0].shape[-1]
            C0 = [torch.zeros(d, d, device=device) for _ in hidden]
            C1 = [torch.zeros(d, d, device=device) for _ in hidden]
        for row, i in enumerate(batch):
            T = len(ids[i])
            lag = torch.tril(torch.ones(T - 1, T, device=device))
            for layer, h in enumerate(hidden):
                H = h[row, :T].float()
                S = lag @ H
                C0[layer] += S.T @ S
                C1[layer] += S.T @ H[1:]
    return C0, C1


def released_style_to_host(model, ids, lengths, batch_size, device):
    """(c) and then its moments on the host as numpy arrays, the way a script hands them to an eigensolver."""
    C0, C1 = released_style(model, ids, lengths, batch_size, device)
    return [m.cpu().numpy() for m in C0], [m.cpu().numpy() for m in C1]


def relative_errors(m32, m64, layers, k_values) -> dict[str, float]:
    moment_err = 0.0
    for layer in m64.layers:
        for name, value in m64[layer].arrays().items():
            err = np.abs(getattr(m32[layer], name) - value).max() / max(np.abs(value).max(), 1e-300)
            moment_err = max(moment_err, float(err))
    ntps_err = 0.0
    ref_err = 0.0
    for layer in layers:
        for k in k_values:
            ntps_err = max(ntps_err, abs(ntps(m32[layer], k) - ntps(m64[layer], k)))
        a = ntps_sweep(m32[layer], variant="reference", precision="float64").ntps.to_numpy()
        b = ntps_sweep(m64[layer], variant="reference", precision="float64").ntps.to_numpy()
        ref_err = max(ref_err, float(np.nanmax(np.abs(a - b))))
    return {"moments_max_rel": moment_err, "ntps_theory_max_abs": ntps_err, "ntps_reference_max_abs": ref_err}


def reporter(out: str | None):
    """``say(text)``: print a line and append it to ``out`` (emptied first), line by line, so that
    a run cut short keeps what it measured."""
    out_path = Path(out) if out else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("")

    def say(text: str = "") -> None:
        print(text, flush=True)
        if out_path is not None:
            with out_path.open("a") as f:
                f.write(text + "\n")

    return say


def synthetic_texts(n: int, min_len: int, max_len: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    texts = [" ".join(map(str, rng.integers(1, vocab, T))) for T in lengths]
    labels = rng.integers(0, 4, n)
    labels[:4] = np.arange(4)
    return texts, labels


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model and the texts: --shape or --real, --dataset, --n-texts, --batch-size."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--real", help="a model name for ntps_nb.models.load_model instead of a random shape")
    parser.add_argument("--dataset", default="rt-polarity")
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float64"],
                        help="products of (b) and (m); 'auto' is the package default (float64 on a GPU)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="with --real: also extract with float64 products and report the differences")
    parser.add_argument("--skip-released", action="store_true", help="skip (c), the slow released-style pass")
    parser.add_argument("--error-layers", type=int, default=3, help="layers on which NTPS errors are measured")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    say = reporter(args.out)
    say(f"ntps_nb extraction benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    import transformers

    say(f"device: {device_name} ({device.type}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}")

    if args.real:
        from ntps_nb.datasets import load_dataset
        from ntps_nb.models import load_model

        model, tokenizer, info = load_model(args.real, dtype=dtype, device=device)
        data = load_dataset(args.dataset, max_train=args.n_texts)["train"]
        columns = data[:]
        texts, labels = columns["text"], np.asarray(columns["label"])
        say(f"model: {args.real} (pretrained={info.pretrained}), dataset {args.dataset} train, {len(texts)} texts, "
            f"max_length {args.max_len}, forward dtype {args.dtype}, batch {args.batch_size}")
        start = time.perf_counter()
        result = extract(model, tokenizer, (texts, labels), batch_size=args.batch_size, max_length=args.max_len,
                         device=device, progress=False)
        seconds = time.perf_counter() - start
        say(f"extraction: {seconds:.1f} s, {len(texts) / seconds:.1f} texts/s, "
            f"{result.lengths.sum() / seconds:.0f} tokens/s, mean length {result.lengths.mean():.1f} tokens "
            f"(products: {result.metadata['precision']})")
        if args.compare_precision and result.metadata["precision"] != "float64":
            start = time.perf_counter()
            exact = extract(model, tokenizer, (texts, labels), batch_size=args.batch_size, max_length=args.max_len,
                            device=device, progress=False, precision="float64")
            seconds64 = time.perf_counter() - start
            layers = list(exact.moments.layers)
            with contextlib.redirect_stderr(io.StringIO()):
                errors = relative_errors(result.moments, exact.moments, layers, [1, 2, 4, 8, 16, 64])
            say(f"float64 products: {seconds64:.1f} s ({seconds64 / seconds:.2f} x); {result.metadata['precision']} vs "
                f"float64 over all {len(layers)} layers: moments max relative error {errors['moments_max_rel']:.2e} "
                f"(target 1e-5); NTPS theory max abs diff {errors['ntps_theory_max_abs']:.2e} (target 1e-6; k in 1, 2, "
                f"4, 8, 16, 64); NTPS reference (19 fractions) max abs diff {errors['ntps_reference_max_abs']:.2e}")
        return

    model = random_model(args.shape, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    spec = SHAPES[args.shape]
    say(f"model: random {args.shape} shape (d={spec['hidden_size']}, {spec['num_hidden_layers']} layers, "
        f"{n_params / 1e9:.2f} B params), forward dtype {args.dtype}, batch {args.batch_size}")
    texts, labels = synthetic_texts(args.n_texts, args.min_len, args.max_len, spec["vocab_size"], seed=0)
    tok = IdTokenizer()
    ids = [[int(x) for x in t.split()] for t in texts]
    lengths = np.array([len(t) for t in ids])
    say(f"texts: N={len(ids)}, lengths uniform in [{args.min_len}, {args.max_len}], {lengths.sum()} tokens")

    precision = args.precision if args.precision != "auto" else ("float64" if device.type == "cuda" else "float32")
    other = "float32" if precision == "float64" else "float64"
    run = dict(batch_size=args.batch_size, max_length=args.max_len, device=device, progress=False, drop_bos=False,
               precision=precision)
    say(f"products (b, m): {precision}")
    extract(model, tok, (texts, labels), **run)  # warm-up over every batch shape (kernels, allocator)
    t_a, _ = timed(device, lambda: forward_only(model, ids, lengths, args.batch_size, device))
    t_m = moments_only(model, ids, lengths, labels, 4, args.batch_size, device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t_b, result = timed(device, lambda: extract(model, tok, (texts, labels), **run))
    peak_n = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    say(f"(a) forward with hidden states  {t_a:8.2f} s   {lengths.sum() / t_a:10.0f} tokens/s")
    say(f"(m) moment matmuls alone        {t_m:8.2f} s")
    say(f"(b) ntps_nb extraction          {t_b:8.2f} s   {lengths.sum() / t_b:10.0f} tokens/s")
    say(f"    b/a = {t_b / t_a:.2f}   b/(a+m) = {t_b / (t_a + t_m):.2f}   (target <= 1.3)")
    say(f"    b's own breakdown (metadata timings_s): {result.metadata['timings_s']}")
    t_b0, _ = timed(device, lambda: extract(model, tok, (texts, labels), token_moments=False, **run))
    say(f"(b0) extraction without Shh     {t_b0:8.2f} s   (the moments (c) computes, plus the pooled ones)")
    if not args.skip_released:
        t_c, _ = timed(device, lambda: released_style(model, ids, lengths, args.batch_size, device))
        say(f"(c) released-style accumulation {t_c:8.2f} s   c/b = {t_c / t_b:.2f}, c/b0 = {t_c / t_b0:.2f}   "
            "(target >= 1.5 on the 8B shape; c stops with its moments on the device, b with them on the host)")
        say(f"    c/b's pass = {t_c / result.metadata['timings_s']['pass']:.2f}   (both stop with the moments on the "
            "device)")
        t_ch, _ = timed(device, lambda: released_style_to_host(model, ids, lengths, args.batch_size, device))
        say(f"(c+) c, then its C0/C1 to the host (.cpu())  {t_ch:8.2f} s   c+/b = {t_ch / t_b:.2f}   (both stop with "
            "the moments on the host)")

    t_small, small = timed(device, lambda: extract(model, tok, (texts[:8], labels[:8]), **run))
    say(f"    fixed cost per pass (accumulators, device->host, Moments), from an 8-text pass: <= {t_small:.2f} s "
        f"{small.metadata['timings_s']}")
    del small
    if device.type == "cuda":
        quarter = args.n_texts // 4
        torch.cuda.reset_peak_memory_stats(device)
        extract(model, tok, (texts[:quarter], labels[:quarter]), **run)
        peak_q = torch.cuda.max_memory_allocated(device)
        gib = 2**30
        say(f"peak device memory: N/4 = {quarter} texts {peak_q / gib:.2f} GiB, N = {args.n_texts} texts "
            f"{peak_n / gib:.2f} GiB (model {base_memory / gib:.2f} GiB before the pass)")

    t_other, result_other = timed(device, lambda: extract(model, tok, (texts, labels), **{**run, "precision": other}))
    say(f"{other} products: {t_other:.2f} s ({t_other / t_b:.2f} x the {precision} products of (b)) "
        f"{result_other.metadata['timings_s']}")
    low = precision if precision != "float64" else other
    result32, result64 = (result, result_other) if precision != "float64" else (result_other, result)
    n_layers = len(result64.moments.layers)
    pick = sorted({0, n_layers // 2, n_layers - 1})[: args.error_layers]
    r_v = min(result64.moments[0].d, 64)
    with contextlib.redirect_stderr(io.StringIO()):
        errors = relative_errors(result32.moments, result64.moments, pick, [1, 4, r_v])
    say(f"{low} products vs float64 products (same forward): moments max relative error "
        f"{errors['moments_max_rel']:.2e} (target 1e-5); NTPS theory max abs diff {errors['ntps_theory_max_abs']:.2e} "
        f"(target 1e-6; layers {pick}, k in 1, 4, {r_v}); NTPS reference (19 fractions) max abs diff "
        f"{errors['ntps_reference_max_abs']:.2e}")


if __name__ == "__main__":
    main()
