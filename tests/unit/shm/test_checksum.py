import numpy as np

from ftd.shm.checksum import bad_chunks, checksums


def test_single_bit_flip_is_found_in_its_chunk():
    buf = bytearray(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    sums = checksums(memoryview(buf), len(buf), 4096)
    assert len(sums) == 25
    assert bad_chunks(memoryview(buf), len(buf), 4096, sums) == []
    buf[50_000] ^= 0x10
    assert bad_chunks(memoryview(buf), len(buf), 4096, sums) == [50_000 // 4096]


def test_bytes_past_nbytes_do_not_count():
    buf = bytearray(10_000)
    sums = checksums(memoryview(buf), 9000, 4096)
    buf[9500] = 1
    assert bad_chunks(memoryview(buf), 9000, 4096, sums) == []
