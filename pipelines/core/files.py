"""Files the package writes: atomically (a temporary sibling, then a rename) and with the user's umask.

``tempfile.mkstemp`` creates its file 0600 whatever the umask, so a file written through it and renamed
into place would be private while its neighbours are 0644. Every atomic writer chmods its temporary
file to ``0o666 & ~umask`` before the rename, as ``open()`` would have created it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["apply_umask", "atomic_write", "current_umask", "write_bytes_atomic", "write_text_atomic"]


def current_umask() -> int:
    """Returns the process's umask without changing it (Linux reads /proc; elsewhere a brief set-back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the only portable read is a write; set it straight back
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Gives a regular file the mode a plain ``open()`` would have: ``0o666 & ~umask``."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(temporary_path)``, fsyncs the result and renames it to ``path``; returns ``path``.

    The temporary file is removed when ``write`` fails, so nothing half-written is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        apply_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically with the user's umask; returns ``path``."""
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically with the user's umask; returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))
