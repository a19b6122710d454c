"""Output files: atomic writes (a reader, or a crash, never sees a half-written file) and the check
that an output path can be written, made before any work."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable) -> None:
    """``write(fh)`` into a temporary file next to ``path``, then rename it onto ``path``. On any
    failure the temporary file is removed and ``path`` is left as it was. The file gets the usual
    permissions (0666 minus the umask), not mkstemp's owner-only ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_atomic(path, lambda fh: fh.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_jsonl_atomic(path: str | os.PathLike, rows) -> None:
    write_atomic(path, lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_output_path(path: str, *, folder: bool, flag: str = "--output") -> None:
    """Fail before any compute if ``path`` cannot receive the output: a folder where a file goes (or
    a file where a folder goes), or a nearest existing parent that is a file or is not writable."""
    from .config import ConfigError

    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise ConfigError(f"{flag} {p}: is a {'folder' if p.is_dir() else 'file'}; expected "
                          f"{'a folder (it is created if missing)' if folder else 'a file path'}")
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {p}: {parent} is a file, so {p} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {p}: {parent} is not writable")
