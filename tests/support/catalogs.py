"""A catalog over an in-memory store, for the daemon's state-machine tests."""
import itertools

import pytest

from ftd.daemon.buffers import CAPACITY_QUANTUM
from ftd.daemon.catalog import Catalog
from ftd.shm.layout import Manifest, chunk_count, plan_layout


class FakeStore:
    def __init__(self):
        self.segments: dict[str, int] = {}
        self.metas: dict[str, dict] = {}

    def allocate(self, name, size):
        assert name not in self.segments
        self.segments[name] = size

    def release(self, name):
        self.segments.pop(name, None)
        self.metas.pop(name, None)

    def mark_writing(self, name):
        self.metas.pop(name, None)

    def mark_complete(self, name, meta):
        self.metas[name] = meta


def manifest(nbytes=1000):
    layout = plan_layout([("uint8", (nbytes,))])
    return Manifest(layout, 4096, (0,) * chunk_count(layout.nbytes, 4096), {"state": {}}).to_json()


@pytest.fixture
def cat():
    counter = itertools.count()
    store = FakeStore()
    c = Catalog(store, budget=10 * CAPACITY_QUANTUM, available=lambda: 1 << 40, reserve=0,
                segment_name=lambda r: f"seg-r{r}-{next(counter)}", new_session=lambda: f"s{next(counter)}")
    c.fake = store
    return c


def snap(cat, session, step, nbytes=1000):
    buf = cat.begin(session, step, nbytes)["buffer"]
    cat.commit(session, buf, step, manifest(nbytes))
    return buf
