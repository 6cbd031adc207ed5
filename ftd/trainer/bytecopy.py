"""Copying bytes between CPU tensors on the calling thread alone.

``Tensor.copy_`` of a large CPU tensor runs on torch's intra-op OpenMP pool, and that pool belongs to
the calling thread: the first large copy on one of ftd's own threads (the copier) starts a second
OpenMP team for it, as many threads as the process has cores, which spin-wait at their barriers on
the very cores the trainer's compute threads need (issue #20; README "On a busy host").
``torch.set_num_threads(1)`` on ftd's thread would avoid that, but it also sets the count every
thread started later begins with, the trainer's main thread included if it has not computed yet.
The copier's copies are of contiguous bytes, so they go through ``memmove`` instead: one thread, with
the GIL released (a ctypes call).
"""
from __future__ import annotations

import ctypes
import os

import torch

#: ``scripts/bench_busy_host.py``'s mode ``ftd-torchcopy``: the copier's copies through ``copy_`` as before
TORCH_COPY = os.environ.get("FTD_DEBUG_TORCH_COPY") == "1"


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` on this thread alone for two contiguous CPU tensors of one dtype and size;
    anything else (CUDA, strided, a conversion) through ``copy_``."""
    n = dst.numel() * dst.element_size()
    if (not TORCH_COPY and dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.numel() == src.numel() and dst.is_contiguous() and src.is_contiguous()):
        if n:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)
        return
    dst.copy_(src)
