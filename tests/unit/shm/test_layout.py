import random

import pytest

from ftd.errors import ProtocolError
from ftd.shm.layout import ALIGNMENT, Manifest, chunk_count, chunk_plan, chunk_ranges, plan_layout


def test_plan_layout_aligns_and_orders():
    layout = plan_layout([("float32", (3,)), ("bfloat16", (5, 7)), ("bool", ()), ("int64", (0,))])
    offsets = [s.offset for s in layout.slots]
    assert offsets == sorted(offsets) and all(o % ALIGNMENT == 0 for o in offsets)
    assert [s.nbytes for s in layout.slots] == [12, 70, 1, 0]
    assert layout.nbytes >= layout.slots[-1].end


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        plan_layout([("float128", (1,))])


@pytest.mark.parametrize("seed", range(30))
def test_chunk_plan_covers_every_tensor_byte_exactly_once(seed):
    rnd = random.Random(seed)
    specs = [(rnd.choice(["float32", "uint8", "float64", "bfloat16"]), (rnd.randrange(0, 5000),))
             for _ in range(rnd.randrange(1, 40))]
    layout = plan_layout(specs)
    chunk = rnd.choice([4096, 8192, 65536])
    covered = [0] * len(layout.slots)
    for (lo, hi), pieces in chunk_plan(layout, chunk):
        for p in pieces:
            s = layout.slots[p.slot]
            assert lo <= s.offset + p.start < s.offset + p.end <= hi  # inside its chunk
            covered[p.slot] += p.end - p.start
    assert covered == [s.nbytes for s in layout.slots]
    assert len(chunk_ranges(layout.nbytes, chunk)) == chunk_count(layout.nbytes, chunk)


def test_manifest_round_trip():
    layout = plan_layout([("float32", (1000,)), ("int64", (3, 3))])
    m = Manifest(layout, 4096, tuple(range(chunk_count(layout.nbytes, 4096))), {"state": {"a": 1}})
    back = Manifest.from_json(m.to_json())
    assert back == m


def _manifest_json(**changes):
    layout = plan_layout([("float32", (1000,)), ("int64", (3, 3))])
    obj = Manifest(layout, 4096, (0,) * chunk_count(layout.nbytes, 4096), None).to_json()
    obj.update(changes)
    return obj


@pytest.mark.parametrize("changes,why", [
    ({"format": 2}, "format"),
    ({"nbytes": -1}, "nbytes"),
    ({"chunk_size": 12}, "chunk_size"),
    ({"checksums": [0]}, "checksums"),
    ({"checksums": [-1, 0]}, "unsigned"),
    ({"tensors": [["float32", [1000], 0], ["int64", [3, 3], 64]]}, "overlaps"),
    ({"tensors": [["float32", [1000], 0], ["int64", [3, 3], 4096]]}, "leaves the arena"),
    ({"tensors": [["float32", [1000], 1]]}, "overlaps"),
    ({"tensors": [["evil", [1], 0]]}, "unknown dtype"),
    ({"tensors": [["float32", [-4], 0]]}, "shape"),
    ({"tensors": [{"dtype": "float32"}]}, "must be"),
])
def test_manifest_validation_rejects(changes, why):
    with pytest.raises(ProtocolError, match=why):
        Manifest.from_json(_manifest_json(**changes))


def test_manifest_bounded_by_buffer_capacity():
    with pytest.raises(ProtocolError, match="nbytes"):
        Manifest.from_json(_manifest_json(), max_nbytes=100)
