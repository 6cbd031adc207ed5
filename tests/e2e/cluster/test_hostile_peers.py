"""Hostile input on the daemons' peer sockets, property-based (hypothesis), against a real cluster.

A 3-node cluster (m = 1, plain TCP on 127.0.0.1, started once for the module with `ftd launch`)
holds a protected snapshot of every node. A test DEALER then sends the daemons' peer ROUTERs:

- malformed messages: random bytes, truncated or non-object headers, wrong protocol versions,
  unknown types, other jobs, sender ranks outside the cluster, missing, extra, mistyped and
  out-of-range fields (stripes and block numbers >= g, nodes >= N, lengths over the frame limit),
  payloads that do not match their header, too many frames, oversized headers and frames;
- well-formed messages about things that do not exist or are over: fetches and queries for steps,
  stripes, blocks and frames nobody holds, chunks (with good or bad checksums, duplicate and
  out-of-range block numbers) for rounds that are not running, acks and aborts of such rounds,
  answers nobody asked for, and replays of the last real round's messages, in any order;
- a chunk whose checksum does not match, and block numbers that are wrong for their sender, inside a
  live round; messages announcing huge chunks, segments or many rounds.

After each batch a `state_query` on the same link works as a barrier (a link delivers in order), and
the test checks that every query got the right answer, every malformed message was counted
(``invalid_messages``), the daemons still serve, the recoverable step did not move, a new protection
round still completes, memory stayed bounded, and at the end that every node restores its snapshot
bit for bit, also after a node is lost and rebuilt from the others' parity. With a shared
CURVE key a client without it gets nothing through at all (per-node keys: test_node_keys.py).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ftd
from ftd.cluster import messages as peerproto
from ftd.cluster.auth import PeerSecurity, load_key_file
from ftd.cluster.erasure import Codec, InvalidBlocks
from ftd.cluster.links import MAX_PEER_MESSAGE
from ftd.cluster.messages import MAX_FRAME, MAX_HEADER, PeerMessages
from ftd.cluster.protection import NodeImage, NodeRound, Shape
from ftd.cluster.stripes import Grouping
from ftd.config import load_config
from ftd.errors import ProtocolError
from ftd.shm import segments
from ftd.shm.checksum import chunk_checksum
from ftd.util.procs import wait_for

from support.clusters import LocalCluster
from support.jobs import SHM

pytestmark = pytest.mark.timeout(180)

# reproducible in CI: the same examples on every run, no example database
HOSTILE = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])

NODES, PARITY = 3, 1
SIZES = [2 << 20, 256 << 10, 512 << 10]  # bytes of state per node: node 1's chunks are mostly padding
REPLY_S = 10.0
RSS_SLACK = 200 << 20  # how much a daemon's memory may grow over an attack (honest early frames: 2 x 32 MiB)
_qids = itertools.count(1 << 40)


# ---- the cluster under attack -------------------------------------------------------------------------
class Link:
    """A raw DEALER on one node's peer socket: sends anything, reads whatever comes back."""

    def __init__(self, ctx: zmq.Context, endpoint: str, job: str, setup=None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if setup is not None:
            setup(self.sock)
        self.sock.connect(endpoint)
        self.job = job

    def send(self, frames: list, copy: bool = True) -> None:
        self.sock.send_multipart(frames, copy=copy)

    def barrier(self, timeout: float = REPLY_S) -> tuple[dict, list[tuple[dict, bytes | None]]]:
        """Ask the node's state; returns it and every other answer that came before it. The link
        delivers in order, so the node has handled everything sent before."""
        qid = next(_qids)
        self.send([header(self.job, "state_query", src=0, qid=qid)])
        answers = []
        deadline = time.monotonic() + timeout
        while True:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), "the node stopped answering"
            frames = self.sock.recv_multipart()
            msg = json.loads(frames[0])
            if msg["type"] == "state" and msg["qid"] == qid:
                return msg, answers
            answers.append((msg, frames[1] if len(frames) > 1 else None))

    def close(self) -> None:
        self.sock.close(0)


def header(job: str, mtype: str, src: int = 2, **fields) -> bytes:
    return json.dumps({"v": 1, "type": mtype, "job": job, "src": src, **fields}).encode()


class Cluster:
    """The launched cluster, one in-process trainer client per node, and the test's raw links."""

    def __init__(self, c: LocalCluster):
        self.c = c
        self.job = c.job
        self.group = load_config(c.config(0)).grouping().group_for(0)
        self.layout = self.group.layout
        self.k = self.layout.k
        self.peer_endpoints = [m["peer_endpoint"] for m in c.info["members"]]
        self.ctx = zmq.Context()
        self.links: list[Link] = []
        self.clients: dict[int, ftd.Client] = {}
        self.expected: dict[int, torch.Tensor] = {}
        self.step = -1
        self.frame_size = load_config(c.config(0)).frame_size

    def start(self) -> "Cluster":
        wait_for(lambda: all(self.c.ping(n) for n in range(NODES)), 30, "the daemons to be ready")
        for n in range(NODES):
            self.clients[n] = ftd.Client(self.c.endpoints[n], rank=0, world_size=1, capture_rng=False)
        self.protect_next()
        return self

    # -- helpers --
    def link(self, node: int, setup=None) -> Link:
        link = Link(self.ctx, self.peer_endpoints[node], self.job, setup)
        self.links.append(link)
        return link

    def status(self, node: int) -> dict:
        st_ = self.c.status(node)
        assert st_ is not None, f"node {node} does not answer on its control socket"
        return st_

    def invalid(self, node: int) -> int:
        return self.status(node)["cluster"]["stats"]["invalid_messages"]

    def process(self, node: int) -> psutil.Process:
        return psutil.Process(self.status(node)["pid"])

    def shm_bytes(self, node: int) -> int:
        prefix = f"ftd.{self.job}.n{node}."
        return sum(p.stat().st_size for p in SHM.iterdir() if p.name.startswith(prefix))

    def protect_next(self, timeout: float = 30) -> int:
        """Every node snapshots a new step (node-specific random data); waits until it is recoverable
        everywhere: proof that protection rounds still complete."""
        self.step += 1
        for n, client in self.clients.items():
            gen = torch.Generator().manual_seed(1000 * n + self.step)
            x = torch.randn(SIZES[n] // 4, generator=gen)
            self.expected[n] = x.clone()
            client.snapshot(self.step, {"x": x})
        for n, client in self.clients.items():
            assert client.wait(REPLY_S), f"node {n} did not commit step {self.step}"
        wait_for(lambda: self.c.recoverable() == [self.step] * NODES, timeout,
                 f"step {self.step} to become recoverable on every node")
        return self.step

    def segment(self, node: int, kind: str, step: int) -> tuple[Path, dict]:
        """The node's rank-0 ("r0") or parity ("par") segment holding ``step``, and its sidecar."""
        for p in SHM.iterdir():
            if p.name.startswith(f"ftd.{self.job}.n{node}.{kind}.") and not p.name.endswith((".meta", ".tmp")):
                meta = segments.read_meta(p)
                if meta is not None and meta.get("step") == step:
                    return p, meta
        raise AssertionError(f"node {node} holds no {kind} segment of step {step}")

    def expected_block(self, node: int, step: int, number: int, frame: int) -> bytes:
        """What node ``node`` must answer to a fetch of frame ``frame`` of its block ``number``."""
        par, record = self.segment(node, "par", step)
        c, fs = record["c"], record["frame_size"]
        lo, hi = frame * fs, min(c, frame * fs + fs)
        if number < self.k:
            data, meta = self.segment(node, "r0", step)
            image = data.read_bytes()[:meta["manifest"]["nbytes"]]
            image += bytes(self.k * c - len(image))
            return image[number * c + lo:number * c + hi]
        j = number - self.k
        return par.read_bytes()[j * c + lo:j * c + hi]

    def assert_restores(self, nodes=range(NODES)) -> None:
        for n in nodes:
            out = {"x": None}
            with ftd.Client(self.c.endpoints[n], rank=0, world_size=1, capture_rng=False) as client:
                assert client.restore(out) == self.step
            assert out["x"].numpy().tobytes() == self.expected[n].numpy().tobytes(), f"node {n} restored other bytes"

    def close(self) -> None:
        for client in self.clients.values():
            client.close(timeout=5)
        for link in self.links:
            link.close()
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(NODES, PARITY)
    made = Cluster(c)
    try:
        yield made.start()
    finally:
        try:
            made.close()
        finally:
            left = c.close()  # processes and shared memory, even when a test failed
    assert not left, f"shared memory left behind: {left}"


# ---- message strategies ------------------------------------------------------------------------------
_KIND_VALUES = {
    "int": st.integers(0, 50), "optstep": st.integers(-1, 50), "size": st.integers(0, 64),
    "ints": st.lists(st.integers(-1, 1 << 20), min_size=NODES, max_size=NODES), "bool": st.booleans(),
    "str": st.text(max_size=16), "optdict": st.none() | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    "rank": st.integers(0, NODES - 1), "u64": st.integers(0, (1 << 64) - 1),
}
_WRONG_KIND = {"int": "7", "optstep": 1.5, "size": None, "ints": [1, "2"], "bool": 1, "str": 5,
               "optdict": [1], "rank": True, "u64": -1}
_OUT_OF_RANGE = {"int": -5, "optstep": -2, "size": MAX_FRAME + 1, "ints": [-7] * NODES, "rank": NODES,
                 "u64": 1 << 64}
_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats()
_json = st.recursive(_scalars, lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=4), i, max_size=3),
                     max_leaves=8)


@st.composite
def well_formed(draw, job: str, mtype: str | None = None) -> tuple[dict, bytes | None]:
    """A header (as a dict) and payload that pass validation, with arbitrary (small) values."""
    mtype = mtype or draw(st.sampled_from(sorted(peerproto.SCHEMAS)))
    msg = {"v": 1, "type": mtype, "job": job, "src": draw(st.integers(0, NODES - 1))}
    for name, (kind, _) in peerproto.SCHEMAS[mtype].items():
        if name in ("stripe", "number"):
            msg[name] = draw(st.integers(0, NODES - 1))
        elif (mtype, name) in (("lost", "nodes"), ("sync", "lost")):  # lists of nodes of this cluster
            msg[name] = draw(st.lists(st.integers(0, NODES - 1), max_size=NODES))
        elif name == "holder":                                      # a node of this cluster, or -1
            msg[name] = draw(st.integers(-1, NODES - 1))
        elif name == "sources":                                     # block numbers of a stripe
            msg[name] = draw(st.lists(st.integers(0, NODES - 1), max_size=NODES))
        elif name == "bad":                                         # a block number, or -1
            msg[name] = draw(st.integers(-1, NODES - 1))
        else:
            msg[name] = draw(_KIND_VALUES[kind])
    payload = None
    if mtype in ("chunk", "block", "decoded"):
        payload = draw(st.binary(max_size=64))
        msg.update(length=len(payload), hash=chunk_checksum(payload))
        if mtype == "chunk":
            msg["zero"] = False
        else:
            msg["error"] = ""
    return msg, payload


def _defects(draw, msg: dict, payload):
    """One thing wrong with a well-formed message (the caller checks it really is invalid)."""
    fields = [f for f in msg if f not in ("v", "type", "job", "src")]
    what = draw(st.sampled_from(["version", "type", "job", "src", "drop", "kind", "range", "extra", "payload",
                                 "frames", "bytes", "bounds"]))
    frames = None
    if what == "version":
        msg["v"] = draw(st.sampled_from([0, 2, -1, "1", None, [1], 1.5]) | _json.filter(lambda v: v != 1))
    elif what == "type":
        msg["type"] = draw((st.sampled_from(["", "Chunk", "shutdown", "state_query "]) | _json)
                           .filter(lambda t: t != msg["type"]))
    elif what == "job":
        msg["job"] = draw((st.text(max_size=12) | _json).filter(lambda j: j != msg["job"]))
    elif what == "src":
        msg["src"] = draw(st.integers(NODES, 1 << 70) | st.integers(-(1 << 70), -1)
                          | st.sampled_from(["0", True, None]))
    elif what == "drop":  # a required field (an optional one may be left out)
        required = [f for f in fields if peerproto.SCHEMAS[msg["type"]].get(f, ("", True))[1]]
        msg.pop(draw(st.sampled_from(required + ["v", "type", "job", "src"])))
    elif what in ("kind", "range") and fields:
        name = draw(st.sampled_from(fields))
        kind = peerproto.SCHEMAS[msg["type"]][name][0]
        msg[name] = (_OUT_OF_RANGE if what == "range" and kind in _OUT_OF_RANGE else _WRONG_KIND)[kind]
    elif what == "extra":
        msg[draw(st.text(min_size=1, max_size=8).filter(lambda f: f not in msg))] = draw(_json)
    elif what == "payload":
        if payload is None:
            payload = draw(st.binary(max_size=32))  # a payload where none is allowed
        elif draw(st.booleans()):
            payload = None                          # none where one is needed
        else:
            payload += b"x"                         # one byte more than its header says
    elif what == "frames":
        frames = [json.dumps(msg).encode()] + draw(st.lists(st.binary(max_size=8), min_size=2, max_size=4))
    elif what == "bytes":
        text = json.dumps(msg).encode()
        frames = [draw(st.sampled_from([text[:len(text) // 2], b"\xff" + text, b"[" * 3000, b"[1,2]", b'"x"',
                                        b'{"v":1,"type":["chunk"]}', text[:-1] + b',"n":' + b"9" * 5000 + b"}"])
                       | st.binary(max_size=64))]
    elif what == "bounds":
        msg.update(draw(st.sampled_from([{"stripe": NODES}, {"number": 255}, {"node": NODES}, {"length": MAX_FRAME + 1},
                                         {"sizes": [1] * (NODES + 1)}, {"nodes": [NODES]}, {"stripe": -1},
                                         {"holder": NODES}])))
    if frames is None:
        frames = [json.dumps(msg).encode()] + ([] if payload is None else [payload])
    return frames


def rejected(job: str, frames: list[bytes]) -> bool:
    """The pure validator's verdict (what the daemon must count as invalid)."""
    try:
        PeerMessages(job, 0, NODES, NODES).decode(frames)
        return False
    except ProtocolError:
        return True


@st.composite
def malformed(draw, job: str) -> list[bytes]:
    msg, payload = draw(well_formed(job))
    return _defects(draw, msg, payload)


# ---- pure: the validator ----------------------------------------------------------------------------
@HOSTILE
@given(frames=st.lists(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=3)
       | malformed("pure"))
@example(frames=[b"[" * 5000])
@example(frames=[b'{"v":1,"type":{"a":1},"job":"pure","src":0}'])
@example(frames=[b'{"v":1,"type":"hello","job":"pure","src":0,"recoverable":' + b"9" * 5000 + b"}"])
def test_peer_validator_raises_only_protocol_errors(frames):
    pm = PeerMessages("pure", 0, NODES, NODES)
    try:
        msg, payload = pm.decode(frames)
    except ProtocolError as e:
        assert len(str(e)) < 1000
        return
    assert msg["job"] == "pure" and 0 <= msg["src"] < NODES and msg["type"] in peerproto.SCHEMAS
    assert all(0 <= msg[f] < NODES for f in ("stripe", "number", "node") if f in msg)


@HOSTILE
@given(data=st.data())
def test_every_defect_of_a_valid_message_is_caught(data):
    msg, payload = data.draw(well_formed("pure"))
    PeerMessages("pure", 0, NODES, NODES).decode([json.dumps(msg).encode()] + ([] if payload is None else [payload]))
    frames = _defects(data.draw, dict(msg), payload)
    if frames == [json.dumps(msg).encode()] + ([] if payload is None else [payload]):
        return  # a defect that could not apply (no fields to drop or mistype)
    with pytest.raises(ProtocolError):
        PeerMessages("pure", 0, NODES, NODES).decode(frames)


# ---- pure: block numbers before every decode, and a round fed hostile frames ----------------------------
@HOSTILE
@given(k=st.integers(1, 5), m=st.integers(1, 3), data=st.data())
def test_decode_refuses_every_bad_block_number_list(k, m, data):
    """Duplicate numbers would spin zfec forever and out-of-range ones return garbage: anything but
    k distinct numbers in 0..k+m-1 is refused before zfec is called; valid ones decode exactly."""
    codec = Codec(k, m, "xor" if m == 1 and data.draw(st.booleans()) else "rs")
    blocks_data = [bytes([i + 1]) * 8 for i in range(k)]
    stripe = blocks_data + [bytes(p) for p in codec.encode(blocks_data)]
    nums = data.draw(st.lists(st.integers(-3, k + m + 3) | st.sampled_from([True, 1.0, "1", None]), max_size=k + 2))
    valid = (len(nums) == k and all(type(x) is int and 0 <= x < k + m for x in nums) and len(set(nums)) == k)
    blocks = [stripe[x] if type(x) is int and 0 <= x < k + m else bytes(8) for x in nums]
    if valid:
        assert [bytes(b) for b in codec.decode(blocks, nums)] == blocks_data
    else:
        with pytest.raises(InvalidBlocks):
            codec.check_blocks(blocks, nums)  # never reaches zfec (its decoder is tried in test_codec)
        if len(set(x for x in nums if type(x) is int)) == len(nums):
            with pytest.raises(InvalidBlocks):
                codec.decode(blocks, nums)  # no duplicates: safe to try the real entry point too


@HOSTILE
@given(seed=st.integers(0, 1 << 30), hostile=st.lists(st.sampled_from(
    ["bad hash", "wrong number", "wrong stripe", "no such frame", "wrong length", "replay", "outsider", "me",
     "outsider meta", "own meta"]), max_size=12), data=st.data())
def test_a_round_fed_hostile_frames_in_any_order_still_computes_the_right_parity(seed, hostile, data):
    """One parity holder's round (k = 2, m = 1, a cluster of 6 in groups of 3): honest frames in
    random order mixed with frames failing their checksum, carrying block numbers, stripes, frames or
    lengths that are wrong for their sender, replays, and frames or metadata from outside the group.
    Every bad one is refused (ProtocolError) or ignored, and the parity is exact."""
    gen = torch.Generator().manual_seed(seed)
    grouping = Grouping(6, 2, 1, 1)  # two groups of 3: nodes 0-2 and 3-5
    group = grouping.group_for(0)
    layout, me = group.layout, 1
    frame_size = 4096
    images = {n: torch.randint(0, 256, (int(torch.randint(1, 3 * frame_size, (1,), generator=gen)),),
                               dtype=torch.uint8, generator=gen).numpy().tobytes() for n in group.nodes}
    sizes = [len(images.get(n, b"")) for n in range(6)]
    shape = Shape.of([sizes[n] for n in group.nodes], layout.k, frame_size)
    codec = Codec(layout.k, layout.m, "xor")
    parity = bytearray(layout.m * shape.c)
    r = NodeRound(7, 3, sizes, group, me, NodeImage([memoryview(images[me])]), memoryview(parity), codec, frame_size)
    honest = []
    for n in group.nodes:
        if n == me:
            continue
        out = NodeRound(7, 3, sizes, group, n, NodeImage([memoryview(images[n])]),
                        memoryview(bytearray(layout.m * shape.c)), codec, frame_size)
        for f in list(out.queue.get(me, [])):
            payload, digest, zero = out.frame_payload(f)
            honest.append((n, {"round": 7, "step": 3, "stripe": f.stripe, "number": f.number, "frame": f.frame,
                               "length": f.hi - f.lo, "hash": digest, "zero": zero}, None if zero else bytes(payload)))
    bad = []
    for kind in hostile:
        src, msg, payload = honest[data.draw(st.integers(0, len(honest) - 1))]
        msg = dict(msg)
        if kind == "bad hash":
            payload, msg["zero"] = os.urandom(msg["length"]), False
        elif kind == "wrong number":
            msg["number"] = data.draw(st.sampled_from([n for n in range(layout.g) if n != msg["number"]]))
        elif kind == "wrong stripe":
            msg["stripe"] = data.draw(st.sampled_from([s for s in range(layout.g) if s != msg["stripe"]]))
        elif kind == "no such frame":
            msg["frame"] = len(shape.frames) + data.draw(st.integers(0, 5))
        elif kind == "wrong length":
            msg["length"] += 1
        elif kind in ("outsider", "me"):
            src = 4 if kind == "outsider" else me
        bad.append((kind, src, msg, payload))
    order = data.draw(st.permutations(list(range(len(honest) + len(bad)))))
    everything = [("honest",) + h for h in honest] + bad
    for i in order:
        kind, src, msg, payload = everything[i]
        if kind in ("outsider meta", "own meta"):
            with pytest.raises(ProtocolError):
                r.receive_meta(4 if kind == "outsider meta" else me, {"ranks": []})
            continue
        if kind in ("honest", "replay"):
            r.receive_chunk(src, msg, payload)
            continue
        with pytest.raises(ProtocolError):
            r.receive_chunk(src, msg, payload)
    for n in group.nodes:
        if n != me:
            r.receive_meta(n, {"ranks": []})
    assert r.complete
    padded = [bytes(images[n]) + bytes(layout.k * shape.c - len(images[n])) for n in group.nodes]
    (stripe,) = r.parity_stripes
    data_blocks = [padded[layout.holder(stripe, d)][d * shape.c:(d + 1) * shape.c] for d in range(layout.k)]
    assert bytes(parity) == bytes(codec.encode(data_blocks)[0])
    assert r.parity_record()["metas"].keys() == {str(n) for n in group.nodes if n != me}


# ---- against the cluster -------------------------------------------------------------------------------
@HOSTILE
@given(node=st.sampled_from([0, 1]), batch=st.data())
def test_malformed_peer_messages_are_dropped_counted_and_change_nothing(cluster, node, batch):
    frames_list = batch.draw(st.lists(malformed(cluster.job).filter(lambda f: rejected(cluster.job, f)),
                                      min_size=1, max_size=8))
    link = cluster.link(node)
    before = cluster.invalid(node)
    try:
        for frames in frames_list:
            link.send(frames)
        state, answers = link.barrier()
    finally:
        link.close()
    assert answers == [], f"a malformed message got an answer: {answers[0][0]!r:.300}"
    assert state["recoverable"] == cluster.step and not state["rebuilding"]
    assert cluster.invalid(node) - before == len(frames_list)


@st.composite
def phantoms(draw, cluster: Cluster) -> list[tuple[list[bytes], dict | None]]:
    """Well-formed messages about steps, stripes, blocks, frames, rounds and answers that do not
    exist, and replays of the last real round's messages; each with the answer it must get (or None)."""
    job, step = cluster.job, cluster.step
    epoch = cluster.status(0)["cluster"]["epoch"]
    _, record = cluster.segment(1, "par", step)
    old_round = record["round"]
    steps = st.sampled_from([step, max(0, step - 1), step + 1, step + 1000, 1 << 40]) | st.integers(0, 5)
    rounds = st.sampled_from([old_round, old_round + 1]) | st.integers(0, 1 << 52)
    out = []
    for _ in range(draw(st.integers(1, 10))):
        mtype = draw(st.sampled_from(["fetch", "fetch", "meta_query", "state_query", "node_meta", "chunk", "chunk",
                                      "chunk_ack", "abort", "refuse", "commit", "committed", "protected", "block",
                                      "state", "meta", "protect", "sync", "rank_query", "rank_fetch", "moved",
                                      "decode", "decode", "decoded"]))
        msg, payload = draw(well_formed(job, mtype))
        if "term" in msg:  # the cluster's term (0): replays and forgeries, not a claim of a newer term, which
            msg["term"] = 0  # any holder of the job key can make (README's threat model)
        for name in ("step", "round"):
            if name in msg:
                msg[name] = draw({"step": steps, "round": rounds}[name])
        if "qid" in msg:
            msg["qid"] = next(_qids)  # unique: answers are matched to queries by it
        expect = None
        if mtype == "fetch":
            msg["frame"] = draw(st.sampled_from([0, 0, 1, 3, 1 << 40]))
            expect = {"type": "block", "qid": msg["qid"]}
        elif mtype == "meta_query":
            expect = {"type": "meta", "qid": msg["qid"]}
        elif mtype == "decode":  # a rebuilding node's request that a node gather and decode one frame
            msg["frame"] = draw(st.sampled_from([0, 0, 1, 1 << 40]))
            if draw(st.booleans()):  # one that fits: the block of node src, from the other two blocks
                src = msg["src"]
                number = cluster.layout.block_number(cluster.group.position(src), msg["stripe"])
                msg.update(number=number, sources=[b for b in range(NODES) if b != number])
            expect = {"type": "decoded", "qid": msg["qid"]}
        elif mtype in ("rank_query", "rank_fetch"):  # a rank restoring elsewhere: rank 0 exists, 1 and 2 do not
            if mtype == "rank_fetch":
                msg["frame"] = draw(st.sampled_from([0, 0, 1, 1 << 40]))
            expect = {"type": "rank_info" if mtype == "rank_query" else "block", "qid": msg["qid"]}
        elif mtype == "state_query":
            expect = {"type": "state", "qid": msg["qid"]}
        elif mtype == "protect":
            if draw(st.booleans()):  # a replay of the last real round's protect
                msg.update(round=old_round, step=step, sizes=[SIZES[n] for n in range(NODES)])
            else:                    # or a round of a step nobody holds
                msg["step"] = step + 1000 + draw(st.integers(0, 9))
        elif mtype == "sync":        # a replay of an old coordinator message (of this run's timeline or older)
            msg.update(target=draw(st.integers(0, step + 1)), recoverable=draw(st.integers(-1, step)),
                       epoch=draw(st.integers(0, epoch)))
        elif mtype == "chunk" and draw(st.booleans()):
            msg["hash"] ^= 1         # fails its checksum
        out.append(([json.dumps(msg).encode()] + ([] if payload is None else [payload]), msg, expect))
    replays = draw(st.lists(st.sampled_from(out), max_size=3))
    return draw(st.permutations(out + replays))


@HOSTILE
@given(node=st.sampled_from([0, 1]), data=st.data())
def test_messages_about_what_does_not_exist_get_errors_or_are_ignored(cluster, node, data):
    batch = data.draw(phantoms(cluster))
    link = cluster.link(node)
    queries = {m["qid"]: (m, e) for _, m, e in batch if e is not None}
    try:
        for frames, _, _ in batch:
            link.send(frames)
        state, answers = link.barrier()
        # a decode is answered once its sources came from the other holders: maybe after the barrier
        if {q for q, (m, _) in queries.items() if m["type"] == "decode"} - {m["qid"] for m, _ in answers}:
            time.sleep(1.0)
            answers += link.barrier()[1]
    finally:
        link.close()
    assert state["recoverable"] == cluster.step
    _, record = cluster.segment(node, "par", cluster.step)
    got = {}
    for msg, payload in answers:
        assert msg["qid"] in queries, f"an answer to nothing: {msg!r:.300}"
        query, expect = queries[msg["qid"]]
        assert msg["type"] == expect["type"] and msg["src"] == node
        got[msg["qid"]] = True
        if msg["type"] == "block" and query["type"] == "rank_fetch":
            data, meta = cluster.segment(node, "r0", cluster.step)
            nbytes, fs = meta["manifest"]["nbytes"], cluster.frame_size
            serves = query["step"] == cluster.step and query["rank"] == 0 and query["frame"] * fs < nbytes
            event(f"rank fetch {'served' if serves else 'refused'}")
            if serves:
                want = data.read_bytes()[query["frame"] * fs:min(nbytes, (query["frame"] + 1) * fs)]
                assert msg["error"] == "" and payload == want and msg["hash"] == chunk_checksum(want), msg
            else:
                assert msg["error"] and payload == b"", msg
        elif msg["type"] == "rank_info":
            held = query["step"] == cluster.step and query["rank"] == 0
            assert msg["held"] == held and msg["rank"] == query["rank"], msg
            if held:
                assert msg["manifest"]["nbytes"] == SIZES[node] and msg["holder"] == node
        elif msg["type"] == "block":
            serves = (query["step"] == cluster.step and query["frame"] * record["frame_size"] < max(record["c"], 1)
                      and cluster.layout.block_number(cluster.group.position(node), query["stripe"]) == query["number"])
            event(f"fetch {'served' if serves else 'refused'}")
            if serves:
                assert msg["error"] == "", msg
                want = cluster.expected_block(node, query["step"], query["number"], query["frame"])
                assert payload == want and msg["hash"] == chunk_checksum(want)
            else:
                assert msg["error"] and payload == b"", msg
        elif msg["type"] == "decoded":
            event(f"decode {msg['error'][:60] if msg['error'] else 'served'}")
            if msg["error"]:
                assert payload == b"" and msg["bad"] in range(-1, NODES), msg
            else:  # what node src holds there, decoded from the two other blocks
                assert query["step"] == cluster.step and query["src"] != node
                want = cluster.expected_block(query["src"], query["step"], query["number"], query["frame"])
                assert payload == want and msg["hash"] == chunk_checksum(want), msg
        elif msg["type"] == "meta":
            event(f"meta {'given' if msg['meta'] else 'none'}")
            assert (msg["meta"] is not None) == (query["step"] == cluster.step), msg
            if msg["meta"]:
                assert msg["meta"]["node"]["nbytes"] == SIZES[query["node"]]
        else:
            assert msg["recoverable"] == cluster.step
    assert got.keys() == queries.keys(), "a query went unanswered"


@pytest.mark.parametrize("mtype,fields", [
    ("sync", {"target": 0, "recoverable": -1, "epoch": 1 << 20, "term": 0}),  # "a new run: drop everything"
    ("disk_load", {"epoch": 1 << 20, "step": 0, "term": 0}),
    ("abort", {"round": 0, "reason": "forged", "term": 0}),
    ("report_query", {"term": 0}),
])
def test_a_coordinator_message_from_another_node_is_refused(cluster, mtype, fields):
    """Only node 0 coordinates term 0: a sync, round, disk or report message of that term in another
    node's name is refused and counted, and the node keeps what it holds (a sync of a newer epoch would otherwise drop the run)."""
    link = cluster.link(1)
    before = cluster.invalid(1)
    try:
        link.send([header(cluster.job, mtype, src=2, **fields)])
        state, answers = link.barrier()
    finally:
        link.close()
    assert answers == [] and state["recoverable"] == cluster.step and not state["rebuilding"]
    assert cluster.invalid(1) - before == 1
    cluster.segment(1, "par", cluster.step)  # the parity is still there


def test_after_the_hostile_batches_protection_goes_on_and_nothing_is_lost(cluster):
    """Stands alone, but runs after the batches above: every daemon serves, its recoverable step did
    not move, a new round completes and every node restores its snapshot bit for bit."""
    assert cluster.c.recoverable() == [cluster.step] * NODES
    assert all(cluster.status(n)["cluster"]["lost_error"] is None for n in range(NODES))
    cluster.protect_next()
    cluster.assert_restores()


def test_a_chunk_failing_its_checksum_in_a_live_round_is_refused(cluster):
    """The test plays the coordinator for node 1: it opens a round of node 1's held step (one
    nobody else runs), and sends chunks whose checksums fail, whose block numbers or stripes are
    wrong for their sender, whose frames are out of range, half of them before the round opens; each
    is refused and counted, and the real coordinator's next sync closes the round without touching
    the protected parity."""
    step = cluster.step
    par, record = cluster.segment(1, "par", step)
    parity_before = par.read_bytes()
    pos = {n: cluster.group.position(n) for n in range(NODES)}
    stripe = cluster.layout.parity_stripes(pos[1])[0]
    senders = [(n, cluster.layout.block_number(pos[n], stripe)) for n in (0, 2)]
    fs, c = record["frame_size"], record["c"]
    length = min(c, fs)
    for attempt in range(3):
        link = cluster.link(1)
        before = cluster.invalid(1)
        rid = 424242 + attempt
        bad = []
        for src, number in senders:
            payload = os.urandom(length)
            common = dict(round=rid, step=step, frame=0, length=length, zero=False)
            bad += [
                [header(cluster.job, "chunk", src=src, stripe=stripe, number=number, hash=chunk_checksum(payload) ^ 1,
                        **common), payload],                                                  # checksum fails
                [header(cluster.job, "chunk", src=src, stripe=stripe, number=(number + 1) % NODES,
                        hash=chunk_checksum(payload), **common), payload],                    # not its block number
                [header(cluster.job, "chunk", src=src, stripe=(stripe + 1) % NODES, number=number,
                        hash=chunk_checksum(payload), **common), payload],                    # no parity of it here
                [header(cluster.job, "chunk", src=src, stripe=stripe, number=number, hash=chunk_checksum(payload),
                        **{**common, "frame": 99}), payload],                                 # no such frame
                [header(cluster.job, "chunk", src=src, stripe=stripe, number=number, hash=chunk_checksum(payload),
                        **{**common, "step": step + 7}), payload],                            # another step
            ]
        # half of them come before the round opens (kept until it does), half after
        for frames in bad[:len(bad) // 2]:
            link.send(frames)
        link.send([header(cluster.job, "protect", src=0, round=rid, step=step, sizes=SIZES, term=0)])
        for frames in bad[len(bad) // 2:]:
            link.send(frames)
        link.barrier()
        live = cluster.status(1)["cluster"]["round"]
        counted = cluster.invalid(1) - before
        link.close()
        if live is not None and counted == len(bad):
            break  # (otherwise the real coordinator's sync closed the round in between: again)
    else:
        pytest.fail(f"the bad chunks were not all refused in the live round: {counted} of {len(bad)}")
    assert "fails its checksum" in Path(cluster.c.info["members"][1]["log"]).read_text()
    wait_for(lambda: cluster.status(1)["cluster"]["round"] is None, 15, "the real coordinator to close the round")
    assert par.exists() and par.read_bytes() == parity_before and segments.read_meta(par) == record
    assert cluster.c.recoverable() == [step] * NODES


def _rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def _peak(proc: psutil.Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_a_peer_cannot_make_a_daemon_allocate_beyond_its_budget(cluster):
    """Huge frames and headers, a protect announcing segments of 16 TiB, and 800 MiB of chunks for
    rounds that never start: no shared memory is reserved, resident memory stays within a bound
    independent of what was sent, every oversized message is refused, and the node serves."""
    node = 1
    proc = cluster.process(node)
    rss0, peak0, shm0 = _rss(proc), _peak(proc), cluster.shm_bytes(node)
    before = cluster.invalid(node)
    link = cluster.link(node)
    step = cluster.step
    big = os.urandom(MAX_FRAME)
    refused = 0
    # many rounds' worth of chunks that no "protect" will ever claim: 2 rounds x 100 x 4 MiB (in bursts
    # the daemon keeps up with, so what is measured is what it keeps, not what the transport queues);
    # it keeps what honest peers may send ahead of a round (their credit), and refuses the rest
    frame = big[:4 << 20]
    kept = load_config(cluster.c.config(node)).inflight_bytes * (NODES - 1) // len(frame)
    refused += 2 * (100 - kept)
    for i in range(200):
        link.send([header(cluster.job, "chunk", src=i % 2 * 2, round=1_000_000 + i // 100, step=step,
                          stripe=i % NODES, number=0, frame=i, length=len(frame), hash=chunk_checksum(frame),
                          zero=False), frame], copy=False)
        if i % 10 == 9:
            link.barrier()
    # a frame over the limit, a length over the limit, a header over the limit
    link.send([header(cluster.job, "chunk", src=0, round=5, step=step, stripe=0, number=0, frame=0,
                      length=MAX_FRAME, hash=0, zero=False), big + b"x"], copy=False)
    link.send([header(cluster.job, "chunk", src=0, round=5, step=step, stripe=0, number=0, frame=0,
                      length=MAX_FRAME + 1, hash=0, zero=False), big + b"x"], copy=False)
    link.send([header(cluster.job, "hello", src=0, recoverable=-1)[:-1] + b" " * MAX_HEADER + b"}"])
    refused += 3
    # segments of 16 TiB for a step the node holds: its own size wrong, then only the others'
    huge = [1 << 44] * NODES
    link.send([header(cluster.job, "protect", src=0, round=77, step=step, sizes=huge, term=0)])
    refused += 1
    huge[node] = SIZES[node]
    link.send([header(cluster.job, "protect", src=0, round=78, step=step, sizes=huge, term=0)])
    link.barrier(timeout=30)
    assert cluster.invalid(node) - before == refused
    grown, peaked = _rss(proc) - rss0, _peak(proc) - peak0
    assert grown < RSS_SLACK and peaked < RSS_SLACK, f"resident memory grew by {grown >> 20} MiB (peak +{peaked >> 20})"
    assert cluster.shm_bytes(node) <= shm0  # (the spare parity segment, too small for 16 TiB, may be gone)
    # a frame over the transport's limit is cut off before the daemon's code sees it
    over = cluster.link(node)
    over.send([header(cluster.job, "state_query", qid=1), bytes(MAX_PEER_MESSAGE + 1)])
    assert not over.sock.poll(500)
    over.close()
    link.barrier()
    assert cluster.invalid(node) - before == refused
    log = Path(cluster.c.info["members"][node]["log"]).read_text()
    assert "exceeds" in log and "memory budget" in log
    assert cluster.c.recoverable() == [step] * NODES
    cluster.protect_next()


def test_a_peer_that_asks_and_never_reads_the_answers_costs_a_bounded_amount(cluster):
    """Thousands of fetches of node 1's frames (mostly zero padding, which a reply must not copy)
    from a link that never reads: the daemon's memory stays bounded and it goes on serving."""
    node = 1
    proc = cluster.process(node)
    rss0, peak0 = _rss(proc), _peak(proc)
    pos = cluster.group.position(node)
    data_stripes = [s for s in range(NODES) if cluster.layout.block_number(pos, s) < cluster.k]
    deaf = cluster.link(node, setup=lambda s: s.setsockopt(zmq.RCVHWM, 1))
    for i in range(3000):
        stripe = data_stripes[i % len(data_stripes)]
        deaf.send([header(cluster.job, "fetch", src=0, qid=i, step=cluster.step, stripe=stripe,
                          number=cluster.layout.block_number(pos, stripe), frame=0)])
    link = cluster.link(node)
    link.barrier(timeout=30)
    time.sleep(0.5)  # what the daemon queued for the deaf link stays queued
    grown, peaked = _rss(proc) - rss0, _peak(proc) - peak0
    assert grown < RSS_SLACK and peaked < RSS_SLACK, f"resident memory grew by {grown >> 20} MiB (peak +{peaked >> 20})"
    assert cluster.status(node)["cluster"]["stats"]["sends_dropped"] > 0
    deaf.close()
    link.barrier()


def test_with_curve_a_client_without_the_key_gets_nothing_through(tmp_path):
    """A cluster with one shared key (`ftd keygen --out`, ``--key-file``): a plain client, one with its
    own key pair that knows the cluster's public key, and one with another cluster's key send
    well-formed queries and garbage to a daemon's peer socket: no answer, nothing counted, nothing
    logged; a client with the cluster key is answered. (tests/unit/cluster/test_auth.py covers the
    sockets alone; this is the daemon as launched. Per-node keys: tests/e2e/cluster/test_node_keys.py.)"""
    from ftd.cluster.auth import generate_key_file
    shared = tmp_path / "cluster.key"
    generate_key_file(shared)
    c = LocalCluster(2, 1, ("--key-file", str(shared)))
    ctx = zmq.Context()
    try:
        wait_for(lambda: all(c.ping(n) for n in range(2)), 30, "the daemons to be ready")
        assert c.status(1)["cluster"]["secure"] and c.status(1)["cluster"]["security"] == "shared key"
        key = load_key_file(shared)
        other = tmp_path / "other.key"
        generate_key_file(other)
        pub, sec = zmq.curve_keypair()

        def own_pair(sock):
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, key.public

        other_sec = PeerSecurity(load_key_file(other))
        endpoint = c.info["members"][1]["peer_endpoint"]
        intruders = [Link(ctx, endpoint, c.job), Link(ctx, endpoint, c.job, own_pair),
                     Link(ctx, endpoint, c.job, other_sec.client)]
        for link in intruders:
            for frames in ([header(c.job, "state_query", src=0, qid=5)], [b"\xff garbage"],
                           [header(c.job, "hello", src=0, recoverable=1 << 40)]):
                try:
                    link.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        time.sleep(1.0)
        assert [link.sock.poll(0) for link in intruders] == [0, 0, 0], "an intruder got an answer"
        st_ = c.status(1)["cluster"]
        assert st_["stats"]["invalid_messages"] == 0 and st_["recoverable"] == -1
        assert "peer message" not in Path(c.info["members"][1]["log"]).read_text()
        good_sec = PeerSecurity(key)
        good = Link(ctx, endpoint, c.job, good_sec.client)
        state, _ = good.barrier()
        assert state["src"] == 1
        for link in intruders + [good]:
            link.close()
    finally:
        ctx.destroy(linger=0)
        left = c.close()
    assert not left, f"shared memory left behind: {left}"


def test_a_node_lost_after_the_attacks_is_rebuilt_bit_for_bit(cluster):
    """The final proof that nothing the attacks did corrupted what the others hold for node 1: lose
    node 1 entirely (daemon SIGKILLed, its shared memory deleted), restart it, and it rebuilds from its
    peers' data and parity; every node then restores bit for bit."""
    node = 1
    cluster.clients.pop(node).close(timeout=5)
    pid = cluster.status(node)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             "node 1's daemon to die")
    for p in SHM.iterdir():
        if p.name.startswith(f"ftd.{cluster.job}.n{node}."):
            p.unlink()
    config = load_config(cluster.c.config(node))
    for p in (config.socket_path, config.socket_path.with_suffix(".lock")):
        p.unlink(missing_ok=True)
    cluster.c.restart_daemon(node)
    rebuild = wait_for(lambda: (cluster.status(node)["cluster"]["last_rebuild"] or {}).get("rebuilt_data")
                       and cluster.status(node)["cluster"]["last_rebuild"], 30, "node 1's rebuild")
    assert rebuild["ok"] and rebuild["step"] == cluster.step and rebuild["rebuilt_parity"]
    assert rebuild["decoded_frames"] > 0  # its peers decoded its frames for it
    cluster.assert_restores()
