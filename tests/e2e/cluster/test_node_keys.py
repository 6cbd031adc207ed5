"""A peer speaks only for itself: per-node keys on a launched cluster, attacked by a key holder.

``ftd launch --secure`` gives every daemon its own key (``DIR/keys/node-R.key``) and the roster. The
test holds node 1's key file, as a node gone bad (or whoever stole that file) would, and sends the
daemons messages as node 2: refused, counted, logged once, never answered or acted on; as node 1
itself it is answered, so the refusal is of the claim, not of the connection. A key outside the roster
gets nothing through. Node 1's key cannot make numbers from the future believed either: a step or
epoch far beyond the others', a term far ahead. Throughout, the honest cluster protects (a trainer
client per node snapshots a step of its own random data) and restores it bit for bit.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import zmq

import ftd
from ftd.cluster.auth import PeerSecurity
from ftd.cluster.plausible import STEP_AHEAD
from ftd.util.procs import wait_for

from support.clusters import LocalCluster

NODES = 3
QUIET_S = 1.0  # how long an answer that must not come is waited for


def header(job: str, mtype: str, src: int, **fields) -> bytes:
    return json.dumps({"v": 1, "type": mtype, "job": job, "src": src, **fields}).encode()


class Holder:
    """A raw DEALER to one daemon's peer socket, with a key of the caller's choice."""

    def __init__(self, ctx: zmq.Context, endpoint: str, setup):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        setup(self.sock)
        self.sock.connect(endpoint)

    def send(self, frame: bytes) -> None:
        self.sock.send_multipart([frame])

    def answers(self, until_qid: int | None = None, wait: float = QUIET_S) -> list[dict]:
        """What comes back until the answer to query ``until_qid`` (the link is ordered: the daemon
        handled everything sent before it), or for ``wait`` seconds if None."""
        got, deadline = [], time.monotonic() + (10.0 if until_qid is not None else wait)
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            got.append(json.loads(self.sock.recv_multipart()[0]))
            if until_qid is not None and got[-1].get("qid") == until_qid:
                return got
        assert until_qid is None, f"no answer to query {until_qid}"
        return got


def protect(c: LocalCluster, clients: dict, step: int) -> dict[int, torch.Tensor]:
    """Every node's trainer client snapshots ``step`` (random data of its own); waits until it is
    recoverable everywhere."""
    expected = {}
    for n, client in clients.items():
        expected[n] = torch.randn(64 << 10, generator=torch.Generator().manual_seed(1000 * n + step))
        client.snapshot(step, {"x": expected[n].clone()})
    for n, client in clients.items():
        assert client.wait(10.0), f"node {n} did not commit step {step}"
    wait_for(lambda: c.recoverable() == [step] * NODES, 30, f"step {step} to become recoverable on every node")
    return expected


def assert_restores(c: LocalCluster, step: int, expected: dict[int, torch.Tensor]) -> None:
    for n in range(NODES):
        out = {"x": None}
        with ftd.Client(c.endpoints[n], rank=0, world_size=1, capture_rng=False) as client:
            assert client.restore(out) == step
        assert out["x"].numpy().tobytes() == expected[n].numpy().tobytes(), f"node {n} restored other bytes"


@pytest.fixture
def cluster():
    c = LocalCluster(NODES, 1, ("--secure", "--peer-timeout", "5"))
    c.clients = {}
    try:
        wait_for(lambda: all(c.ping(n) for n in range(NODES)), 30, "the daemons to be ready")
        c.clients.update({n: ftd.Client(c.endpoints[n], rank=0, world_size=1, capture_rng=False)
                          for n in range(NODES)})
        yield c
    finally:
        try:
            for client in c.clients.values():
                client.close(timeout=5)
        finally:
            left = c.close()
    assert not left, f"shared memory left behind: {left}"


@pytest.mark.timeout(90)
def test_a_node_key_speaks_only_for_its_node_and_numbers_from_the_future_are_refused(cluster):
    c = cluster
    assert {c.status(n)["cluster"]["security"] for n in range(NODES)} == {"per-node keys"}
    recoverable = 3
    protect(c, c.clients, recoverable)
    keys = c.dir / "keys"
    stolen = PeerSecurity.from_key_file(keys / "node-1.key")  # node 1's key, pinning the servers' keys
    ctx = zmq.Context()
    try:
        endpoints = [m["peer_endpoint"] for m in c.info["members"]]
        to0 = Holder(ctx, endpoints[0], lambda s: stolen.client(s, 0))  # node 0 coordinates (term 0)
        # -- as node 2: nothing answered, nothing acted on; as itself: answered
        for frame in (header(c.job, "state_query", 2, qid=11),
                      header(c.job, "reset", 2, term=0, epoch=0, reason="node 2 starts a new run (forged)"),
                      header(c.job, "alive", 2, term=0, latest=recoverable + 3),
                      header(c.job, "state_query", 2, qid=12)):
            to0.send(frame)
        to0.send(header(c.job, "state_query", 1, qid=13))
        answers = to0.answers(until_qid=13)
        assert [(a["type"], a["qid"]) for a in answers] == [("state", 13)], answers  # in order: the rest was refused
        st0 = c.status(0)["cluster"]
        assert st0["stats"]["impostors_refused"] == 4 and st0["epoch"] == 0, st0["stats"]
        log0 = Path(c.info["members"][0]["log"]).read_text()
        assert log0.count("authenticated as 'node-1' that claims to be node 2") == 1  # logged once per peer
        assert "a new run of job" not in log0

        # -- a key outside the roster: no answer, whatever it claims
        pub, sec = zmq.curve_keypair()

        def outsider(s):
            s.curve_secretkey, s.curve_publickey, s.curve_serverkey = sec, pub, stolen.server_key(0)
        stranger = Holder(ctx, endpoints[0], outsider)
        stranger.send(header(c.job, "state_query", 1, qid=21))
        assert stranger.answers() == []
        assert "is not in this job's roster" in Path(c.info["members"][0]["log"]).read_text()

        # -- as node 1 itself, numbers from the future: refused, counted; the coordinator's target stays
        far = recoverable + 2 * STEP_AHEAD
        to0.send(header(c.job, "alive", 1, term=0, latest=far))
        to0.send(header(c.job, "hello", 1, term=0, recoverable=far, epoch=0))
        to0.send(header(c.job, "hello", 1, term=0, recoverable=-1, epoch=1 << 40))
        to2 = Holder(ctx, endpoints[2], lambda s: stolen.client(s, 2))
        future_term = 1 + NODES * (1 << 22)  # node 1's own term (t % 3 == 1), over 4 million terms ahead
        to2.send(header(c.job, "beat", 1, term=future_term))
        to0.send(header(c.job, "state_query", 1, qid=14))  # the barrier: what came before was handled
        assert [a["qid"] for a in to0.answers(until_qid=14) if a["type"] == "state"] == [14]
        st0 = c.status(0)["cluster"]
        assert st0["stats"]["implausible_refused"] == 3, st0["stats"]
        assert st0["coordinator"]["target"] < far and st0["epoch"] == 0
        text = c.ftd("status", "--config", c.config(0)).stdout
        assert "CURVE (per-node keys)" in text and "refused peer messages: 4 sent as another node than its key's, " \
            "3 implausible" in text, text
        st2 = wait_for(lambda: (lambda s: s if s["coordination"]["implausible_refused"] else None)(
            c.status(2)["cluster"]), 10, "node 2 to refuse the far term")
        assert st2["coordination"]["term"] == 0 and st2["coordination"]["node"] == 0
        for h in (to0, to2, stranger):
            h.sock.close(0)
    finally:
        ctx.destroy(linger=0)

    # the honest cluster went on: it protects the next step, and every node restores it bit for bit
    expected = protect(c, c.clients, recoverable + 1)
    assert_restores(c, recoverable + 1, expected)
    assert all(c.status(n)["cluster"]["coordination"]["term"] == 0 for n in range(NODES))
