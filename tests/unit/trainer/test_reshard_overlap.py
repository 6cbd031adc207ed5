"""Which part of a saved chunk a new rank's shard needs (the pure part of the resharded restore)."""
import pytest
import torch

from ftd.trainer.reshard import overlap

pytestmark = pytest.mark.timeout(30)


def test_overlap_of_row_blocks_and_of_2d_tiles():
    assert overlap([0, 0], [16, 8], [8, 0], [16, 8]) == [(8, 16), (0, 8)]
    assert overlap([0, 0], [8, 8], [8, 0], [8, 8]) is None          # touching is not sharing
    assert overlap([4, 2], [4, 4], [0, 0], [6, 3]) == [(4, 6), (2, 3)]
    assert overlap([0], [0], [0], [5]) is None                       # an empty shard needs nothing


@pytest.mark.parametrize("old,new", [(4, 2), (4, 3), (2, 4), (3, 5)])
def test_any_split_is_covered_exactly_once(old, new):
    """Rows split the way FSDP2 shards dim 0 (ceil-sized, the last ones short or empty), written by
    ``old`` ranks, read back by ``new``: each new shard, filled from the chunks overlapping it, equals
    the global tensor's rows."""
    full = torch.arange(22 * 3).reshape(22, 3)

    def split(n):
        size = -(-22 // n)
        return [(min(i * size, 22), max(0, min(size, 22 - i * size))) for i in range(n)]

    chunks = [((lo, 0), (rows, 3)) for lo, rows in split(old)]
    for lo, rows in split(new):
        got = torch.full((rows, 3), -1)
        covered = 0
        for (c_lo, _), (c_rows, _) in chunks:
            shared = overlap([lo, 0], [rows, 3], [c_lo, 0], [c_rows, 3])
            if shared:
                (a, b), _ = shared
                got[a - lo:b - lo] = full[a:b]
                covered += (b - a) * 3
        assert covered == rows * 3 and torch.equal(got, full[lo:lo + rows])
