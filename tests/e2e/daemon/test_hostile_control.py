"""Hostile input on a daemon's control socket, property-based (hypothesis).

Random bytes, truncated and oversized frames, wrong protocol versions, unknown types, fields of the
wrong kind or out of range, forged sessions and buffers, ranks and steps that do not exist, several
frames where one is expected, a trainer's own requests replayed in any order, and garbage that is
not even ZeroMQ. The daemon must answer every
request with a v1 reply (an error exactly when the pure validator refuses it, never an "internal
error"), count what it refused, keep serving, and lose nothing: a snapshot taken before the batch
restores bit for bit afterwards, and its memory stays bounded.

One real daemon process serves the whole module; it and its shared memory are removed at the end,
even when a test fails.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import psutil
import pytest
import torch
import zmq
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ftd
from ftd.control import protocol
from ftd.errors import ProtocolError
from ftd.shm.checksum import chunk_checksum
from ftd.shm.layout import Manifest, plan_layout

from support.jobs import ROOT, LocalJob

pytestmark = pytest.mark.timeout(120)

# reproducible in CI: the same examples on every run, no example database
HOSTILE = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REPLY_MS = 5000
RSS_SLACK = 64 << 20  # what the daemon's resident memory may grow by over a hostile batch


# ---- strategies ----------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
#: a value for any field: right kind in range, right kind out of range, or the wrong kind
field_values = (st.integers(-2, 5) | st.integers(protocol.MAX_STEP - 2, 1 << 64) | st.integers(1 << 20, 1 << 21)
                | st.text(max_size=16) | st.text(min_size=protocol.MAX_STR, max_size=protocol.MAX_STR + 2)
                | st.floats() | st.booleans() | st.none() | st.lists(st.integers(), max_size=3)
                | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
mtypes = st.sampled_from(sorted(protocol.SCHEMAS)) | st.sampled_from(["", "Ping", "shutdown", "status "]) | json_values
versions = st.just(protocol.VERSION) | st.sampled_from([0, 2, -1, "1", 1.5, None, [1]]) | json_values


@st.composite
def requests(draw) -> dict:
    """A request object close to the schema: each field kept, dropped, or replaced by any value."""
    mtype = draw(mtypes)
    msg = {"v": draw(versions), "type": mtype}
    schema = protocol.SCHEMAS.get(mtype, {}) if isinstance(mtype, str) else {}
    for name, (kind, required) in schema.items():
        if draw(st.booleans()) or draw(st.booleans()):
            msg[name] = draw(field_values)
    if draw(st.integers(0, 5)) == 0:
        msg[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    if draw(st.integers(0, 4)) == 0:
        del msg[draw(st.sampled_from(["v", "type"]))]
    return msg


def _harmless(msg) -> bool:
    """Schema-valid requests a stranger may legitimately send: anything but taking over rank 0 (whose
    trainer is the test's), and `ftd clear` (an operator's command, which drops every snapshot on
    purpose); sessions and buffers are never guessed (they are 64-bit random tokens)."""
    return not (isinstance(msg, dict) and (msg.get("type") == "register" and msg.get("rank") == 0
                                           or msg.get("type") == "clear"))


NO_PROCESS = 1 << 30  # above any pid_max: a registration "by" it is one of a process that is gone


def _by_no_live_process(msg):
    """A registration claims a pid; one that is alive would hold its rank, and a daemon stop would then
    keep the node's snapshots for it (as it must for a real trainer)."""
    if isinstance(msg, dict) and msg.get("type") == "register" and "pid" in msg:
        msg = {**msg, "pid": NO_PROCESS}
    return msg


def _truncate(frame: bytes, cut: int) -> bytes:
    return frame[:cut % max(1, len(frame))]


VALID = [protocol.request("ping"), protocol.request("status"),
         protocol.request("register", rank=3, world=4, pid=NO_PROCESS),
         protocol.request("begin", session="0123456789abcdef", step=5, nbytes=4096),
         protocol.request("restore", rank=7)]

frames = st.one_of(
    st.sampled_from(VALID),
    st.binary(max_size=300),
    st.builds(_truncate, st.sampled_from(VALID), st.integers(0, 200)),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests().filter(_harmless).map(_by_no_live_process).map(lambda m: json.dumps(m).encode()),
)
#: one request: usually one frame, sometimes none or several (the daemon expects exactly one)
multipart = st.one_of(frames.map(lambda f: [f]), st.lists(frames, min_size=2, max_size=3), st.just([]))


def pure_verdict(parts: list[bytes]) -> bool:
    """What the pure validator says: True if the request is well formed (one frame, valid)."""
    if len(parts) != 1:
        return False
    try:
        protocol.decode_request(parts[0])
        return True
    except ProtocolError:
        return False


# ---- the daemon under attack ---------------------------------------------------------------------
class Target:
    def __init__(self, job: LocalJob):
        self.job = job
        self.ctx = zmq.Context()
        self.client: ftd.Client | None = None
        self.refused = 0  # requests the test sent that the daemon must count as invalid

    def start(self) -> "Target":
        self.daemon = self.job.daemon()
        self.proc = psutil.Process(self.daemon.proc.pid)
        gen = torch.Generator().manual_seed(7)
        state = {"w": torch.randn(300_000, generator=gen), "ids": torch.arange(1000, dtype=torch.int64),
                 "meta": {"epoch": 3, "name": "before the attack"}}
        self.expected = {"w": state["w"].clone(), "ids": state["ids"].clone(), "meta": dict(state["meta"])}
        self.client = ftd.Client(self.daemon.endpoint, rank=0, world_size=1, capture_rng=False)
        self.client.snapshot(0, {"w": torch.zeros(10)})
        assert self.client.wait(10)
        self.client.snapshot(1, state)
        assert self.client.wait(10)
        return self

    def dealer(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(self.daemon.endpoint)
        return s

    def status(self) -> dict:
        s = self.dealer()
        try:
            s.send_multipart([b"", protocol.request("status")])
            assert s.poll(REPLY_MS), "the daemon stopped answering"
            reply = json.loads(s.recv_multipart()[-1])
        finally:
            s.close()
        assert reply["ok"], reply
        return reply

    def assert_serving_and_intact(self) -> dict:
        """Alive, answering, counting, and the snapshot of step 1 restores bit for bit."""
        assert self.daemon.proc.poll() is None, self.daemon.log()[-3000:]
        st_ = self.status()
        assert st_["invalid_requests"] == self.refused
        restored = {"w": None, "ids": None, "meta": None}
        with ftd.Client(self.daemon.endpoint, rank=0, world_size=1, capture_rng=False) as c:
            assert c.restore(restored) == 1
        assert restored["w"].numpy().tobytes() == self.expected["w"].numpy().tobytes()
        assert torch.equal(restored["ids"], self.expected["ids"]) and restored["meta"] == self.expected["meta"]
        return st_

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    job = LocalJob(tmp_path_factory.mktemp("hostile-control"))
    t = Target(job)
    try:
        yield t.start()
    finally:
        try:
            t.close()
        finally:
            left = job.cleanup()  # the daemon and its shared memory, even when a test failed
    assert not left, f"shared memory left behind: {left}"


# ---- pure validation ---------------------------------------------------------------------------------
@HOSTILE
@given(frame=frames)
@example(frame=b"[" * 5000)                                  # nested deeper than the parser's stack
@example(frame=b'{"v":1,"type":"ping","x":' + b"9" * 5000 + b"}")  # an integer of 5000 digits
@example(frame=b'{"v":1,"type":["ping"]}')                     # an unhashable type
@example(frame=b'{"v":1,"type":{"a":1}}')
@example(frame=b'{"v":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]],"type":"ping"}')
def test_the_validator_accepts_only_schema_valid_requests_and_raises_nothing_else(frame):
    try:
        msg = protocol.decode_request(frame)
    except ProtocolError as e:
        assert len(str(e)) < 1000, "an error message must stay short whatever the input"
        return
    schema = protocol.SCHEMAS[msg["type"]]
    assert msg["v"] == protocol.VERSION and set(msg) <= set(schema) | {"v", "type"}
    assert all(name in msg for name, (_, required) in schema.items() if required)


# ---- against the daemon process ------------------------------------------------------------------------
@HOSTILE
@given(batch=st.lists(multipart, min_size=1, max_size=6), delimiter=st.booleans())
@example(batch=[[b"[" * 5000], [b'{"v":1,"type":[1]}'], [b'{"v":1,"type":"ping","p":' + b"7" * 5000 + b"}"],
                [b'{"v":1,"type":"' + b"x" * 5000 + b'"}']], delimiter=True)
def test_every_hostile_request_gets_a_reply_and_the_daemon_keeps_serving(target, batch, delimiter):
    s = target.dealer()
    try:
        bodies = []
        for parts in batch:
            wire = ([b""] if delimiter else []) + parts
            if wire:
                s.send_multipart(wire)
                # the daemon takes an empty frame after the sender's identity for a REQ delimiter
                bodies.append(parts if delimiter or parts[0] != b"" else parts[1:])
        for body in bodies:
            assert s.poll(REPLY_MS), f"no reply to {body!r:.200}"
            reply = protocol.decode_reply(s.recv_multipart()[-1])
            well_formed = pure_verdict(body)
            target.refused += not well_formed
            event("well formed: " + ("refused" if not reply["ok"] else "served") if well_formed else "malformed")
            error = reply.get("error", "")
            assert well_formed or (reply["ok"] is False and error), f"{body!r:.200} was accepted: {reply!r:.200}"
            assert len(error) < 1000, f"an error reply of {len(error)} characters"
            assert "internal error" not in error, error
        assert not s.poll(0), "more replies than requests"
    finally:
        s.close()
    assert target.daemon.proc.poll() is None


def test_state_after_the_hostile_batches(target):
    """Runs after the batches above (module order, but stands alone): the daemon counted every
    refusal, serves, the snapshot taken before restores bit for bit, and its memory did not grow
    with a flood of garbage."""
    rss0 = target.proc.memory_info().rss
    s = target.dealer()
    try:
        for i in range(500):
            s.send_multipart([b"", os.urandom(64 + i)])
        for _ in range(500):
            assert s.poll(REPLY_MS)
            assert not json.loads(s.recv_multipart()[-1])["ok"]
    finally:
        s.close()
    target.refused += 500
    target.assert_serving_and_intact()
    assert target.proc.memory_info().rss - rss0 < RSS_SLACK
    assert "request refused" in target.daemon.log()
    # and the command-line client still gets its status
    out = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--endpoint", target.daemon.endpoint, "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    st_ = json.loads(out.stdout)
    assert st_["ranks"][0]["versions"][0]["step"] == 1 and st_["invalid_requests"] == target.refused


def test_oversized_frames_are_cut_off_by_the_transport(target):
    """A frame over MAX_MESSAGE_BYTES never reaches the daemon's code: ZeroMQ drops the connection
    (ZMQ_MAXMSGSIZE), so it costs no memory; one just below the limit gets an error reply."""
    rss0 = target.proc.memory_info().rss
    big = target.dealer()
    try:
        big.send_multipart([b"", b"{" * (protocol.MAX_MESSAGE_BYTES + 1)])
        assert not big.poll(1000), "an oversized request got an answer"
        near = target.dealer()
        try:
            near.send_multipart([b"", b'{"v":1,"type":"' + b"x" * (protocol.MAX_MESSAGE_BYTES - 100) + b'"}'])
            assert near.poll(REPLY_MS * 2)
            reply = json.loads(near.recv_multipart()[-1])
            error = reply.get("error", "")
            assert not reply["ok"] and len(error) < 1000, f"reply of {len(error)} characters"
            assert error.startswith("unknown request type 'xxx"), error
            target.refused += 1
        finally:
            near.close()
    finally:
        big.close()
    target.assert_serving_and_intact()
    assert target.proc.memory_info().rss - rss0 < RSS_SLACK


EMPTY_MANIFEST = Manifest(plan_layout([]), 4096, (chunk_checksum(b""),), None).to_json()


def test_replayed_and_reordered_trainer_requests_never_cost_the_newest_version(job):
    """Trainer ranks spoken for by hand (a fresh rank per example, on a daemon of their own) register
    and commit steps 0 and 1; then any of their five requests come again, in any order. Double
    buffering holds: the version of the last commit that succeeded is never overwritten (a stale
    begin gets the other buffer, a stale commit is refused), and nothing counts as malformed."""
    d = job.daemon()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(d.endpoint)
    ranks = itertools.count(1)

    def call(request: bytes) -> dict:
        s.send_multipart([b"", request])
        assert s.poll(REPLY_MS), "the daemon stopped answering"
        reply = protocol.decode_reply(s.recv_multipart()[-1])
        assert "internal error" not in reply.get("error", ""), reply
        return reply

    @settings(HOSTILE, max_examples=25)
    @given(replays=st.lists(st.integers(0, 4), max_size=12))
    def replay(replays):
        rank = next(ranks)
        sent = [protocol.request("register", rank=rank, world=1000, pid=os.getpid())]
        session = call(sent[0])["session"]
        for step in (0, 1):
            sent.append(protocol.request("begin", session=session, step=step, nbytes=1))
            buffer = call(sent[-1])["buffer"]
            sent.append(protocol.request("commit", session=session, buffer=buffer, step=step,
                                         manifest=EMPTY_MANIFEST))
            assert call(sent[-1])["ok"]
        last = 1
        for i in replays:
            reply = call(sent[i])
            if reply["ok"] and b'"commit"' in sent[i]:
                last = json.loads(sent[i])["step"]
            session = reply.get("session", session)  # a replayed register starts a new session
        status = call(protocol.request("status"))
        (mine,) = [r for r in status["ranks"] if r["rank"] == rank]
        assert mine["versions"] and mine["versions"][0]["step"] == last, mine
        assert status["invalid_requests"] == 0
        call(protocol.request("detach", rank=rank, pid=os.getpid()))  # as a closing client does

    try:
        replay()
    finally:
        s.close()
        ctx.destroy(linger=0)


_ZMTP_GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)


@settings(HOSTILE, max_examples=15)
@given(garbage=st.binary(min_size=1, max_size=4096), greet=st.booleans())
def test_bytes_that_are_not_zeromq_do_not_disturb_the_daemon(target, garbage, greet):
    """Raw bytes on the daemon's unix socket, with or without a valid ZMTP greeting in front."""
    raw = socket.socket(socket.AF_UNIX)
    try:
        raw.settimeout(2)
        raw.connect(str(target.daemon.socket))
        raw.sendall((_ZMTP_GREETING if greet else b"") + garbage)
    except OSError:
        pass  # the daemon may close a connection that is not ZeroMQ at any point
    finally:
        raw.close()
    assert target.status()["invalid_requests"] == target.refused
