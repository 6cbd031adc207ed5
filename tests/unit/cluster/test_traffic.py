"""The peer-message counters of ``ftd status --json`` (``cluster.traffic``): by type, peer, kind and
bytes, the difference of two readings, and two real links in one process counting what crossed."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from ftd.cluster.messages import SCHEMAS, PeerMessages
from ftd.cluster.traffic import COORDINATION, DATA, KIND_OF, QUERY, PeerTraffic, difference, frame_bytes

pytestmark = pytest.mark.timeout(30)


def test_every_message_type_has_a_kind():
    assert set(KIND_OF) == set(SCHEMAS)
    assert {KIND_OF[t] for t in ("sync", "protect", "candidate", "done", "alive", "protected")} == {COORDINATION}
    assert {KIND_OF[t] for t in ("chunk", "chunk_ack", "node_meta")} == {DATA}
    assert {KIND_OF[t] for t in ("fetch", "block", "state_query")} == {QUERY}


def test_frame_bytes_of_every_buffer_kind():
    assert frame_bytes([b"abc", memoryview(b"12345"), np.zeros(10, np.float32), bytearray(7)]) == 3 + 5 + 40 + 7
    assert frame_bytes([zmq.Frame(b"x" * 11)]) == 11
    assert frame_bytes([]) == 0


def test_counts_by_type_peer_and_kind():
    t = PeerTraffic()
    t.sent(1, "candidate", 100)
    t.sent(2, "chunk", 4096)
    t.sent(2, "chunk", 4096)
    t.received(1, "sync", 80)
    t.in_process("done")
    t.in_process("done")
    st = t.status()
    assert st["sent"]["messages"] == 3 and st["sent"]["bytes"] == 8292
    assert st["sent"]["by_type"] == {"candidate": {"messages": 1, "bytes": 100},
                                     "chunk": {"messages": 2, "bytes": 8192}}
    assert st["sent"]["by_peer"] == {"1": {"messages": 1, "bytes": 100}, "2": {"messages": 2, "bytes": 8192}}
    assert st["sent"]["by_kind"] == {COORDINATION: {"messages": 1, "bytes": 100}, DATA: {"messages": 2, "bytes": 8192}}
    assert st["received"]["messages"] == 1 and st["received"]["by_peer"] == {"1": {"messages": 1, "bytes": 80}}
    assert st["in_process"] == {"messages": 2, "by_type": {"done": 2}}
    # status() is a copy: later counts do not change an earlier reading
    t.sent(1, "candidate", 100)
    assert st["sent"]["by_type"]["candidate"]["messages"] == 1


def test_difference_of_two_readings():
    t = PeerTraffic()
    t.sent(1, "alive", 50)
    before = t.status()
    t.sent(1, "alive", 50)
    t.sent(3, "done", 70)          # a type and a peer new since ``before``
    t.received(3, "protect", 200)
    d = difference(t.status(), before)
    assert d["sent"]["messages"] == 2 and d["sent"]["bytes"] == 120
    assert d["sent"]["by_type"] == {"alive": {"messages": 1, "bytes": 50}, "done": {"messages": 1, "bytes": 70}}
    assert d["sent"]["by_peer"]["3"] == {"messages": 1, "bytes": 70}
    assert d["received"]["by_kind"] == {COORDINATION: {"messages": 1, "bytes": 200}}
    assert d["in_process"] == {"messages": 0, "by_type": {}}


def test_counts_from_two_threads_add_up():
    t = PeerTraffic()

    def hammer(peer):
        for _ in range(20000):
            t.received(peer, "block", 3)

    threads = [threading.Thread(target=hammer, args=(p,)) for p in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    st = t.status()["received"]
    assert st["messages"] == 40000 and st["bytes"] == 120000
    assert st["by_peer"]["1"]["messages"] == st["by_peer"]["2"]["messages"] == 20000


def test_real_links_count_what_crossed_and_not_what_was_refused():
    """Two PeerLinks on loopback TCP in one process: a header-only and a payload message from node 0
    to node 1, a query answer back; each side counts exactly the bytes ZeroMQ carried."""
    from ftd.cluster.auth import PeerSecurity
    from ftd.cluster.links import PeerLinks
    from ftd.config import Config
    from ftd.util.procs import free_ports
    peers = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    ctx = zmq.Context()
    links = []
    try:
        for rank in range(2):
            config = Config(job="tt", peers=peers, node_rank=rank, memory_budget=1 << 30)
            links.append(PeerLinks(config, ctx, PeerSecurity(None), PeerMessages("tt", rank, 2, 2)))
        a, b = links
        payload = np.arange(1024, dtype=np.uint8)
        deadline = time.monotonic() + 10
        while not a.send(1, "alive", latest=5, term=0):   # ZMQ_IMMEDIATE: refused until connected
            assert time.monotonic() < deadline, "the links never connected"
            time.sleep(0.02)
        refused = a.dropped
        assert a.send(1, "chunk", payload, round=1, step=5, stripe=0, number=0, frame=0, length=1024,
                      hash=0, zero=False)
        got = []
        while len(got) < 2:
            assert b.router.poll(5000), "node 1 received nothing"
            got.append(b.receive(b.router))
        sent = a.traffic.status()["sent"]
        assert sent["messages"] == 2 and sent["by_peer"] == {"1": {"messages": 2, "bytes": sent["bytes"]}}
        header = len(PeerMessages("tt", 0, 2, 2).encode("alive", latest=5, term=0)[0])
        assert sent["by_type"]["alive"] == {"messages": 1, "bytes": header}
        assert sent["by_type"]["chunk"]["bytes"] > 1024 and sent["by_kind"][DATA]["messages"] == 1
        assert b.traffic.status()["received"]["by_type"] == sent["by_type"]
        assert a.traffic.status()["sent"]["messages"] == 2 and refused == a.dropped  # refusals not counted as sent
        envelope = got[0][0]
        assert b.reply(envelope, 0, "state", qid=1, recoverable=4, data=[4], parity=[4], rebuilding=False)
        assert b.traffic.status()["sent"]["by_peer"]["0"]["messages"] == 1
    finally:
        for link in links:
            link.close()
        ctx.term()
