"""Content-addressed, atomic storage shared by model conversion, dataset builds and extraction.

An entry is either a single file or a folder. It is written under a temporary name in the same
directory and moved into place with one ``os.replace`` (`atomic_path`, from `ntps_nb.core.atomic`), so an
interrupted write never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from ntps_nb.core.atomic import atomic_path

T = TypeVar("T")

__all__ = ["CACHE_ENV", "atomic_path", "cache_dir", "content_key", "read_entry", "sha256_file"]

CACHE_ENV = "NTPS_NB_CACHE"


def cache_dir(*parts: str) -> Path:
    """Root of the ntps_nb cache (``$NTPS_NB_CACHE`` or ``~/.cache/ntps_nb``), joined with parts.

    Parameters
    ----------
    *parts : str
        Sub-folder names below the root.

    Returns
    -------
    Path
        The folder, created (with its parents) if it did not exist.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ntps_nb"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(fields: dict[str, Any], length: int = 16) -> str:
    """Stable hex key of a JSON-serialisable dict (sorted keys), used as an entry name.

    Parameters
    ----------
    fields : dict
        JSON-serialisable fields (values that are not are written with ``str``).
    length : int
        Number of hex characters kept.

    Returns
    -------
    str
        The first ``length`` hex digits of the sha256 of the canonical JSON.
    """
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Parameters
    ----------
    path : str or PathLike
    chunk : int
        Bytes read per step.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_entry(load: Callable[[Path], T], entry: str | os.PathLike, what: str) -> T:
    """``load(entry)`` for a cache entry, with an error that names the entry where it cannot be read.

    Entries are written whole (`atomic_path`), so an entry that fails to load was damaged after it
    was written (a truncated or edited file); deleting it makes the next call compute it again.

    Parameters
    ----------
    load : callable
        Reads the entry folder (e.g. ``Extraction.load``).
    entry : str or PathLike
        The entry's folder.
    what : str
        What the entry holds, for the message ("extraction", "LoRA result").

    Returns
    -------
    The loaded entry.

    Raises
    ------
    ValueError
        When ``load`` fails; the message names the folder and says to delete it.
    """
    try:
        return load(Path(entry))
    except Exception as error:  # whichever reader failed (numpy, zip, JSON, safetensors): the entry is damaged
        raise ValueError(f"the cached {what} {entry} cannot be read ({type(error).__name__}: {error}): it was "
                         "damaged after it was written; delete that folder and it is computed again") from error
