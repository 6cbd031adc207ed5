"""Messages between peer daemons: what may travel, checked before anyone acts on it. Pure.

A message is one or two ZeroMQ frames: a JSON header ``{"v": 1, "type": ..., "job": ..., "src": N,
fields...}`` and, for chunk data, the raw bytes. JSON, never pickle: bytes from another host are
data. ``PeerMessages`` validates a header against the schema of its type (field kinds and bounds),
then against the cluster (its job, node ranks below N, stripes and block numbers below g, payload
length equal to the header's), so a daemon never indexes anything with a number it did not check.

Steps use -1 for "none" (JSON has no int-or-null kind that stays cheap to check).
"""
from __future__ import annotations

import json
from typing import Any

from ftd.control import protocol
from ftd.control.protocol import VERSION
from ftd.errors import ProtocolError

# field kinds (see protocol.check_field)
_I, _STEP, _SIZE, _INTS, _BOOL, _STR, _META, _NODE, _U64 = (
    "int", "optstep", "size", "ints", "bool", "str", "optdict", "rank", "u64")

MAX_FRAME = 16 << 20
MAX_HEADER = 4 << 20

#: type -> {field: (kind, required)}; every message also has v, type, job, src.
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    # coordination (node <-> coordinator)
    "candidate": {"target": (_I, True), "step": (_I, True), "nbytes": (_SIZE, True), "mismatch": (_BOOL, True),
                  "recoverable": (_STEP, True), "latest": (_STEP, True), "epoch": (_I, False)},
    # epoch: how many times the cluster restored from disk (a step of a newer epoch wins over a later
    # step of an older one); flush: write this recoverable step to disk
    # finished: every node's trainers finished the run (a rerun starts afresh)
    # lost: nodes that cannot be rebuilt from memory (until they are)
    "sync": {"target": (_I, True), "recoverable": (_STEP, True), "epoch": (_I, False), "flush": (_BOOL, False),
             "finished": (_BOOL, False), "lost": (_INTS, False)},
    "protect": {"round": (_I, True), "step": (_I, True), "sizes": (_INTS, True)},
    "done": {"round": (_I, True), "step": (_I, True), "latest": (_STEP, True), "flushing": (_BOOL, False)},
    "protected": {"round": (_I, True), "step": (_I, True), "group": (_I, True)},
    "commit": {"round": (_I, True), "step": (_I, True)},
    "committed": {"round": (_I, True), "step": (_I, True)},
    "abort": {"round": (_I, True), "reason": (_STR, True)},
    "refuse": {"round": (_I, True), "reason": (_STR, True)},
    "hello": {"recoverable": (_STEP, True), "epoch": (_I, False)},
    "restored": {"step": (_STEP, True)},
    # a node's answer to every sync/protect: the coordinator's heartbeat; finished: all its ranks finished
    "alive": {"latest": (_STEP, True), "finished": (_BOOL, False)},
    # a node's trainers start a new run (resume="never", a rerun of a finished run, ftd clear): every node
    # drops the run of ``epoch`` (the coordinator's timeline the node knew)
    "reset": {"epoch": (_I, True), "reason": (_STR, True)},
    "lost": {"step": (_STEP, True), "nodes": (_INTS, True), "error": (_STR, True)},
    # a coordinator's heartbeat to a node it had nothing else to tell; a new coordinator's question, and
    # a node's answer (also sent unasked to a new term's coordinator): what it knows (``terms``, ``takeover``);
    # done/round: the round it finished and waits to hear about (-1: none); disk: it waits for a decision
    # about the restore from disk; fresh: its daemon started since it last heard a coordinator
    "beat": {},
    "report_query": {},
    "report": {"ready": (_BOOL, True), "recoverable": (_STEP, True), "epoch": (_I, True), "done": (_STEP, True),
               "round": (_I, True), "latest": (_STEP, True), "finished": (_BOOL, True), "lost": (_BOOL, True),
               "disk": (_BOOL, True), "fresh": (_BOOL, True)},
    # the fallback restore from disk (coordinator <-> nodes)
    "disk_offer": {"epoch": (_I, True), "recoverable": (_STEP, True), "steps": (_INTS, True), "need": (_BOOL, True)},
    "disk_query": {},
    "disk_load": {"epoch": (_I, True), "step": (_I, True)},
    "disk_loaded": {"epoch": (_I, True), "step": (_I, True), "ok": (_BOOL, True), "error": (_STR, True)},
    "disk_none": {"reason": (_STR, True)},
    # protection data path (data holder <-> parity holder)
    "node_meta": {"round": (_I, True), "step": (_I, True), "meta": (_META, True)},
    "chunk": {"round": (_I, True), "step": (_I, True), "stripe": (_I, True), "number": (_I, True),
              "frame": (_I, True), "length": (_SIZE, True), "hash": (_U64, True), "zero": (_BOOL, True)},
    "chunk_ack": {"round": (_I, True), "step": (_I, True), "stripe": (_I, True), "frame": (_I, True),
                  "length": (_SIZE, True)},
    # queries (rebuild), answered on the same link
    "state_query": {"qid": (_I, True)},
    "state": {"qid": (_I, True), "recoverable": (_STEP, True), "data": (_INTS, True), "parity": (_INTS, True),
              "rebuilding": (_BOOL, True)},
    "meta_query": {"qid": (_I, True), "step": (_I, True), "node": (_NODE, True)},
    "meta": {"qid": (_I, True), "step": (_I, True), "node": (_NODE, True), "meta": (_META, True)},
    "fetch": {"qid": (_I, True), "step": (_I, True), "stripe": (_I, True), "number": (_I, True),
              "frame": (_I, True)},
    "block": {"qid": (_I, True), "length": (_SIZE, True), "hash": (_U64, True), "error": (_STR, True)},
    # a rebuilding node asks a survivor (the decoder: it holds one of ``sources``, the k block numbers to
    # decode from) to gather the others from their holders, decode frame ``frame`` of ``stripe`` and answer
    # with block ``number`` alone ("decoded"); bad: the source block that failed (-1: none known)
    "decode": {"qid": (_I, True), "step": (_I, True), "stripe": (_I, True), "number": (_I, True),
               "frame": (_I, True), "sources": (_INTS, True)},
    "decoded": {"qid": (_I, True), "length": (_SIZE, True), "hash": (_U64, True), "error": (_STR, True),
                "bad": (_STEP, True)},
    # a rank that restores on another node than the one holding its version (c10d moved it): where is it,
    # and its bytes frame by frame (answered with "block"); holder: the node whose image holds it (-1: none
    # known); rebuilding: the answering node is rebuilding and may hold it soon
    "rank_query": {"qid": (_I, True), "step": (_I, True), "rank": (_NODE, True)},
    "rank_info": {"qid": (_I, True), "step": (_I, True), "rank": (_NODE, True), "held": (_BOOL, True),
                  "world": (_I, True), "capacity": (_SIZE, True), "manifest": (_META, True),
                  "holder": (_STEP, True), "frame_size": (_SIZE, True), "rebuilding": (_BOOL, True)},
    "rank_fetch": {"qid": (_I, True), "step": (_I, True), "rank": (_NODE, True), "frame": (_I, True)},
    # the sender restored ``rank`` from the receiver's copy: it trains there now
    "moved": {"step": (_I, True), "rank": (_NODE, True)},
    # membership (``membership``, ``members``): a daemon asks its peers for their record and is answered
    # with it (coord_term: the term the answering node follows); ask: answer with yours (gossip); a daemon
    # that is node ``node`` at another endpoint than the record's claims it from the coordinator, which
    # probes the current member (ping/pong) before it answers (claim_answer)
    "member_query": {},
    "members": {"members": (_META, True), "coord_term": (_I, True), "ask": (_BOOL, False)},
    "claim": {"endpoint": (_STR, True), "identity": (_STR, True), "known": (_I, True)},
    "claim_answer": {"ok": (_BOOL, True), "retry": (_BOOL, True), "reason": (_STR, True), "members": (_META, True),
                     "coord_term": (_I, True)},
    "ping": {},
    "pong": {"endpoint": (_STR, True)},
    # a spare host (no node rank: its src is meaningless, the identity names it) offers itself to the
    # coordinator every second; node: the rank it was admitted to (-1: none yet)
    "spare_offer": {"endpoint": (_STR, True), "identity": (_STR, True)},
    "spare_answer": {"node": (_STEP, True), "reason": (_STR, True), "members": (_META, True), "coord_term": (_I, True)},
}
_PAYLOAD = {"chunk", "block", "decoded"}
#: what only the coordinator of the current term sends (``terms``: term t's is node t % N): the same from
#: another node, or of an older term, is refused, so a confused, stale or replaced peer cannot start a new
#: run, a round or a disk load on its own
FROM_COORDINATOR = frozenset({"sync", "protect", "protected", "abort", "disk_query", "disk_load", "disk_none",
                              "beat", "report_query"})
#: what a node sends to the coordinator of its term (acted on only by that coordinator, in that term)
TO_COORDINATOR = frozenset({"candidate", "done", "hello", "refuse", "restored", "alive", "reset", "disk_offer",
                            "disk_loaded", "report"})
for _type in FROM_COORDINATOR | TO_COORDINATOR:  # every coordination message carries its term
    SCHEMAS[_type]["term"] = (_I, True)
for _type in FROM_COORDINATOR:  # ... and a coordinator's, the version of its membership record (``members``)
    SCHEMAS[_type]["mv"] = (_I, False)
#: the membership messages: what a daemon not yet admitted to the record sends and acts on
MEMBERSHIP = frozenset({"member_query", "members", "claim", "claim_answer", "ping", "pong", "spare_offer",
                        "spare_answer"})
_COMMON = ("v", "type", "job", "src")


class PeerMessages:
    """Encode and validate peer messages of one cluster (job name, N nodes, groups of g)."""

    def __init__(self, job: str, src: int, nodes: int, group_size: int):
        self.job, self.src, self.nodes, self.g = job, src, nodes, group_size

    def encode(self, mtype: str, payload: Any = None, **fields: Any) -> list:
        msg = {"v": VERSION, "type": mtype, "job": self.job, "src": self.src, **fields}
        protocol.validate_message(msg, SCHEMAS, _COMMON, "peer message")
        header = json.dumps(msg, separators=(",", ":")).encode()
        return [header] if payload is None else [header, payload]

    def decode(self, frames: list) -> tuple[dict, Any]:
        """(header, payload or None) of a received message; ProtocolError saying what is wrong."""
        if not 1 <= len(frames) <= 2:
            raise ProtocolError(f"a peer message has 1 or 2 frames, got {len(frames)}")
        head = frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]
        if len(head) > MAX_HEADER:
            raise ProtocolError(f"peer message header of {len(head)} bytes exceeds {MAX_HEADER}")
        try:
            msg = json.loads(head)
        except (ValueError, RecursionError) as e:  # not JSON or UTF-8, an integer of > 4300 digits, deep nesting
            raise ProtocolError(f"peer message header is not JSON ({str(e)[:200]})") from None
        protocol.validate_message(msg, SCHEMAS, _COMMON, "peer message")
        if msg.get("job") != self.job:
            raise ProtocolError(f"peer message for job {protocol.brief(msg.get('job'))}, "
                                f"this daemon serves {self.job!r}")
        src = msg.get("src")
        if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < self.nodes:
            raise ProtocolError(f"peer message from node {protocol.brief(src)}, "
                                f"the cluster has nodes 0..{self.nodes - 1}")
        self._check_bounds(msg)
        payload = frames[1] if len(frames) == 2 else None
        if (payload is not None) != (msg["type"] in _PAYLOAD):
            raise ProtocolError(f"{msg['type']} message {'needs' if payload is None else 'takes no'} payload frame")
        if payload is not None:
            size = len(payload.buffer) if hasattr(payload, "buffer") else len(payload)
            if size > MAX_FRAME or size != msg["length"] and not msg.get("zero") and not msg.get("error"):
                raise ProtocolError(f"{msg['type']} payload has {size} bytes, its header says {msg['length']}")
        return msg, payload

    def _check_bounds(self, msg: dict) -> None:
        for key in ("stripe", "number"):
            if key in msg and not 0 <= msg[key] < self.g:
                raise ProtocolError(f"{msg['type']}.{key}={msg[key]} is outside 0..{self.g - 1}")
        if "node" in msg and msg["node"] >= self.nodes:
            raise ProtocolError(f"{msg['type']}.node={msg['node']} is not a node of this cluster")
        if "holder" in msg and msg["holder"] >= self.nodes:
            raise ProtocolError(f"{msg['type']}.holder={msg['holder']} is not a node of this cluster")
        if "sources" in msg and (len(msg["sources"]) > self.g or not all(0 <= b < self.g for b in msg["sources"])):
            raise ProtocolError(f"{msg['type']}.sources must be at most {self.g} block numbers in 0..{self.g - 1}")
        if "bad" in msg and msg["bad"] >= self.g:
            raise ProtocolError(f"{msg['type']}.bad={msg['bad']} is outside -1..{self.g - 1}")
        if "length" in msg and msg["length"] > MAX_FRAME:
            raise ProtocolError(f"{msg['type']}.length={msg['length']} exceeds {MAX_FRAME}")
        if msg["type"] == "protect" and len(msg["sizes"]) != self.nodes:
            raise ProtocolError(f"protect.sizes has {len(msg['sizes'])} entries for {self.nodes} nodes")
        if msg["type"] in ("lost", "sync") and not all(0 <= n < self.nodes for n in msg.get(
                "nodes" if msg["type"] == "lost" else "lost", [])):
            raise ProtocolError("lost.nodes names a node outside the cluster")
