"""The copy engine with a helping thread: chunks are taken one at a time by the copier and by the
trainer thread that reached the optimizer step early; every chunk is copied and hashed exactly
once, whichever thread took it, and an error on either side fails the copy."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from ftd.shm.checksum import ChunkHasher, checksums
from ftd.shm.layout import plan_layout
from ftd.trainer.copier import ChunkClaims, SnapshotJob, copy_and_hash

pytestmark = pytest.mark.timeout(60)
CHUNK = 1 << 12


def job_of(sources: list[torch.Tensor]) -> SnapshotJob:
    layout = plan_layout([(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in sources])
    return SnapshotJob(step=1, skeleton={}, layout=layout, sources=sources, versions=[None] * len(sources))


def expected_arena(job: SnapshotJob) -> bytearray:
    data = bytearray(job.layout.nbytes)
    for s, t in zip(job.layout.slots, job.sources):
        data[s.offset:s.end] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return data


@pytest.mark.parametrize("hash_threads", [1, 2])
def test_a_slow_copy_finishes_with_two_threads_and_every_chunk_hashed_once(hash_threads):
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(64, 100, generator=g), torch.randn(50, 30, generator=g).t(),  # one not contiguous
               torch.arange(5000, dtype=torch.int32), torch.zeros(0)]
    job = job_of(sources)
    arena = torch.zeros(job.layout.nbytes, dtype=torch.uint8)
    hasher = ChunkHasher(hash_threads)
    result: dict = {}
    copier = threading.Thread(target=lambda: result.update(sums=copy_and_hash(
        job, arena, memoryview(arena.numpy()), CHUNK, chunk_delay=0.01, hasher=hasher)))
    copier.start()
    while job.claims is None:  # the trainer thread arrives at the optimizer step mid-copy ...
        time.sleep(0.001)
    helped = job.claims.run(helping=True)  # ... and helps instead of waiting
    job.released.wait(30)
    copier.join(30)
    hasher.close()
    assert helped > 0 and job.phases["helped_chunks"] == helped
    assert helped < len(checksums(memoryview(bytearray(job.layout.nbytes)), job.layout.nbytes, CHUNK))
    want = expected_arena(job)
    assert bytes(arena.numpy()) == bytes(want)
    assert result["sums"] == checksums(memoryview(want), job.layout.nbytes, CHUNK)


def test_an_error_in_either_thread_fails_the_copy_and_stops_handing_out_chunks():
    taken: list[int] = []

    def work(c: int) -> None:
        taken.append(c)
        if c == 3:
            raise RuntimeError("copy failed")

    claims = ChunkClaims(10, work)
    assert claims.run(helping=True) == 4  # chunks 0..3: the fourth raised, none is handed out after it
    assert claims.all_done.is_set() and isinstance(claims.error, RuntimeError) and taken == [0, 1, 2, 3]
    assert claims.run() == 0
