"""A daemon buffer mapped into the trainer: one uint8 tensor and one memoryview over the same pages.

The daemon creates a rank's buffers sparse (instantly); the trainer reserves their memory itself,
page tables included, with one ``madvise(MADV_POPULATE_WRITE)`` per slice (``segments.populate``,
which releases the GIL), on a background thread started as soon as the buffer is mapped
(``reserve_in_background``), so that the first snapshot into a buffer finds its pages ready and
the trainer thread never waits for it. A copy that outruns that thread reserves the pages it is
about to write itself (``reserve``), so no byte is ever written into memory that is not reserved:
on a full tmpfs the snapshot fails with an error instead of the process dying of SIGBUS.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import torch

from ftd.errors import FtdError
from ftd.shm import segments
from ftd.units import format_size

log = logging.getLogger(__name__)

RESERVE_SLICE = 16 << 20  # bytes reserved per system call: small enough for a copy to follow closely


class Arena:
    def __init__(self, path: Path):
        self.path = path
        self.mapping = segments.Mapping(path, populate=False)
        self.view = self.mapping.view()
        self.tensor = torch.frombuffer(self.view, dtype=torch.uint8) if self.mapping.size else torch.empty(0, dtype=torch.uint8)
        self.cuda_registered = False
        self._reserved = 0  # [0, _reserved) is reserved and mapped writable
        self._reserve_lock = threading.Lock()
        self._failure: str | None = None
        self._closed = False

    @property
    def address(self) -> int:
        return self.tensor.data_ptr() if self.mapping.size else 0

    def reserve(self, end: int) -> None:
        """Make sure bytes [0, end) are reserved before anything writes them; FtdError if the memory is
        not there (a full tmpfs or memory limit)."""
        end = min(end, self.mapping.size)
        while self._reserved < end:
            with self._reserve_lock:
                lo = self._reserved
                if lo >= end:
                    return
                if self._failure is not None or self._closed:
                    raise FtdError(self._failure or f"buffer {self.path.name} is closed")
                hi = min(self.mapping.size, lo + RESERVE_SLICE)
                err = segments.populate(self.address + lo, hi - lo, write=True)
                if err == errno.EINVAL:  # a kernel before 5.14: reserve with fallocate, let the copy fault pages in
                    err = _fallocate(self.path, lo, hi - lo)
                if err:
                    self._failure = (f"cannot reserve {format_size(self.mapping.size)} of shared memory for "
                                     f"{self.path} ({os.strerror(err)}): the tmpfs ({self.path.parent}) or the "
                                     f"memory limit is full; free memory, raise the tmpfs size, or snapshot less state")
                    raise FtdError(self._failure)
                self._reserved = hi

    def reserve_in_background(self) -> None:
        """Reserve the whole buffer on a thread of its own (a failure is reported by the next ``reserve``)."""
        def run() -> None:
            try:
                self.reserve(self.mapping.size)
            except FtdError as e:
                log.debug("ftd: background reservation of %s stopped: %s", self.path.name, e)
        if self._reserved < self.mapping.size:
            threading.Thread(target=run, name="ftd-reserve", daemon=True).start()

    def pin(self) -> None:
        """Page-lock the arena so device-to-host copies run asynchronously at full speed."""
        if not self.cuda_registered and self.mapping.size:
            self.reserve(self.mapping.size)
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.mapping.size, 0)
            if int(err) != 0:
                raise FtdError(f"cudaHostRegister of {self.mapping.size} bytes failed with error {err}")
            self.cuda_registered = True

    def same_file(self) -> bool:
        """Whether the path still names the file this arena maps (a restarted daemon may have replaced it)."""
        try:
            return os.stat(self.path).st_ino == self.mapping.inode
        except OSError:
            return False

    def close(self) -> None:
        with self._reserve_lock:  # never unmap under a reservation in progress
            self._closed = True
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor
        try:
            self.view.release()
        except (BufferError, ValueError):
            pass  # a tensor still views the arena; the mapping goes with it
        self.mapping.close()


def _fallocate(path: Path, offset: int, length: int) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as e:
        return e.errno or errno.EIO
    try:
        os.posix_fallocate(fd, offset, length)
        return 0
    except OSError as e:
        return e.errno or errno.EIO
    finally:
        os.close(fd)


def close_in_background(arena: Arena) -> None:
    """Unmapping a large buffer takes tens of ms per GiB; the restored trainer need not wait for it."""
    threading.Thread(target=arena.close, name="ftd-unmap", daemon=True).start()
