"""Arenas and manifests as a trainer's client commits them, built in the test process."""
from __future__ import annotations

import torch

from ftd.shm.checksum import checksums
from ftd.shm.layout import Manifest, plan_layout
from ftd.trainer import statecodec

CHUNK = 4096


def make_version(state: dict, rng=None, padding: int = 0) -> tuple[bytearray, Manifest]:
    """An arena and its manifest as a trainer's client would commit them (``padding``: the byte
    left between tensors, which the trainer never writes)."""
    skeleton, tensors = statecodec.encode({"state": state, "rng": rng})
    layout = plan_layout([(statecodec.dtype_name(t.dtype), tuple(t.shape)) for t in tensors])
    data = bytearray([padding]) * layout.nbytes
    for s, t in zip(layout.slots, tensors):
        data[s.offset:s.end] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return data, Manifest(layout, CHUNK, tuple(checksums(memoryview(data), layout.nbytes, CHUNK)), skeleton)


def as_dtensor(skeleton: dict, key: str, **layout) -> None:
    """Turn the plain tensor node ``skeleton['state']['model'][key]`` into a DTensor shard node of a
    (replicate, shard) mesh."""
    model = skeleton["state"]["model"]
    node = model[key]
    stride = list(torch.empty(layout["shape"]).stride())
    model[key] = {statecodec.TAG: "dtensor", "index": node["index"], "mesh_dims": ["replicate", "shard"],
                  "stride": stride, **layout}
