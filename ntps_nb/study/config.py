"""A study's settings: the TOML file (``[study]`` table) read into a frozen `StudyConfig`, the
layer grids resolved against a model, and the small helpers every part of the study shares."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tomllib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ntps_nb.cache import content_key

#: The tables every unit writes (``lora`` only when LoRA ran).
TABLES = ("ntps", "probes", "peers", "intervals", "diagnostics")
#: Significant digits kept in the CSVs: enough for every comparison, small enough for git.
CSV_FLOAT_FORMAT = "%.7g"
#: Where results go unless a config says otherwise (relative to the repository root).
RESULTS_ROOT = Path(__file__).resolve().parents[2] / "data" / "results"
#: Bump when what a unit computes changes, so old units are not mistaken for current ones.
STUDY_VERSION = 1


def _say(message: str) -> None:
    print(message, flush=True)  # progress lines reach nohup logs as they happen


class StudySettingsError(ValueError):
    """A study config is malformed, or results computed with different settings would mix."""


# -- configuration -------------------------------------------------------------------------------


_ADDED_LATER = {"precision": "float32"}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The grid (models x datasets) and the settings every unit shares.

    Layer grids accept "all", "last", "grid:N" (N evenly spaced hidden states, the first and the
    last included) or a list of hidden-state indices (0 = embeddings; negative indices count from
    the end, -1 = the last hidden state). ``k`` is "all" (every k = 1..r_V
    of the theory variant) or a list of integers.
    """

    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    max_train: int | None = 2000
    max_test: int | None = 1000
    seed: int = 0
    max_length: int = 256
    batch_size: int = 16
    drop_bos: bool = True
    precision: str = "float32"  # the extraction's products; see `settings` for why float32 is the default here
    layers: Any = "all"
    k: Any = "all"
    probes: tuple[str, ...] = ("heldout", "paper_in_sample")
    probe_layers: Any = "all"
    peers: bool = True
    peer_layers: Any = "all"
    shards: int = 20
    interval_layers: Any = (-1,)
    n_boot: int = 200
    interval_method: str = "basic"
    diagnostics: bool = True
    diagnostic_layers: Any = (-1,)
    diagnostic_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    diagnostic_fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
    n_perturb: int = 5
    n_permutations: int = 20
    lora: bool = False
    lora_budget: dict = dataclasses.field(default_factory=dict)
    cache_extractions: bool = False  # shards: 4 float64 d x d per interval layer (10.6 MB SmolLM2, 13.1 Gemma-3)
    analysis_threads: int | None = 1  # BLAS threads of the numpy/scipy/sklearn part (None: library default)
    torch_threads: int | None = 1  # torch intra-op threads of the forward passes (None: torch's default)
    device: str = "cpu"  # where the models run ("cpu", "cuda", "cuda:1"); recorded per unit, not in the hash
    results_dir: str | None = None
    source: str | None = None  # the TOML file, for messages only

    def settings(self) -> dict[str, Any]:
        """Everything that changes a unit's numbers (not the grid, not where results go)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("name", "models", "datasets", "results_dir", "source", "cache_extractions",
                             "analysis_threads", "torch_threads", "device")}
        out["study_version"] = STUDY_VERSION
        # Keys added after units were committed enter the hash only away from the value those units
        # were computed with, so that adding the key did not make them stale. precision: every unit
        # before it was computed on a CPU with float32 products (the then default of "auto").
        for key, before in _ADDED_LATER.items():
            if out[key] == before:
                del out[key]
        return json.loads(json.dumps(out, default=list))

    @property
    def config_hash(self) -> str:
        """Content key of `settings`: the column `combine` checks."""
        return content_key(self.settings(), length=12)

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) if self.results_dir else RESULTS_ROOT / self.name

    def units(self) -> list[tuple[str, str]]:
        return [(model, dataset) for model in self.models for dataset in self.datasets]

    def unit_folder(self, model: str, dataset: str) -> Path:
        return self.folder / "units" / unit_name(model, dataset)


def unit_name(model: str, dataset: str) -> str:
    """Folder name of a unit: ``<model>__<dataset>`` with path-unsafe characters replaced."""
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "-" for c in s)  # noqa: E731
    return f"{safe(model)}__{safe(dataset)}"


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_config(path: str | os.PathLike, **overrides: Any) -> StudyConfig:
    """Read a study TOML (its ``[study]`` table) into a `StudyConfig`; ``overrides`` replace keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study config at {path}")
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    if "study" not in raw:
        raise StudySettingsError(f"{path} has no [study] table (it has {sorted(raw)})")
    table = {**raw["study"], **overrides}
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise StudySettingsError(f"{path}: unknown key(s) {unknown}; known: {sorted(known - {'source'})}")
    for key in ("name", "models", "datasets"):
        if key not in table:
            raise StudySettingsError(f"{path}: [study] needs {key!r}")
    if not table["models"] or not table["datasets"]:
        raise StudySettingsError(f"{path}: models and datasets must be non-empty lists")
    unknown_probes = sorted(set(table.get("probes", [])) - {"heldout", "paper_in_sample"})
    if unknown_probes:
        raise StudySettingsError(f"{path}: unknown probe protocol(s) {unknown_probes}")
    if table.get("precision", "float32") not in ("float32", "float64"):
        raise StudySettingsError(f"{path}: precision must be float32 or float64 (a study records one, not 'auto')")
    if table.get("interval_method", "basic") not in ("percentile", "basic", "bca"):
        raise StudySettingsError(f"{path}: interval_method must be percentile, basic or bca")
    table = {key: _tuple(value) for key, value in table.items()}
    if table.get("results_dir") and not Path(table["results_dir"]).is_absolute():
        table["results_dir"] = str((path.parent / table["results_dir"]).resolve())
    return StudyConfig(**table, source=str(path))


def resolve_layers(spec: Any, available: Sequence[int], what: str = "layers") -> list[int]:
    """Hidden-state indices of a layer spec ("all", "last", "grid:N", or a list; negatives count from the end)."""
    available = sorted(int(layer) for layer in available)
    if spec == "all":
        return available
    if spec == "last":
        return [available[-1]]
    if isinstance(spec, str) and spec.startswith("grid:"):  # N evenly spaced layers, first and last included
        count = int(spec[len("grid:"):])
        picks = np.unique(np.round(np.linspace(0, len(available) - 1, max(count, 1))).astype(int))
        return [available[i] for i in picks]
    if spec in (None, False) or spec == ():
        return []
    chosen = []
    for layer in (spec if isinstance(spec, (list, tuple)) else [spec]):
        layer = int(layer)
        resolved = available[layer] if layer < 0 else layer
        if resolved not in available:
            raise StudySettingsError(f"{what}: layer {layer} does not exist (hidden states {available[0]}..{available[-1]})")
        chosen.append(resolved)
    return sorted(set(chosen))


def _readable(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; results are meant to be shared."""
    path.chmod(0o755 if path.is_dir() else 0o644)
    if path.is_dir():
        for child in path.iterdir():
            child.chmod(0o644)



def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "pandas", "scikit-learn", "torch", "transformers", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out

