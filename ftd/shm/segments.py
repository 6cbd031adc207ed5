"""Shared-memory segments: files in a tmpfs directory (``/dev/shm``), mode 0600, mapped with mmap.

Not ``multiprocessing.shared_memory``: on Python < 3.13 it registers every segment with a
resource tracker that unlinks it when the creating process dies, which would throw away exactly
the snapshots a restarted daemon is meant to adopt.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
from pathlib import Path

from ftd.errors import Refused
from ftd.util.files import write_atomic


def create(path: Path, size: int, *, reserve: bool = True) -> None:
    """Create a segment of ``size`` bytes with its memory reserved now (posix_fallocate), so that
    nothing writing it meets a SIGBUS on a full tmpfs. ``reserve=False`` makes it sparse, at once:
    for a buffer whose writer reserves the pages itself before writing them (the trainer's arenas,
    ``ftd.trainer.arena``), off the daemon's loop."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            if reserve:
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
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


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)    # Linux >= 5.14
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_POPULATE_SLICE = 16 << 20
_PAGE = mmap.PAGESIZE
_libc = None


def populate(address: int, length: int, write: bool) -> int:
    """Fault in the page tables of [address, address + length) of this process in one system call
    (madvise MADV_POPULATE_READ or _WRITE), instead of one page fault per page on first access; on
    a sparse file, _WRITE allocates the pages, and returns an error where a write would have raised
    SIGBUS. Through ctypes, so the GIL is released meanwhile and several threads populate at once
    (Python's mmap.madvise holds it). Only whole pages inside the range are touched. Returns 0, or
    the errno: EINVAL where the kernel cannot (before Linux 5.14; the first access then faults the
    pages in as usual), ENOMEM or EFAULT where the memory is not there (a full tmpfs)."""
    global _libc
    lo = -(-address // _PAGE) * _PAGE
    hi = (address + length) // _PAGE * _PAGE
    if hi <= lo:
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(lo, hi - lo, _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


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
            self.size, self.inode = st.st_size, st.st_ino
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
