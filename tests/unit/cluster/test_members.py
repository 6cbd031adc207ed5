"""A node's membership side (``cluster.members``) against scripted peers: settling, claiming, admitting."""
from __future__ import annotations

import time
import types

import pytest

from ftd.cluster.members import ALONE_WAIT, Members
from ftd.cluster.membership import Membership
from ftd.config import Config

from support.clocks import Clock

pytestmark = pytest.mark.unit

PEERS = ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002")
NEW = "tcp://127.0.0.2:6000"


class Links:
    def __init__(self):
        self.sent, self.replies, self.endpoints = [], [], {}

    def send(self, dest, mtype, payload=None, **fields):
        self.sent.append((dest, mtype, fields))
        return True

    def reply(self, envelope, dest, mtype, payload=None, **fields):
        self.replies.append((envelope, dest, mtype, fields))
        return True

    def repoint(self, node, endpoint):
        self.endpoints[node] = endpoint


def node(me: int, advertise: str = "", coordinates: bool = False, term: int = 0):
    config = Config(peers=PEERS, node_rank=me, advertise=advertise, peer_timeout=4.0)
    n = types.SimpleNamespace(config=config, me=me, links=Links(), started=True,
                              coordinator=object() if coordinates else None,
                              leadership=types.SimpleNamespace(terms=types.SimpleNamespace(term=term), leader=term % 3))
    return n


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(time, "monotonic", c)
    return c


def record_msg(src: int, record: Membership, term: int = 0, **extra) -> dict:
    return {"type": "members", "src": src, "members": record.to_wire(), "coord_term": term, **extra}


def test_a_daemon_at_its_listed_address_settles_on_a_peers_record_or_alone(clock):
    n = node(1)
    m = Members(n)
    m.start()
    assert not m.settled and {(d, t) for d, t, _ in n.links.sent} == {(0, "member_query"), (2, "member_query")}
    m.on_message(record_msg(0, Membership.from_peers(PEERS)), None)
    m.tick()
    assert m.settled and m.waiting is None
    alone = Members(node(2))
    alone.start()
    clock.t += ALONE_WAIT
    alone.tick()
    assert alone.settled


def test_a_replacement_claims_from_the_coordinator_its_peers_name_and_settles_when_admitted(clock):
    n = node(2, advertise=NEW)
    m = Members(n)
    m.start()
    clock.t += 60.0
    m.tick()
    assert not m.settled  # under a new address it never starts on its own
    m.on_message(record_msg(0, Membership.from_peers(PEERS), term=4), None)  # term 4: node 1 coordinates
    m.tick()
    claims = [(d, f) for d, t, f in n.links.sent if t == "claim"]
    assert claims == [(1, {"endpoint": NEW, "identity": "node-2", "known": 0})] and not m.settled
    admitted = Membership.from_peers(PEERS).admit(2, NEW, "node-2")
    m.on_message({"type": "claim_answer", "src": 1, "ok": True, "retry": False, "reason": "", "coord_term": 4,
                  "members": admitted.to_wire()}, None)
    m.tick()
    assert m.settled and m.record == admitted


def test_a_refused_claim_stops_the_daemon(clock):
    m = Members(node(2, advertise=NEW))
    m.on_message({"type": "claim_answer", "src": 0, "ok": False, "retry": False, "coord_term": 0,
                  "reason": "node 2 answers at tcp://127.0.0.1:5002: a live node is not replaced",
                  "members": Membership.from_peers(PEERS).to_wire()}, None)
    assert "a live node is not replaced" in m.fatal


def test_the_coordinator_admits_after_silence_and_tells_every_node(clock):
    n = node(0, coordinates=True)
    m = Members(n)
    m.settled = True
    m.on_message({"type": "claim", "src": 2, "endpoint": NEW, "identity": "node-2", "known": 0}, ["env"])
    assert n.links.replies == []  # pending: node 2 was heard (at start) less than peer_timeout ago
    clock.t += 1.0
    m.tick()
    assert (2, "ping", {}) in n.links.sent
    clock.t += 3.5
    m.tick()
    assert n.links.endpoints == {2: NEW} and m.record.generation_of(2) == 1
    ((env, dest, mtype, fields),) = n.links.replies
    assert (env, dest, mtype, fields["ok"]) == (["env"], 2, "claim_answer", True)
    told = [d for d, t, f in n.links.sent if t == "members"]
    assert told == [1]
    assert m.status()["changes"][-1]["was"] == PEERS[2]


def test_a_pong_from_the_live_member_refuses_the_claim(clock):
    n = node(0, coordinates=True)
    m = Members(n)
    m.settled = True
    m.on_message({"type": "claim", "src": 1, "endpoint": NEW, "identity": "node-1", "known": 0}, ["env"])
    m.on_message({"type": "pong", "src": 1, "endpoint": PEERS[1]}, None)
    ((_, _, _, fields),) = n.links.replies
    assert not fields["ok"] and not fields["retry"] and "a live node is not replaced" in fields["reason"]
    assert m.record == Membership.from_peers(PEERS) and m.status()["refused"][-1]["endpoint"] == NEW


def test_a_node_that_does_not_coordinate_sends_the_claimant_on(clock):
    n = node(2, term=0)
    m = Members(n)
    m.settled = True
    m.on_message({"type": "claim", "src": 1, "endpoint": NEW, "identity": "node-1", "known": 0}, ["env"])
    ((_, _, _, fields),) = n.links.replies
    assert not fields["ok"] and fields["retry"] and "does not coordinate" in fields["reason"]


def test_a_stale_record_changes_nothing_and_a_settled_node_given_away_stops(clock):
    n = node(2)
    m = Members(n)
    m.settled = True
    newer = Membership.from_peers(PEERS).admit(1, NEW, "node-1")
    m.on_message(record_msg(0, newer), None)
    assert m.record == newer and n.links.endpoints == {1: NEW}
    m.on_message(record_msg(0, Membership.from_peers(PEERS)), None)  # generation 0 again: old news
    assert m.record == newer and m.fatal is None
    m.on_message(record_msg(0, newer.admit(2, "tcp://127.0.0.3:7000", "node-2")), None)
    assert "no longer node 2" in m.fatal


def test_a_coordinator_message_of_another_version_starts_a_comparison(clock):
    n = node(1)
    m = Members(n)
    m.settled = True
    m.on_version(0, 3)
    m.on_version(0, 3)  # at most one per GOSSIP_EVERY
    assert [(d, t, f["ask"]) for d, t, f in n.links.sent] == [(0, "members", True)]
    clock.t += 2.0
    m.on_version(0, 0)  # the same version: nothing to compare
    assert len(n.links.sent) == 1


def test_hearsay_does_not_move_a_member_this_node_hears(clock):
    n = node(2, term=0)  # node 0 coordinates
    m = Members(n)
    m.settled = True
    moved = Membership.from_peers(PEERS).admit(1, NEW, "node-1")
    m.on_message(record_msg(1, moved), None)  # from node 1, not the coordinator, about a member heard just now
    assert m.record == Membership.from_peers(PEERS) and n.links.endpoints == {}
    clock.t += 5.0  # node 1's member silent for longer than peer_timeout: the record may be right
    m.on_message(record_msg(1, moved), None)
    assert m.record == moved


def test_the_coordinator_gives_a_silent_rank_to_one_spare(clock):
    n = node(0, coordinates=True)
    m = Members(n)
    m.settled = True
    for i in range(2):
        m.on_message({"type": "spare_offer", "src": 0, "endpoint": f"tcp://127.0.0.{3 + i}:7000",
                      "identity": f"spare-{i}"}, [f"env{i}"])
    assert [f["node"] for _, _, t, f in n.links.replies if t == "spare_answer"] == [-1, -1]
    clock.t += 1.0
    m.tick()
    assert not m.claims.pending  # nobody silent yet
    m.heard(1)
    clock.t += 3.5  # node 2 silent for peer_timeout (4 s), node 1 heard 3.5 s ago
    for i in range(2):  # the spares keep offering themselves (an offer lasts 3 s)
        m.on_message({"type": "spare_offer", "src": 0, "endpoint": f"tcp://127.0.0.{3 + i}:7000",
                      "identity": f"spare-{i}"}, [f"env{i}"])
    m.tick()
    assert list(m.claims.pending) == [2] and m.claims.pending[2].identity == "spare-0"
    for i in range(2):
        m.on_message({"type": "spare_offer", "src": 0, "endpoint": f"tcp://127.0.0.{3 + i}:7000",
                      "identity": f"spare-{i}"}, [f"env{i}"])
    m.heard(1)
    clock.t += 2.0  # the probe's time: admitted
    m.tick()
    assert m.record.endpoint_of(2) == "tcp://127.0.0.3:7000" and m.record.identity_for(2) == "spare-0"
    (env, _, _, fields) = [r for r in n.links.replies if r[2] == "spare_answer"][-1]
    assert env == ["env0"] and fields["node"] == 2
    assert m.status()["spares"] == {"spare-1": "tcp://127.0.0.4:7000"}
