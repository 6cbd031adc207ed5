"""Writing files so that a reader sees the old content or the new, never half of it."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600, fsync: bool = True,
                 tmp_name: str | None = None) -> None:
    """Write ``data`` to a temporary name next to ``path``, fsync it (unless ``fsync`` is False: a file
    in tmpfs, whose durability nobody needs), and rename it into place.

    ``tmp_name`` (default ``.<name>.<pid>.tmp``) lets a caller whose directory is swept by name
    prefix (shared memory) keep the temporary file under that prefix, so a crash leaves nothing the
    sweep cannot see."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, payload)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that the renames inside it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte of ``data`` is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
