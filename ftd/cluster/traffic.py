"""What a daemon says to its peers: peer messages counted by type, by peer node and in bytes. Pure.

Why: the cost of protection per node, and how it grows with the cluster, is a claim that must be
measured (``scripts/bench_scale.py``), not argued; these counters are what ``ftd status --json`` shows
under ``cluster.traffic``.

What is counted: every message through the daemon loop's links (``links.PeerLinks``: the rounds'
coordination, their chunk data, answers to a rebuilding peer) and through a rebuild's own sockets
(``links.PeerQueries``, on the rebuild thread, hence the lock), once: a send when ZeroMQ took it (a
refused send is counted in ``sends_dropped`` instead), a received message once it decoded (an
invalid one is counted in ``invalid_messages`` instead). Bytes are the message bodies (JSON header
plus payload frame), without the ZeroMQ, TCP or CURVE framing. Node 0 runs the coordinator in its
own daemon; what it says to itself never touches a socket and is counted apart, as ``in_process``.
"""
from __future__ import annotations

import threading
from typing import Iterable

from ftd.cluster.messages import SCHEMAS

#: what each peer message type is for (every type of ``messages.SCHEMAS`` has one)
COORDINATION, DATA, QUERY = "coordination", "data", "query"
KIND_OF: dict[str, str] = {
    **{t: COORDINATION for t in ("candidate", "sync", "protect", "done", "protected", "commit", "committed",
                                 "abort", "refuse", "hello", "restored", "alive", "lost", "disk_offer",
                                 "disk_query", "disk_load", "disk_loaded", "disk_none", "reset", "moved",
                                 "beat", "report_query", "report")},
    **{t: DATA for t in ("node_meta", "chunk", "chunk_ack")},
    **{t: QUERY for t in ("state_query", "state", "meta_query", "meta", "fetch", "block", "rank_query",
                          "rank_info", "rank_fetch", "decode", "decoded",
                          # membership: questions and answers about the record (``members``)
                          "member_query", "members", "claim", "claim_answer", "ping", "pong", "spare_offer",
                          "spare_answer")},
}
assert set(KIND_OF) == set(SCHEMAS), "every peer message type needs a kind in traffic.KIND_OF"


def frame_bytes(frames: Iterable) -> int:
    """Bytes in the frames of one message (bytes, memoryviews, numpy arrays or zmq.Frame objects)."""
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)


def _count() -> dict:
    return {"messages": 0, "bytes": 0}


def _add(acc: dict, nbytes: int) -> None:
    acc["messages"] += 1
    acc["bytes"] += nbytes


class PeerTraffic:
    """Counters of one daemon; safe to call from the loop and a rebuild thread at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs = {"sent": self._direction(), "received": self._direction()}
        self._in_process: dict[str, int] = {}

    @staticmethod
    def _direction() -> dict:
        return {**_count(), "by_type": {}, "by_peer": {}, "by_kind": {}}

    def _note(self, direction: str, peer: int, mtype: str, nbytes: int) -> None:
        with self._lock:
            d = self._dirs[direction]
            _add(d, nbytes)
            _add(d["by_type"].setdefault(mtype, _count()), nbytes)
            _add(d["by_peer"].setdefault(str(peer), _count()), nbytes)
            _add(d["by_kind"].setdefault(KIND_OF.get(mtype, "other"), _count()), nbytes)

    def sent(self, peer: int, mtype: str, nbytes: int) -> None:
        """A message of ``mtype`` (``nbytes`` of header and payload) went to node ``peer``."""
        self._note("sent", peer, mtype, nbytes)

    def received(self, peer: int, mtype: str, nbytes: int) -> None:
        """A valid message of ``mtype`` came from node ``peer``."""
        self._note("received", peer, mtype, nbytes)

    def in_process(self, mtype: str) -> None:
        """Node 0 delivered a message to itself (the coordinator and its own node), no socket involved."""
        with self._lock:
            self._in_process[mtype] = self._in_process.get(mtype, 0) + 1

    def status(self) -> dict:
        """A JSON-ready copy: ``sent`` and ``received`` (each: messages, bytes, by_type, by_peer with
        node ranks as strings, by_kind), ``in_process`` (messages, by_type)."""
        with self._lock:
            out = {name: {"messages": d["messages"], "bytes": d["bytes"],
                          **{key: {k: dict(v) for k, v in sorted(d[key].items())}
                             for key in ("by_type", "by_peer", "by_kind")}}
                   for name, d in self._dirs.items()}
            out["in_process"] = {"messages": sum(self._in_process.values()),
                                 "by_type": dict(sorted(self._in_process.items()))}
        return out


def difference(after: dict, before: dict) -> dict:
    """``after - before`` of two ``PeerTraffic.status()`` results (what happened between them), in the
    same shape; a key missing from ``before`` counts as zero."""
    def sub(a, b):
        if isinstance(a, dict):
            b = b or {}
            return {k: sub(v, b.get(k)) for k, v in a.items()}
        return a - (b or 0)
    return sub(after, before)
