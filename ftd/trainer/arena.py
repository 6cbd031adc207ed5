"""A daemon buffer mapped into the trainer: one uint8 tensor and one memoryview over the same pages."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ftd.errors import FtdError
from ftd.shm import segments


class Arena:
    def __init__(self, path: Path, populate: bool = True):
        self.mapping = segments.Mapping(path, populate=populate)
        self.view = self.mapping.view()
        self.tensor = torch.frombuffer(self.view, dtype=torch.uint8) if self.mapping.size else torch.empty(0, dtype=torch.uint8)
        self.cuda_registered = False

    def pin(self) -> None:
        """Page-lock the arena so device-to-host copies run asynchronously at full speed."""
        if not self.cuda_registered and self.mapping.size:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.mapping.size, 0)
            if int(err) != 0:
                raise FtdError(f"cudaHostRegister of {self.mapping.size} bytes failed with error {err}")
            self.cuda_registered = True

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor
        try:
            self.view.release()
        except (BufferError, ValueError):
            pass  # a tensor still views the arena; the mapping goes with it
        self.mapping.close()


def close_in_background(arena: Arena) -> None:
    """Unmapping a large buffer takes tens of ms per GiB; the restored trainer need not wait for it."""
    threading.Thread(target=arena.close, name="ftd-unmap", daemon=True).start()
