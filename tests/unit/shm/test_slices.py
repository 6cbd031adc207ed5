"""The cut of the replicated bytes into R replica slices (ftd.shm.slices)."""
import pytest

from ftd.shm import slices

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("total,parts,align", [(0, 2, 64), (100, 4, 64), (10 << 20, 4, 64), (12345, 3, 1),
                                               (64 * 7, 2, 64), ((1 << 20) + 5, 4, 4096)])
def test_the_slices_cover_the_stream_once_in_order_at_aligned_bounds(total, parts, align):
    got = slices.partition(total, parts, align)
    assert len(got) == parts and got[0][0] == 0 and got[-1][1] == total
    for (lo, hi), (lo2, _) in zip(got, got[1:]):
        assert hi == lo2 and lo <= hi
    assert all(lo % align == 0 for lo, _ in got)
    sizes = [hi - lo for lo, hi in got]
    assert max(sizes) - min(sizes) <= align + (total % align if total % align else 0)


def test_a_tensor_meets_each_slice_in_at_most_one_piece():
    bounds = slices.partition(1000, 3, 64)
    pieces = [slices.piece(300, 500, lo, hi) for lo, hi in bounds]
    got = [p for p in pieces if p is not None]
    assert got[0][0] == 0 and got[-1][1] == 500
    assert sum(b - a for a, b in got) == 500
    assert slices.piece(0, 10, 10, 20) is None


def test_the_signature_tells_layouts_apart():
    a = slices.signature_hash([("float32", (4, 4)), ("float32", (4,))])
    assert a == slices.signature_hash([("float32", [4, 4]), ("float32", [4])])
    assert a != slices.signature_hash([("float32", (4, 4)), ("float32", (5,))])
    assert 0 <= a < 1 << 63


def test_a_partition_that_makes_no_sense_is_refused():
    with pytest.raises(ValueError):
        slices.partition(10, 0, 64)
