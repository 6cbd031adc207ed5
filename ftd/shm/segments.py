"""Shared-memory segments: files in a tmpfs directory (``/dev/shm``), mode 0600, mapped with mmap.

Not ``multiprocessing.shared_memory``: on Python < 3.13 it registers every segment with a
resource tracker that unlinks it when the creating process dies, which would throw away exactly
the snapshots a restarted daemon is meant to adopt.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path

from ftd.errors import Refused
from ftd.util.files import write_atomic


def create(path: Path, size: int) -> None:
    """Create a segment of ``size`` bytes with its memory reserved now (posix_fallocate), so the
    trainer never meets a SIGBUS on a full tmpfs and never pays the first-touch cost."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise Refused(f"cannot reserve {size} bytes in {path.parent}: the tmpfs is full "
                              f"(raise its size or lower the state size)") from None
            raise
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    os.close(fd)


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_POPULATE_SLICE = 16 << 20


class Mapping:
    """A segment mapped read-write into this process.

    ``populate`` pre-faults the page tables so the first copy into the buffer runs at memory
    speed. It is done with madvise(MADV_POPULATE_WRITE) in 16 MiB slices rather than MAP_POPULATE:
    Python holds the GIL during mmap() and madvise(), and one MAP_POPULATE of a GiB would freeze the
    trainer thread for a third of a second.
    """

    def __init__(self, path: Path, *, populate: bool = True, writable: bool = True):
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
            self.size = st.st_size
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        self.path = path
        if populate and writable and self.size:
            self._prefault()

    def _prefault(self) -> None:
        try:
            for lo in range(0, self.size, _POPULATE_SLICE):
                self.mm.madvise(_MADV_POPULATE_WRITE, lo, min(_POPULATE_SLICE, self.size - lo))
        except OSError:  # an older kernel: let the first copy fault the pages in
            pass

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a tensor still views it; the mapping goes when that tensor does


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def meta_path(segment: Path) -> Path:
    return segment.with_name(segment.name + ".meta")


def write_meta(segment: Path, obj: dict) -> None:
    """Write the sidecar that marks the segment as holding a complete version: temp name, then rename."""
    final = meta_path(segment)
    # tmpfs: no fsync; the temporary name keeps the segment's prefix, so a successor sweeps it up
    write_atomic(final, json.dumps(obj, separators=(",", ":")), fsync=False, tmp_name=final.name + ".tmp")


def drop_meta(segment: Path) -> None:
    unlink(meta_path(segment))


def read_meta(segment: Path) -> dict | None:
    try:
        with open(meta_path(segment), "rb") as f:
            obj = json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def list_prefix(directory: Path, prefix: str) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []
