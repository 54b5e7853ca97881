"""Atomic writes: a file or folder appears complete under its final name or not at all.

The one piece of file handling the core needs (`LayerMoments.save`); `ntps_nb.cache` builds its
content-addressed storage on it. It lives in the core so that the core imports nothing above it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only if the block succeeds.

    Parameters
    ----------
    final : str or PathLike
        Where the finished file or folder goes; its parent folder is created.
    directory : bool
        If True the temporary path is an empty folder, else an empty file.

    Yields
    ------
    Path
        The temporary path (``.<name>.partial-*`` beside ``final``), moved onto ``final`` with
        one ``os.replace`` when the block exits normally. On any exception (including
        KeyboardInterrupt) it is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
