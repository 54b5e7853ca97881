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
from typing import Any

from ntps_nb.core.atomic import atomic_path

__all__ = ["CACHE_ENV", "atomic_path", "cache_dir", "content_key", "sha256_file"]

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
