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


def test_a_boundary_inside_a_tensor_moves_to_its_nearest_row_bound():
    # a (10, 4) float32 tensor at stream offset 0 (rows of 16 bytes), a 0-d one at 160, a (3,) at 164
    tensors = [(0, 160, 16), (160, 4, 4), (164, 12, 4)]
    got = slices.snap_to_rows(slices.partition(176, 2, 8), tensors)
    assert got == [(0, 96), (96, 176)]  # 88 is 5.5 rows in: the nearest bound is row 6 (96)
    assert slices.snap_to_rows([(0, 70), (70, 176)], tensors) == [(0, 64), (64, 176)]
    assert slices.snap_to_rows([(0, 162), (162, 176)], tensors) == [(0, 164), (164, 176)]  # 0-d: whole
    for parts in (2, 3, 4, 7):
        cut = slices.snap_to_rows(slices.partition(176, parts, 4), tensors)
        assert cut[0][0] == 0 and cut[-1][1] == 176 and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
        for lo, _ in cut[1:]:
            assert any(lo == off + r * row for off, size, row in tensors for r in range(size // row + 1))
    assert slices.row_bytes((10, 4), 4) == 16 and slices.row_bytes((), 8) == 8 and slices.row_bytes((5,), 2) == 2
