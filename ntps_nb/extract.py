"""The streaming pass: a causal LM and a labelled text set -> NTPS moments of every layer.

One forward pass per batch with ``output_hidden_states=True``; per layer, the perception moments
(mean-pooled states vs labels), the next-token moments (prefix sums vs next state, SPEC section 2)
and optionally the token second moment are accumulated with one matmul each over the valid
positions of the batch. No token state outlives its batch: memory is O(L d^2), independent of
the number and length of texts. Padding goes on either side with explicit position ids, so the
side never changes a moment. Under ``torch.distributed`` each rank takes its share of the texts
and the sums are all-reduced.

Every extraction records where its time went in ``metadata["timings_s"]``: ``pass`` (forward and
products), ``finalise_device``, ``finalise_host`` (bringing L x 4 float64 d x d matrices to the
host: 17.7 GB for an 8B model, a few seconds; under torchrun, whose default is one OpenMP thread,
set OMP_NUM_THREADS so that each rank's host copy is multi-threaded; benchmarks/results) and
``finalise_checks`` (the finiteness and symmetry checks of `Moments`); with float32 token products also
``rounding_check`` (`token_rounding` on each layer's C0) and, where it finds a layer, ``float64_pass`` (that
layer's products passed again in float64).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ntps_nb.batching import PADDING_SIDES, mask_states, pad_batch, pooling_tokens, valid_mask
from ntps_nb.batching import tokenize  # noqa: F401  (re-exported: extraction's tokenization)
from ntps_nb.cache import atomic_path, cache_dir, content_key, read_entry
from ntps_nb.core.estimators import split_halves
from ntps_nb.core.moments import LayerMoments, Moments
from ntps_nb.core.backends.torch import negative_reach_torch as token_rounding  # noqa: F401  (the check)
from ntps_nb.core.validation import check_count, check_labels
from ntps_nb.models import TokenizerMismatchError, check_same_tokenizer  # noqa: F401  (the error re-exported)
from ntps_nb.models import hidden_size, hidden_state_layers, hidden_states, pad_token_id

Precision = Literal["auto", "float32", "float64"]

#: Version of the extraction algorithm; part of every cache key. Version 2: the text-level products
#: (`TEXT_PRODUCTS`) in float64 under precision "float32" too. Version 3: the token products too where
#: a pass has few token pairs (`token_precision`). Version 4: the pairs counted in the smallest part of the
#: pass that NTPS or its interval reads (`fewest_pairs_read`); float64 pooled features at float64 precision.
#: Version 5: the layers where float32 token products' rounding reaches C0's retained range (`token_rounding`)
#: are passed again with float64 products.
EXTRACT_VERSION = 5
#: The moments formed from one pooled vector per text, always in float64: they cost d^2 a text
#: (the token products d^2 a token), and in float32 the rounding of a batch's product leaves Sxx with
#: eigenvalues of rounding size above the range tolerance: below N = d whitening kept them as
#: directions (Sxx of 64 SmolLM2 texts at d = 576 retained 147; benchmarks/precision_rank_check.py).
#: Rounding still moves NTPS there through the order of classes of equal size, which are tied where the
#: labels are fitted exactly (docs/estimator.md, "Sxx's rank with float32 products").
TEXT_PRODUCTS = ("Sxx", "Sxy")
#: Token pairs per hidden dimension up to which precision "float32" forms the token products (C0, C1, Shh)
#: in float64 as well, counted in the smallest part of the pass that NTPS or its interval reads
#: (`token_precision`, `fewest_pairs_read`). With fewer pairs than d, C0's rank is at most the pairs, and
#: float32 rounding left eigenvalues above `RANGE_RTOL` that the next-token problem kept as directions
#: (SmolLM2, 364 trec6 pairs: 432 retained against 328); up to a few d pairs its smallest eigenvalues are
#: at the rounding's size. Float32 token products moved the theory plug-in by 1e-3 or more only below 4 d
#: pairs (SmolLM2's last layer on trec6 and rt-polarity, benchmarks/token_products_check.py; docs/estimator.md,
#: "Float32 token products below a few d token pairs"), below 2.5 d at SmolLM2's layers 2 and 22 and Gemma-3's
#: layers 9 and 18, below 4.9 d at SmolLM2's layer 15 (trec6). Without shards float64 then costs at most 2 x 4 d^3
#: multiply-adds a layer, about one float64 eigendecomposition of a d x d matrix: less than the plug-in's
#: own solves of that layer; with S shards at most S / (S / 2 - 1) times that (4x at S = 4, 2.2x at 20),
#: less than the interval's factorisations, several a shard. Many pairs need not give C0 full rank: at the
#: embedding layer its rank is at most the distinct tokens met; the pass checks C0 afterwards (`token_rounding`).
FLOAT64_TOKEN_PAIRS_PER_DIM = 4


@dataclasses.dataclass(frozen=True)
class TextSet:
    """Texts with integer labels 0..C-1 and class names, as extraction consumes them."""

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 of the texts and labels in order: the dataset part of a cache key.

        Returns
        -------
        str
            64 hex digits over every (text, label) pair in order and the class names.
        """
        import hashlib

        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels):
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00" + str(int(label)).encode() + b"\x01")
        digest.update(json.dumps(self.class_names).encode())
        return digest.hexdigest()


def as_text_set(data: Any, *, n_classes: int | None = None) -> TextSet:
    """Accept a ``datasets.Dataset`` (columns text/label), a pandas DataFrame, a mapping, or (texts, labels).

    Parameters
    ----------
    data : TextSet, ``datasets.Dataset``, DataFrame, mapping {"text": texts, "label": labels}, or tuple (texts, labels)
        N texts (strings) and N integer labels; a `TextSet` is returned as it is.
    n_classes : int, optional
        Number of classes C; default the dataset's class names, else max(label) + 1.

    Returns
    -------
    TextSet
        The N texts, labels (N,) checked to lie in 0..C-1, and C class names (the dataset's
        label names, else "0".."C-1").

    Raises
    ------
    ValueError
        On an empty dataset, labels not of shape (N,), texts that are not strings, or an
        ``n_classes`` other than the number of the dataset's class names.
    TypeError
        On data of another type.
    """
    class_names: list[str] | None = None
    if isinstance(data, TextSet):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        texts, labels = data
    elif hasattr(data, "column_names") and hasattr(data, "features"):  # datasets.Dataset
        if "text" not in data.column_names or "label" not in data.column_names:
            raise ValueError(f"the dataset needs columns 'text' and 'label', has {data.column_names}")
        columns = data[:]
        texts, labels = columns["text"], columns["label"]
        feature = data.features["label"]
        if hasattr(feature, "names"):
            class_names = list(feature.names)
    elif hasattr(data, "columns") and hasattr(data, "iloc"):  # pandas
        if "text" not in data.columns or "label" not in data.columns:
            raise ValueError(f"the DataFrame needs columns 'text' and 'label', has {list(data.columns)} (rename them, "
                             "or read a file with ntps_nb.datasets.read_dataset_file, which takes the column names)")
        texts, labels = data["text"].tolist(), data["label"].to_numpy()
    elif isinstance(data, Mapping):  # columns by name, as datasets.Dataset.from_dict takes them
        if "text" not in data or "label" not in data:
            splits = " (the splits of a dataset: give one, e.g. data['train'])" if "train" in data else ""
            raise ValueError(f"the mapping needs keys 'text' and 'label', has {list(data)}{splits}")
        texts, labels = data["text"], data["label"]
    else:
        raise TypeError("expected a datasets.Dataset, a DataFrame, a mapping with keys 'text' and 'label' or "
                        f"(texts, labels); got {type(data).__name__}")
    texts = list(texts)
    labels = np.asarray(labels)
    if len(texts) == 0:
        raise ValueError("the dataset is empty")
    if labels.shape != (len(texts),):
        raise ValueError(f"{len(texts)} texts but labels of shape {labels.shape}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; entries {bad[:10]} are not")
    if class_names is not None and n_classes is not None and n_classes != len(class_names):
        raise ValueError(f"n_classes={n_classes} but the dataset names {len(class_names)} classes")
    if class_names is not None:
        C = len(class_names)
    else:
        C = None if n_classes is None else int(n_classes)  # None: the labels say how many
    labels = check_labels(labels, n_classes=C)
    if class_names is None:
        class_names = [str(c) for c in range(int(labels.max()) + 1 if C is None else C)]
    return TextSet(texts=texts, labels=labels, class_names=class_names)


@dataclasses.dataclass
class Extraction:
    """Result of one pass: moments of every layer, optional pooled features, shard and half moments."""

    moments: LayerMoments
    labels: np.ndarray
    class_names: list[str]
    lengths: np.ndarray  # valid positions per text (after drop_bos and truncation)
    pooled: dict[int, np.ndarray] | None = None  # layer -> (N, d), texts in dataset order
    shards: list[LayerMoments] | None = None  # disjoint groups of texts; they combine to the moments
    # the two halves of a seeded split of the shards (`split_halves`): half A, half B
    halves: list[LayerMoments] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically into ``folder`` (npz/npy/json only; no pickle).

        Parameters
        ----------
        folder : str or PathLike
            The entry's folder (replaced if it exists).

        Returns
        -------
        Path
            ``folder``.
        """
        folder = Path(folder)
        with atomic_path(folder, directory=True) as tmp:
            self.moments.save(tmp / "moments.npz")
            np.save(tmp / "labels.npy", self.labels)
            np.save(tmp / "lengths.npy", self.lengths)
            if self.pooled is not None:
                with open(tmp / "pooled.npz", "wb") as handle:
                    np.savez(handle, **{f"layer{layer}": x for layer, x in self.pooled.items()})
            for i, shard in enumerate(self.shards or []):
                shard.save(tmp / f"shard{i:03d}.npz")
            for i, half in enumerate(self.halves or []):
                half.save(tmp / f"half{i}.npz")
            meta = {"class_names": self.class_names, "n_shards": len(self.shards or []),
                    "n_halves": len(self.halves or []),
                    "metadata": self.metadata, "complete": True}
            (tmp / "extraction.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Extraction":
        """An extraction written by `save`.

        Parameters
        ----------
        folder : str or PathLike

        Returns
        -------
        Extraction

        Raises
        ------
        FileNotFoundError
            When ``folder`` holds no complete extraction (no ``extraction.json``).
        """
        folder = Path(folder)
        meta_path = folder / "extraction.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} holds no complete extraction")
        meta = json.loads(meta_path.read_text())
        pooled = None
        if (folder / "pooled.npz").is_file():
            with np.load(folder / "pooled.npz", allow_pickle=False) as data:
                pooled = {int(key[len("layer"):]): data[key] for key in data.files}
        shards = [LayerMoments.load(folder / f"shard{i:03d}.npz") for i in range(meta["n_shards"])] or None
        # entries written before halves existed have no "n_halves"
        halves = [LayerMoments.load(folder / f"half{i}.npz") for i in range(meta.get("n_halves", 0))] or None
        return cls(
            moments=LayerMoments.load(folder / "moments.npz"),
            labels=np.load(folder / "labels.npy", allow_pickle=False),
            lengths=np.load(folder / "lengths.npy", allow_pickle=False),
            class_names=list(meta["class_names"]),
            pooled=pooled, shards=shards, halves=halves, metadata=meta["metadata"],
        )


class _Accumulator:
    """Raw sums (not yet divided by N) of the moments of several layers, on one device.

    Shh, the second moment of the token states, is not a product of its own: per text,
    sum_t h_t h_t^T = s_T s_T^T - sum_t (s_t h_{t+1}^T + h_{t+1} s_t^T) (expand s_{t+1} s_{t+1}^T),
    so Shh = SS - C1 - C1^T with SS the sum of (text total)(text total)^T, a B-row product. The
    subtraction cancels about log10(T) digits: exact to ~1e-13 with float64 products, so float32
    products keep the direct token-level product instead.
    """

    def __init__(self, layers: list[int], d: int, n_classes: int, device: torch.device, token_moments: bool,
                 compute_dtype: torch.dtype = torch.float64):
        f64 = dict(dtype=torch.float64, device=device)
        self.layers = layers
        self.shh_from_identity = token_moments and compute_dtype == torch.float64
        names = ["Sxx", "C0", "C1"] + (["SS" if self.shh_from_identity else "Shh"] if token_moments else [])
        self.sums = {
            layer: {
                **{name: torch.zeros(d, d, **f64) for name in names},
                "Sxy": torch.zeros(d, n_classes, **f64), "x_sum": torch.zeros(d, **f64),
            }
            for layer in layers
        }
        self.class_counts = torch.zeros(n_classes, **f64)
        self.n_texts = torch.zeros((), **f64)
        self.n_pairs = torch.zeros((), **f64)
        self.scratch: torch.Tensor | None = None  # float32 products land here before the float64 sum

    def add(self, layer: int, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """sums[layer][name] += a^T b, in place (no d x d temporary with float64 products)."""
        total = self.sums[layer][name]
        if a.dtype == torch.float64:
            total.addmm_(a.T, b)
            return
        if b.shape[1] != total.shape[0]:  # d x C (Sxy): small; a fresh product keeps the BLAS call of a.T @ b
            total += a.T @ b
            return
        if self.scratch is None or self.scratch.device != a.device:
            self.scratch = torch.empty(total.shape[0], total.shape[0], dtype=a.dtype, device=a.device)
        torch.mm(a.T, b, out=self.scratch)
        total += self.scratch

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for layer in self.layers:
            for value in self.sums[layer].values():
                dist.all_reduce(value)
        for value in (self.class_counts, self.n_texts, self.n_pairs):
            dist.all_reduce(value)

    def finalise_on_device(self) -> None:
        """In place: form Shh from the identity (if accumulated as SS), make the symmetric moments
        exactly symmetric and divide every sum by the number of texts."""
        n = float(self.n_texts)
        if n < 1:
            raise ValueError("no texts were accumulated")
        for layer in self.layers:
            sums = self.sums[layer]
            if "SS" in sums:
                shh = sums.pop("SS")
                shh -= sums["C1"]
                shh -= sums["C1"].T
                sums["Shh"] = shh
            for name, value in sums.items():
                if name in ("Sxx", "C0", "Shh"):  # symmetric by construction; make it exact on the device
                    value.copy_((value + value.T) / 2)
                value /= n

    def to_layer_moments(self, metadata: dict[str, Any], timings: dict[str, float] | None = None, *,
                         keep_on_device: bool = False) -> LayerMoments:
        """Divide by N, make the symmetric moments exactly symmetric and bring them to the host.

        The accumulators are consumed (finalised in place on their device). ``timings`` receives the
        seconds spent finalising on the device and copying to the host. With ``keep_on_device``
        each finalised device matrix stays alive as the resident copy of its host array
        (`ntps_nb.core.backends.torch.keep_resident`): the torch backend reads it instead of
        copying the array back (on a CPU the two share memory: no copy at all).
        """
        n = float(self.n_texts)
        device = self.class_counts.device
        clock = _Clock(device)
        counts = self.class_counts.cpu().numpy()
        self.finalise_on_device()
        seconds_device = clock.lap()
        out = {}
        staging = _Staging()
        seconds_copy = seconds_checks = 0.0
        for layer in self.layers:
            s = {name: staging.to_host(value) for name, value in self.sums[layer].items()}
            kept = self.sums[layer] if keep_on_device else {}
            self.sums[layer] = {}  # the device copy goes as soon as the host has it, unless kept
            seconds_copy += clock.lap()
            out[layer] = Moments(
                Sxx=s["Sxx"], Sxy=s["Sxy"], Syy=np.diag(counts / n), C0=s["C0"], C1=s["C1"],
                x_mean=s["x_sum"], Shh=s.get("Shh"), n_texts=int(round(n)), n_tokens=int(round(float(self.n_pairs))),
            )
            if keep_on_device:
                from ntps_nb.core.backends.torch import keep_resident

                for name, value in kept.items():
                    array = getattr(out[layer], "x_mean" if name == "x_sum" else name)
                    if np.shares_memory(array, s[name]):  # not a copy Moments made (it never changes values)
                        keep_resident(array, value)
            seconds_checks += clock.lap()
        if timings is not None:
            for name, seconds in (("finalise_device", seconds_device), ("finalise_host", seconds_copy),
                                  ("finalise_checks", seconds_checks)):
                timings[name] = timings.get(name, 0.0) + seconds
        return LayerMoments(out, metadata)


class _Staging:
    """Device -> host copies of finalised accumulators into fresh float64 host arrays.

    On a GPU a plain ``tensor.cpu()`` of fresh host memory ran at 1.5 GiB/s on an H200 machine
    (the pageable copy faults every page in on one thread), 15 GiB/s into memory touched before
    (benchmarks/bench_host_copy.py). Here each matrix goes in chunks through one pinned buffer
    (DMA at full speed) and then into its host array with torch's multi-threaded copy, so the
    first touch of the pages is spread over the CPU threads. On a CPU the accumulator is the result.
    """

    CHUNK = 8 * 2**20  # float64 elements per staged chunk (64 MiB)

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def to_host(self, value: torch.Tensor) -> np.ndarray:
        if value.device.type == "cpu":
            return value.numpy()
        if value.device.type != "cuda":
            return value.cpu().numpy()
        flat = value.reshape(-1)
        host = torch.empty(value.shape, dtype=value.dtype)
        host_flat = host.view(-1)
        want = min(self.CHUNK, max(flat.numel(), 1))
        if self.buffer is None or self.buffer.numel() < want or self.buffer.dtype != value.dtype:
            self.buffer = torch.empty(want, dtype=value.dtype, pin_memory=True)
        step = self.buffer.numel()
        for start in range(0, flat.numel(), step):
            n = min(step, flat.numel() - start)
            self.buffer[:n].copy_(flat[start:start + n], non_blocking=True)
            torch.cuda.current_stream(value.device).synchronize()
            host_flat[start:start + n].copy_(self.buffer[:n])
        return host.numpy()


class _Clock:
    """Wall-clock laps that wait for the device first, for the timing breakdown in the metadata."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        seconds, self.last = now - self.last, now
        return seconds


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Texts sorted by length (longest first) and cut into batches: little padding per batch."""
    ranked = order[np.argsort(-lengths[order], kind="stable")]
    return [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]


@torch.no_grad()
def extract(
    model: torch.nn.Module,
    tokenizer,
    data: Any,
    *,
    layers: str | Iterable[int] = "all",
    batch_size: int = 16,
    max_length: int = 256,
    drop_bos: bool = True,
    device: str | torch.device | None = None,
    precision: Precision = "auto",
    pooled_layers: str | Iterable[int] | None = None,
    pooled_dtype: str = "float32",
    padding_side: Literal["right", "left"] = "right",
    shards: int | None = None,
    shard_layers: Iterable[int] | None = None,
    shard_seed: int = 0,
    half_layers: Iterable[int] | None = None,
    half_seed: int = 0,
    token_moments: bool = True,
    n_classes: int | None = None,
    float64_where_rounded: bool = True,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    keep_on_device: bool = False,
) -> Extraction:
    """Moments of SPEC section 2 for every requested layer, from one forward pass over ``data``.

    Parameters
    ----------
    model, tokenizer : a Hugging Face causal LM and its tokenizer (see `ntps_nb.models.load_model`).
    data : ``datasets.Dataset`` with ``text``/``label`` columns, a DataFrame, a mapping with those keys, or
        (texts, labels).
    layers : "all" (hidden states 0..L, 0 = embeddings) or an iterable of indices (negative ones count from the
        last, -1 = L, here and in the other layer settings: `resolve_layer_indices`).
    batch_size, max_length : texts per forward pass; truncation length in tokens (recorded).
    drop_bos : leave the BOS position out of pooling and of C0/C1 (it still serves as context).
    device : where to run; defaults to the model's device (a CPU or CUDA device: Apple's MPS has no float64,
        in which the moments are summed).
    precision : "float32" (per-batch products of the token states in float32, summed into float64
        totals; the text-level products Sxx and Sxy are float64 whatever the choice: `TEXT_PRODUCTS`),
        "float64" (every product in float64), or "auto" (default, `resolve_precision`): float64 on a CPU and on
        GPUs with full-rate float64 (data-centre parts), float32 on other GPUs. Under "float32" a pass
        whose smallest part read (with shards, a half of the split less a shard: `fewest_pairs_read`)
        has at most `FLOAT64_TOKEN_PAIRS_PER_DIM` x d token pairs forms its token products in float64
        too (`token_precision`: float32 token products moved the plug-in there by up to 0.3; metadata
        ``token_precision`` says which), and after the pass the layers where the rounding of float32 products
        reaches C0's retained range (`token_rounding`; e.g. the embedding layer of texts with fewer distinct
        tokens than d) are passed again with float64 products (metadata ``token_rounding``, each layer's
        reach, and ``float64_layers``; the second pass's time in ``timings_s["float64_pass"]``), unless
        ``float64_where_rounded`` is False. Float32 products keep the moments within ~1e-6 of float64
        and moved NTPS by at most 2.4e-4 from 4 d pairs, ~1e-6 from 15-20 d (SmolLM2's last layer;
        1e-4 to 2e-4 from 7 d to 19 d at its layer 15: benchmarks/token_products_check.py); float64 costs
        1.09x end to end on a CPU core (the forward dominates) and is faster than float32 on an H200
        (benchmarks/results). The choice is recorded in the metadata. (Products split into
        bfloat16 pieces for tensor cores were measured and rejected: benchmarks/bench_products.py.)
    pooled_layers : layers whose mean-pooled features (N x d) are returned, "all", or None.
    pooled_dtype : numpy dtype name of the returned pooled features (each text's mean, summed at the token
        products' precision: `token_precision`), or "auto": that precision, so that the features are the
        vectors Sxx and Sxy are formed from (probes fitted on them match the moments to rounding).
    padding_side : "right" or "left"; position ids are explicit, so this changes no moment.
    shards, shard_layers, shard_seed : also keep the moments of ``shards`` disjoint random groups
        of texts (for intervals), for ``shard_layers`` (default: all requested layers; an empty
        list keeps none: the shards then only group the texts for the halves); the shards carry
        every moment but Shh.
    half_layers, half_seed : also keep, for ``half_layers`` (a subset of ``layers``; needs
        ``shards`` >= 2), the moments of the two halves of the shards that
        ``ntps_nb.core.estimators.split_halves(shards, seed=half_seed)`` splits them into: half A
        the texts of the shards of its first array, half B the rest. They are what the
        "richardson" estimator reads (pass ``seed=half_seed`` to it, and the two halves as its
        two shards: ``split_halves(2, seed)`` puts one in each half, so the value is the one
        of the ``shards`` per-shard moments). Two d x d x 3 accumulators per layer instead of
        ``shards`` of them; no Shh. Left at None, neither enters the cache key.
    token_moments : also accumulate Shh, the second moment of the token states.
    n_classes : number of classes C (default: the dataset's class names, else max(label) + 1).
    progress : show a progress bar.
    float64_where_rounded : pass again, with float64 products, the layers whose float32 token products' rounding
        reaches C0's retained range (default); False keeps their float32 products (the reach is recorded all
        the same; ``float64_layers`` is then empty).
    metadata : extra provenance recorded with the result.
    keep_on_device : on a GPU, keep every finalised moment on the device as well as on the host,
        for as long as the returned moments live: the torch analysis backend (``device=`` of the
        sweeps, intervals, diagnostics, estimates) then reads them there instead of copying them
        back (at the Llama-3-8B shape 17.7 GB for one extraction; the host copy is made all the
        same, for saving and the host-side analysis). Off by default: the device memory stays taken
        until the moments are freed. Changes no number and no cache key. `keeps_moments_on_device` says
        where it pays (the study's rule).

    Returns
    -------
    Extraction
        ``moments`` (the moments of every requested layer), ``labels`` (N,), ``class_names``,
        ``lengths`` (N,) valid positions per text, ``pooled`` (layer -> (N, d) mean-pooled
        features, texts in dataset order) when ``pooled_layers`` is given, ``shards`` (a list
        of ``shards`` layer moments) when asked, ``halves`` (half A, half B) with ``half_layers``,
        and ``metadata`` (settings, timing, provenance).
    """
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'float64', got {precision!r}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    batch_size = check_count(batch_size, "batch_size")
    text_set = as_text_set(data, n_classes=n_classes)
    N, C = len(text_set.texts), text_set.n_classes
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "mps":  # the totals, and the text products, are float64 on the device
        raise ValueError("extraction sums its moments in float64 on the device, which Apple's MPS does not have: "
                         "extract with device='cpu' (the model moved there) instead")
    precision = resolve_precision(precision, device)
    ids, starts, lengths = pooling_tokens(tokenizer, text_set.texts, max_length, drop_bos=drop_bos)
    pad_id = pad_token_id(tokenizer)

    rank, world = _distributed()
    n_shards = int(shards) if shards else 1
    if shards is not None and (int(shards) < 2 or int(shards) > N):
        raise ValueError(f"shards must be between 2 and the number of texts ({N}), got {shards}")
    shard_of = shard_assignment(N, n_shards, shard_seed)

    all_layers = hidden_state_layers(model)
    layers, pooled_layers, shard_layers, half_layers = (
        resolve_layer_indices(spec, all_layers, name) for spec, name in
        ((layers, "layers"), (pooled_layers, "pooled_layers"), (shard_layers, "shard_layers"),
         (half_layers, "half_layers")))
    chosen = all_layers if layers == "all" else sorted({int(layer) for layer in layers})
    bad_layers = [layer for layer in chosen if layer not in all_layers]
    if bad_layers:
        raise ValueError(f"layers {bad_layers} do not exist; the model has hidden states 0..{all_layers[-1]}")
    pooled_set = [] if pooled_layers is None else (chosen if pooled_layers == "all" else sorted({int(x) for x in pooled_layers}))
    if not set(pooled_set) <= set(chosen):
        raise ValueError(f"pooled_layers {pooled_set} must be among the extracted layers")
    kept_shard_layers = chosen if shard_layers is None else sorted({int(x) for x in shard_layers})
    kept_half_layers = [] if half_layers is None else sorted({int(x) for x in half_layers})
    if kept_half_layers and not shards:
        raise ValueError(f"half_layers {kept_half_layers} need shards >= 2: the halves are unions of shards "
                         "(split_halves), got shards=None")
    if not set(kept_half_layers) <= set(chosen):
        raise ValueError(f"half_layers {kept_half_layers} must be among the extracted layers {chosen}")
    half_of = np.zeros(n_shards, dtype=np.int64)
    if kept_half_layers:
        half_of[split_halves(n_shards, seed=half_seed)[1]] = 1
    d = hidden_size(model)

    # every text's (prefix, next state) pairs, known before the pass: each rank decides alike
    shard_pairs = np.bincount(shard_of, weights=lengths - 1, minlength=n_shards) if shards else [(lengths - 1).sum()]
    tokens_precision = token_precision(precision, fewest_pairs_read(shard_pairs), d)
    compute_dtype = torch.float32 if tokens_precision == "float32" else torch.float64
    asked_pooled_dtype = pooled_dtype  # "auto" follows each pass's token precision (see the float64 pass below)
    pooled_dtype = tokens_precision if pooled_dtype == "auto" else pooled_dtype
    pooled = {layer: np.zeros((N, d), dtype=pooled_dtype) for layer in pooled_set}
    # the rows cross to the host at the precision they are stored at (float32 rounded float64 features before)
    pooled_torch_dtype = torch.float64 if np.dtype(pooled_dtype).itemsize > 4 else torch.float32
    total = _Accumulator(chosen, d, C, device, token_moments, compute_dtype)
    timings: dict[str, float] = {}
    labels_t = torch.as_tensor(text_set.labels, device=device)
    shard_results: list[LayerMoments] = []
    # the halves' accumulators: one set for each half, filled by the batches of its shards
    half_accs = [_Accumulator(kept_half_layers, d, C, device, False, compute_dtype)
                 for _ in range(2)] if kept_half_layers else []
    started = time.perf_counter()
    mine = np.arange(N)[np.arange(N) % world == rank]
    bar = tqdm(total=len(mine), desc="extract", unit="text", disable=not progress or rank != 0)
    for shard in range(n_shards):
        # shards serve the interval bootstrap, which needs no Shh: leaving it out saves a quarter of their size
        acc = _Accumulator(kept_shard_layers, d, C, device, False, compute_dtype) if shards and kept_shard_layers else None
        for batch in _batches(mine[shard_of[mine] == shard], lengths, batch_size):
            inputs = pad_batch([ids[i] for i in batch], pad_id, padding_side, device)
            hidden = hidden_states(model, inputs)
            if len(hidden) != len(all_layers) or hidden[0].shape[-1] != d:
                raise ValueError(f"{type(model).__name__} returned {len(hidden)} hidden states of width "
                                 f"{hidden[0].shape[-1]}; its config says {len(all_layers)} of width {d}")
            valid = valid_mask([len(ids[i]) for i in batch], starts[batch], inputs.input_ids.shape[1], padding_side,
                               device)
            y = torch.nn.functional.one_hot(labels_t[batch], C).to(compute_dtype)
            batch_counts = valid.sum(dim=1, keepdim=True)
            pair = valid[:, :-1] & valid[:, 1:]
            targets = [total] + ([acc] if acc is not None else []) + half_accs[half_of[shard]:half_of[shard] + 1]
            for target in targets:
                target.class_counts += y.sum(dim=0).double()
                target.n_texts += len(batch)
                target.n_pairs += pair.sum().double()
            pair_rows = pair.flatten().nonzero().squeeze(1)  # one host sync per batch, not per layer
            finite, pooled_rows = [], []
            for layer in chosen:
                factors, xbar = layer_factors(hidden[layer], valid, pair_rows, batch_counts, y, compute_dtype,
                                              token_moments, total.shh_from_identity)
                # a NaN/inf at any valid position reaches the pooled vector of its text
                finite.append(torch.isfinite(xbar).all())
                for target in targets:
                    if layer in target.sums:
                        target.sums[layer]["x_sum"] += factors["Sxx"][0].sum(dim=0)  # float64, as Sxx
                        for name, (a, b) in factors.items():
                            if name in target.sums[layer]:  # shard accumulators carry no Shh
                                target.add(layer, name, a, b)
                if layer in pooled:
                    pooled_rows.append((layer, xbar.to(pooled_torch_dtype)))
            finite = torch.stack(finite).cpu().numpy()  # the batch's one device->host sync, with the pooled rows
            if pooled_rows:
                host = torch.stack([rows for _, rows in pooled_rows]).cpu().numpy()
                for (layer, _), rows in zip(pooled_rows, host):
                    pooled[layer][batch] = rows
            if not finite.all():
                bad = [chosen[i] for i in np.flatnonzero(~finite)]
                raise ValueError(f"hidden states of layer {bad[0]} contain NaN/inf (layers {bad[:10]}; "
                                 f"texts {batch[:10].tolist()} of this batch)")
            bar.update(len(batch))
        if acc is not None:
            if world > 1:
                acc.all_reduce()
            shard_results.append(acc.to_layer_moments({"shard": shard, "n_shards": n_shards}, timings,
                                                      keep_on_device=keep_on_device))
    bar.close()
    half_results = []
    for i, half in enumerate(half_accs):
        if world > 1:
            half.all_reduce()
        half_results.append(half.to_layer_moments(
            {"half": i, "shards_of_half": np.flatnonzero(half_of == i).tolist(), "n_shards": n_shards,
             "half_seed": half_seed}, timings, keep_on_device=keep_on_device))
    if world > 1:
        total.all_reduce()
        for layer in pooled:
            pooled[layer] = _all_gather_rows(pooled[layer], mine, N)
    timings["pass"] = _Clock(device).last - started - sum(timings.values())
    moments = total.to_layer_moments({}, timings, keep_on_device=keep_on_device)
    rounding, again = None, []
    if tokens_precision == "float32":  # where the rounding reaches C0's range (the pooled moments and the halves)
        rounding = {str(layer): token_rounding(moments[layer].C0, device) for layer in chosen}
        for half in half_results:
            for layer in half.layers:
                rounding[str(layer)] = max(rounding[str(layer)], token_rounding(half[layer].C0, device))
        again = [layer for layer in chosen if rounding[str(layer)] > 0] if float64_where_rounded else []
        if world > 1:  # one decision for every rank (each calls the pass again, or none does)
            again = _broadcast_from_rank0(again)
        timings["rounding_check"] = _Clock(device).last - started - sum(timings.values())
    meta = {
        "n_texts": N, "n_classes": C, "class_names": text_set.class_names, "layers": chosen,
        "max_length": max_length, "drop_bos": drop_bos, "bos_dropped": int(starts.sum()),
        "n_truncated": int(sum(len(t) >= max_length for t in ids)), "precision": precision,
        "token_precision": tokens_precision, "token_rounding": rounding, "float64_layers": again,
        "padding_side": padding_side, "batch_size": batch_size, "token_moments": token_moments,
        "shards": shards, "shard_seed": shard_seed, "world_size": world,
        **({"half_layers": kept_half_layers, "half_seed": half_seed} if kept_half_layers else {}),
        "mean_length": float(lengths.mean()), "seconds": round(time.perf_counter() - started, 3),
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        "extract_version": EXTRACT_VERSION, **(metadata or {}),
    }
    result = Extraction(
        moments=moments, labels=text_set.labels, class_names=text_set.class_names,
        lengths=lengths, pooled=pooled or None, shards=shard_results or None, halves=half_results or None,
        metadata=meta,
    )
    if again:  # the layers whose float32 products' rounding reached C0's range: their products again, in float64
        second = extract(
            model, tokenizer, (text_set.texts, text_set.labels), layers=again, batch_size=batch_size,
            max_length=max_length, drop_bos=drop_bos, device=device, precision="float64",
            pooled_layers=[layer for layer in pooled_set if layer in again], pooled_dtype=asked_pooled_dtype,
            padding_side=padding_side, shards=shards, shard_layers=[x for x in kept_shard_layers if x in again],
            shard_seed=shard_seed, half_layers=[x for x in kept_half_layers if x in again], half_seed=half_seed,
            token_moments=token_moments, n_classes=C, progress=progress, keep_on_device=keep_on_device)
        result = _with_layers_of(result, second)
        meta["timings_s"]["float64_pass"] = second.metadata["seconds"]
        meta["seconds"] = round(time.perf_counter() - started, 3)
    moments = result.moments
    moments.metadata.update(meta)
    return result


def _with_layers_of(first: Extraction, second: Extraction) -> Extraction:
    """``first`` with the moments (pooled, shards, halves) and pooled features of ``second``'s layers in place of
    its own: the same texts, shards and halves, passed again for some layers."""

    def replaced(mine: LayerMoments, theirs: LayerMoments) -> LayerMoments:
        return LayerMoments({**{layer: mine[layer] for layer in mine}, **{layer: theirs[layer] for layer in theirs}},
                            mine.metadata)

    def each(mine: list[LayerMoments] | None, theirs: list[LayerMoments] | None) -> list[LayerMoments] | None:
        return mine if mine is None or theirs is None else [replaced(a, b) for a, b in zip(mine, theirs)]

    return dataclasses.replace(
        first, moments=replaced(first.moments, second.moments),
        pooled=None if first.pooled is None else {**first.pooled, **(second.pooled or {})},
        shards=each(first.shards, second.shards), halves=each(first.halves, second.halves))


def layer_factors(
    h: torch.Tensor, valid: torch.Tensor, pair_rows: torch.Tensor, counts: torch.Tensor, y: torch.Tensor,
    compute_dtype: torch.dtype, token_moments: bool, shh_from_identity: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One layer's contribution of one batch to the moment sums, as factors: sum += a^T b.

    ``h`` (B, T, d) states; ``valid`` (B, T) positions that count; ``pair_rows`` flat indices
    into (B, T-1) of the positions t with t and t+1 valid; ``counts`` (B, 1) valid positions per
    text; ``y`` (B, C) one-hot. Returns {moment: (a, b)} and the pooled vectors ``xbar`` (B, d).
    With ``shh_from_identity`` the Shh entry is "SS", the text totals' outer products (see
    `_Accumulator`); otherwise Shh's own token-level product.

    Parameters
    ----------
    h : Tensor, shape (B, T, d)
        Hidden states of one layer.
    valid : Tensor of bool, shape (B, T)
    pair_rows : Tensor of int, shape (P,)
        Flat indices into (B, T-1) of the P positions t with t and t+1 valid.
    counts : Tensor, shape (B, 1)
        Valid positions per text.
    y : Tensor, shape (B, C)
        One-hot labels.
    compute_dtype : torch.dtype
        Precision of the token factors (those of `TEXT_PRODUCTS` are float64).
    token_moments : bool
        Include the Shh (or SS) entry.
    shh_from_identity : bool
        Give "SS" (totals (B, d), twice) instead of "Shh" (token states (B*T, d), twice).

    Returns
    -------
    factors : dict of str to (Tensor, Tensor)
        "Sxx": (xbar, xbar), "Sxy": (xbar, y), "C0": (prefix, prefix) and "C1": (prefix,
        following) with prefix and following (P, d), and "Shh" or "SS" with ``token_moments``.
    xbar : Tensor, shape (B, d)
        Mean of each text's valid states.
    """
    d = h.shape[-1]
    h = mask_states(h, valid, compute_dtype)
    totals = h.sum(dim=1)
    # in compute_dtype: under float32 the pooled features are then, as stored, the vectors Sxx and Sxy are formed
    # from, so probes fitted on them match the moments (docs/estimator.md, session 39: a float64 sum broke that)
    xbar = totals / counts
    # s_t = sum_{i<=t} h_i; zeros before the text, so left padding needs no special case
    prefix = torch.cumsum(h, dim=1)[:, :-1].reshape(-1, d).index_select(0, pair_rows)
    following = h[:, 1:].reshape(-1, d).index_select(0, pair_rows)
    pooled = xbar.double()  # `TEXT_PRODUCTS`: float64 whatever compute_dtype
    factors = {"Sxx": (pooled, pooled), "Sxy": (pooled, y.double()), "C0": (prefix, prefix),
               "C1": (prefix, following)}
    if token_moments:
        if shh_from_identity:
            factors["SS"] = (totals, totals)
        else:
            flat = h.reshape(-1, d)
            factors["Shh"] = (flat, flat)
    return factors, xbar


def _broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the process group."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_rows(local: np.ndarray, mine: np.ndarray, N: int) -> np.ndarray:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, local[mine]))
    out = np.zeros_like(local)
    for rows, values in gathered:
        out[rows] = values
    return out


def shard_assignment(n_texts: int, shards: int, seed: int = 0) -> np.ndarray:
    """The shard of each text, as `extract` assigns them (``shards``, ``shard_seed``): a seeded random
    permutation dealt out in turn, so shard sizes differ by at most one.

    Parameters
    ----------
    n_texts : number of texts N, in the order `extract` was given them.
    shards : number of shards S (1: every text in shard 0).
    seed : `extract`'s ``shard_seed``.

    Returns
    -------
    (N,) int64 array of shard indices 0..S-1.
    """
    shard_of = np.empty(n_texts, dtype=np.int64)
    shard_of[np.random.default_rng(seed).permutation(n_texts)] = np.arange(n_texts) % shards
    return shard_of


def fewest_pairs_read(shard_pairs) -> int:
    """A lower bound on the token pairs of the smallest part of a pass that NTPS or its interval reads: with
    S >= 4 shards a half of the default estimator's split less one of its shards (at least the S // 2 - 1 shards
    with the fewest pairs, whatever the split), with 2 or 3 the pass less its largest shard (a jackknife
    replicate), without shards the pass.

    Parameters
    ----------
    shard_pairs : the (prefix, next state) pairs of each shard (one entry: a pass without shards).

    Returns
    -------
    int.
    """
    pairs = np.sort(np.asarray(shard_pairs, dtype=np.int64))
    if len(pairs) >= 4:
        return int(pairs[: len(pairs) // 2 - 1].sum())
    return int(pairs.sum() - (pairs[-1] if len(pairs) > 1 else 0))


def token_precision(precision: str, n_pairs: int, d: int) -> str:
    """The precision of a pass's token products (C0, C1, Shh): float64 where ``precision`` is "float64"
    or the smallest part of the pass that is read has at most `FLOAT64_TOKEN_PAIRS_PER_DIM` x d token
    pairs, else ``precision``.

    Parameters
    ----------
    precision : "float32" or "float64" (resolved: `resolve_precision`).
    n_pairs : the (prefix, next state) pairs of the smallest part of the pass that is read
        (`fewest_pairs_read`; the pass's own, ``n_tokens`` of its moments, without shards).
    d : hidden size.

    Returns
    -------
    "float32" or "float64".
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64' here (resolved), got {precision!r}")
    return "float64" if precision == "float64" or n_pairs <= FLOAT64_TOKEN_PAIRS_PER_DIM * d else "float32"


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The products' precision that ``"auto"`` means on ``device``; other values are returned as given.

    float64 on a CPU and on CUDA devices with full-rate float64 (compute capability 6.0, 7.0, 8.0,
    9.0, 10.0: P100, V100, A100, H100/H200, B200), where it costs little or nothing more than float32;
    float32 elsewhere (consumer GPUs run float64 at 1/32-1/64 of the float32 rate; Apple's MPS has
    no float64).

    Parameters
    ----------
    precision : str
        "auto", "float32" or "float64".
    device : str or torch.device

    Returns
    -------
    str
        "float32" or "float64" (``precision`` itself unless it is "auto").
    """
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cpu":
        return "float64"
    if device.type != "cuda":
        return "float32"
    major, minor = torch.cuda.get_device_capability(device)
    return "float64" if minor == 0 and major in (6, 7, 8, 9, 10) else "float32"


def extraction_key(model_info: dict[str, Any], text_set: TextSet, settings: dict[str, Any]) -> str:
    """Content key of an extraction: model identity, the exact texts and labels, the settings.

    Parameters
    ----------
    model_info : dict
        The model's info (`ntps_nb.models.ModelInfo.as_dict`); its name, weights_sha256, dtype,
        model_type and n_params enter the key.
    text_set : TextSet
        The texts and labels (their fingerprint enters the key).
    settings : dict
        The extraction settings that decide the numbers.

    Returns
    -------
    str
        16 hex digits (`ntps_nb.cache.content_key`), also covering the package and extraction
        versions.
    """
    from ntps_nb import __version__

    identity = {name: model_info.get(name) for name in ("name", "weights_sha256", "dtype", "model_type", "n_params")}
    return content_key({"model": identity, "data": text_set.fingerprint(), "settings": settings,
                        "version": __version__, "extract_version": EXTRACT_VERSION})


_EXTRACT_PARAMETERS = inspect.signature(extract).parameters


#: The settings of `extract` that name hidden states (`resolve_layer_indices`).
LAYER_SETTINGS = ("layers", "pooled_layers", "shard_layers", "half_layers")


def resolve_layer_indices(spec: Any, all_layers: list[int], name: str = "layers") -> Any:
    """A layer setting with its negative hidden-state indices counted from the last (-1: the last).

    Parameters
    ----------
    spec : "all", None or iterable of int
        The setting as given; "all" and None are returned as they are.
    all_layers : list of int
        The model's hidden states, ``0..L`` (`ntps_nb.models.hidden_state_layers`).
    name : str
        The setting's name, for the error.

    Returns
    -------
    "all", None or list of int
        The indices, negatives resolved, in the order given.

    Raises
    ------
    ValueError
        On a negative index beyond the first hidden state.
    """
    if spec is None or isinstance(spec, str):
        return spec
    resolved = []
    for layer in spec:
        layer = int(layer)
        if layer < -len(all_layers):
            raise ValueError(f"{name}: layer {layer} does not exist; the model has hidden states 0..{all_layers[-1]}")
        resolved.append(all_layers[layer] if layer < 0 else layer)
    return resolved


def _settings_with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide an extraction's numbers, with `extract`'s defaults filled in, so
    that passing a default explicitly or leaving it out gives the same cache key."""
    parameters = _EXTRACT_PARAMETERS
    unknown = set(settings) - set(parameters)
    if unknown:
        raise TypeError(f"unknown extraction settings: {sorted(unknown)}")
    full = {name: settings.get(name, p.default) for name, p in parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("progress", "device", "metadata", "keep_on_device")}
    if not full["half_layers"]:  # added later: without halves the keys of the stored entries stand
        del full["half_layers"], full["half_seed"]
    return {k: (sorted(v) if isinstance(v, (set, list, tuple, range)) else v) for k, v in full.items()}


#: Moments of an extraction that stay on its device as resident copies (`keep_moments_resident`): the
#: arrays `extract(..., keep_on_device=True)` finalises there (Syy, C x C, is formed on the host).
RESIDENT_MOMENTS = ("Sxx", "Sxy", "C0", "C1", "x_mean", "Shh")
#: Share of a GPU's memory an extraction's moments may keep taking for an analysis there
#: (`keeps_moments_on_device`).
RESIDENT_MEMORY_SHARE = 0.4


def keep_moments_resident(extraction: Extraction, device: str | torch.device) -> Extraction:
    """Copy an extraction's moments (every layer's, the shards', the halves') to ``device`` once and record
    each copy as its host array's resident copy (`ntps_nb.core.backends.torch.keep_resident`), as
    `extract(..., keep_on_device=True)` leaves a fresh extraction: the torch backend then reads the copies
    instead of sending the arrays to ``device`` on every call. `extract_cached` does this for an entry it
    loads when ``keep_on_device`` is set. On the CPU the copies share the arrays' memory (nothing is copied).
    A copy goes when its array is freed.

    Parameters
    ----------
    extraction : Extraction
        Moments on the host (an `Extraction` loaded from the cache, say); they are not modified.
    device : str or torch.device
        Where the analysis will solve them ("cuda", "cuda:1", "cpu").

    Returns
    -------
    Extraction
        ``extraction`` itself.
    """
    from ntps_nb.core.backends.torch import check_device, make_resident

    device = check_device(device)
    for layer_moments in [extraction.moments, *(extraction.shards or []), *(extraction.halves or [])]:
        for layer in layer_moments.layers:
            for name in RESIDENT_MOMENTS:
                if (array := getattr(layer_moments[layer], name)) is not None:
                    make_resident(array, device)
    return extraction


def keeps_moments_on_device(analysis_device: Any, model_device: Any, d: int | None, n_layers: int,
                            settings: Mapping[str, Any]) -> bool:
    """Whether an extraction should keep its moments on the model's device for the analysis
    (`extract`'s and `extract_cached`'s ``keep_on_device``): when the analysis runs on a CUDA device, the
    model's, and the moments take at most `RESIDENT_MEMORY_SHARE` of its memory: 4 float64 d x d matrices
    a layer, 3 for each of the ``shards`` at each of the ``shard_layers`` and 3 for each of the two halves
    at each of the ``half_layers``.

    Parameters
    ----------
    analysis_device : None (numpy), or the torch device the analysis solves on.
    model_device : the device the model's parameters are on (and the extraction's sums).
    d : int or None
        The hidden size (None or 0: unknown, and the moments are not kept).
    n_layers : int
        The number of layers whose moments the extraction keeps.
    settings : Mapping
        The extraction's settings (``shards``, ``shard_layers``, ``half_layers`` are read).

    Returns
    -------
    bool
    """
    from ntps_nb.core.backends.torch import check_device

    if analysis_device is None or not str(analysis_device).startswith("cuda") or not d:
        return False
    if torch.device(model_device).type != "cuda":
        return False
    analysis = check_device(analysis_device)  # "cuda" is the current device, as torch places tensors
    if analysis != check_device(model_device):  # the backend reads a resident copy only on its own device
        return False
    shards = (settings.get("shards") or 0) * len(settings.get("shard_layers") or [])
    halves = 2 * len(settings.get("half_layers") or [])
    nbytes = 8 * d * d * (4 * n_layers + 3 * shards + 3 * halves)
    return nbytes <= RESIDENT_MEMORY_SHARE * torch.cuda.get_device_properties(analysis).total_memory


def extract_cached(
    model: torch.nn.Module,
    tokenizer,
    model_info: Any,
    data: Any,
    *,
    cache: str | os.PathLike | None = None,
    dataset_info: dict[str, Any] | None = None,
    **settings: Any,
) -> Extraction:
    """`extract` behind a content-addressed cache: the same model weights, texts, labels and
    settings load the stored result; anything else computes and stores a new entry atomically.

    Parameters
    ----------
    model, tokenizer : a Hugging Face causal LM and its tokenizer.
    model_info : ModelInfo or dict
        The model's identity (see `extraction_key`).
    data : as for `extract`.
    cache : str or PathLike, optional
        Cache folder (default ``cache_dir("extractions")``); the entry is ``<cache>/<key>``.
    dataset_info : dict, optional
        Dataset provenance recorded in the metadata of a new entry.
    **settings
        Keyword arguments of `extract`; those that decide the numbers (with defaults filled in
        and "auto" precision resolved for the device) enter the key. With ``keep_on_device`` an entry
        loaded from the cache is made resident on the device as a fresh extraction is
        (`keep_moments_resident`).

    Returns
    -------
    Extraction
        As `extract` returns it, loaded from the cache when the entry exists.

    Raises
    ------
    TokenizerMismatchError
        When the stored entry's model info fingerprints another tokenizer than ``model_info``'s
        (entries written before the fingerprint are not checked).
    ValueError
        When the stored entry cannot be read (damaged after it was written): the message names its folder.
    """
    info = model_info.as_dict() if hasattr(model_info, "as_dict") else dict(model_info)
    all_layers = hidden_state_layers(model)  # -1 and the last index are one entry (the key sorts the lists)
    settings = {**settings, **{name: resolve_layer_indices(settings[name], all_layers, name)
                               for name in LAYER_SETTINGS if name in settings}}
    text_set = as_text_set(data, n_classes=settings.get("n_classes"))
    key_settings = _settings_with_defaults(settings)
    device = settings.get("device") or next(model.parameters()).device
    key_settings["precision"] = resolve_precision(key_settings["precision"], device)  # "auto" differs by device
    key = extraction_key(info, text_set, key_settings)
    folder = Path(cache) if cache is not None else cache_dir("extractions")
    entry = folder / key
    if (entry / "extraction.json").is_file():
        stored = read_entry(Extraction.load, entry, "extraction")
        check_same_tokenizer(stored.metadata.get("model", {}).get("tokenizer_sha256"), info.get("tokenizer_sha256"),
                             f"the cached extraction {entry} (point `cache=` at another folder, or delete it)")
        if settings.get("keep_on_device"):  # as a fresh extraction would have kept them
            keep_moments_resident(stored, device)
        return stored
    metadata = {"model": info, "dataset": dataset_info or {}, "cache_key": key, **settings.get("metadata", {})}
    result = extract(model, tokenizer, text_set, **{**settings, "metadata": metadata})
    result.save(entry)
    return result
