"""The membership record's rules: merges by generation, plausible claims, when a claim is admitted."""
from __future__ import annotations

import pytest
from ftd.cluster.membership import Claims, Member, Membership, MembershipRefused, SparePool
from ftd.errors import ProtocolError

from support.clocks import Clock

pytestmark = pytest.mark.unit

PEERS = ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002")
NEW = "tcp://127.0.0.2:6000"


def test_from_peers_names_every_rank_at_generation_zero():
    r = Membership.from_peers(PEERS)
    assert r.endpoints == PEERS and r.version == 0
    assert [r.identity_for(n) for n in range(3)] == ["node-0", "node-1", "node-2"]
    assert r.rank_at(PEERS[2]) == 2 and r.rank_at(NEW) is None


def test_admit_raises_the_generation_and_keeps_the_others():
    r = Membership.from_peers(PEERS).admit(2, NEW, "spare-0")
    assert r.endpoint_of(2) == NEW and r.generation_of(2) == 1 and r.identity_for(2) == "spare-0"
    assert r.endpoints[:2] == PEERS[:2] and r.version == 1


def test_merge_takes_the_higher_generation_and_never_rolls_back():
    old = Membership.from_peers(PEERS)
    new = old.admit(1, NEW, "node-1")
    m = old.merge(new)
    assert m.record == new and m.changed == (1,) and not m.behind and not m.conflicts
    back = new.merge(old)  # a stale record (a daemon restarted with its config) changes nothing
    assert back.record == new and back.changed == () and back.behind


def test_merge_of_a_tie_that_differs_keeps_ours_and_says_so():
    a = Membership.from_peers(PEERS)
    b = Membership((a.members[0], Member(NEW, 0, "node-1"), a.members[2]))
    m = a.merge(b)
    assert m.record == a and m.changed == () and len(m.conflicts) == 1 and "node 1" in m.conflicts[0]


def test_merge_refuses_a_record_of_another_size_or_with_an_endpoint_twice():
    a = Membership.from_peers(PEERS)
    with pytest.raises(ProtocolError, match="2 nodes, this cluster has 3"):
        a.merge(Membership.from_peers(PEERS[:2]))
    twice = Membership((a.members[0], Member(PEERS[0], 1, "node-1"), a.members[2]))
    with pytest.raises(ProtocolError, match="for nodes 0 and 1"):
        a.merge(twice)


def test_wire_round_trip_and_validation():
    r = Membership.from_peers(PEERS).admit(0, NEW, "node-0")
    assert Membership.from_wire(r.to_wire(), 3) == r
    bad = [None, {"endpoints": list(PEERS)}, {**r.to_wire(), "extra": 1},
           {**r.to_wire(), "endpoints": ["udp://x:1", *PEERS[1:]]},
           {**r.to_wire(), "generations": [0, -1, 0]}, {**r.to_wire(), "generations": [0, True, 0]},
           {**r.to_wire(), "identities": ["node 0", "node-1", "node-2"]},
           {**r.to_wire(), "endpoints": [PEERS[0], PEERS[0], PEERS[2]]}]
    for data in bad:
        with pytest.raises(ProtocolError):
            Membership.from_wire(data, 3)
    with pytest.raises(ProtocolError, match="lists 4"):
        Membership.from_wire(r.to_wire(), 4)


@pytest.mark.parametrize("rank,endpoint,identity,known,match,retry", [
    (3, NEW, "node-3", 0, "not a node of this cluster", False),
    (1, "http://x", "node-1", 0, "tcp://host:port", False),
    (1, NEW, "bad id!", 0, "identity", False),
    (1, PEERS[2], "node-1", 0, "node 2's peer endpoint", False),
    (1, NEW, "node-1", 5, "newer than any admitted", False),
    (2, NEW, "node-1", 0, "that identity is node 1's", False),   # node 1's key would speak for two ranks
])
def test_implausible_claims_are_refused(rank, endpoint, identity, known, match, retry):
    with pytest.raises(MembershipRefused, match=match) as e:
        Membership.from_peers(PEERS).check_claim(rank, endpoint, identity, known)
    assert e.value.retry is retry


def test_a_claim_based_on_an_old_view_is_refused_for_a_retry():
    r = Membership.from_peers(PEERS).admit(1, NEW, "node-1")
    with pytest.raises(MembershipRefused, match="generation 0, but node 1 is at generation 1") as e:
        r.check_claim(1, "tcp://127.0.0.3:7000", "node-1", 0)
    assert e.value.retry
    assert r.check_claim(1, NEW, "node-1", 1) is True  # the current member: nothing to decide
    assert r.check_claim(1, "tcp://127.0.0.3:7000", "node-1", 1) is False


def test_a_claim_waits_for_the_members_silence_then_is_due():
    clock = Clock()
    claims = Claims(3, peer_timeout=10.0, clock=clock)
    record = Membership.from_peers(PEERS)
    assert claims.submit(record, 2, NEW, "node-2", 0) is False
    clock.t += 9.0
    assert claims.due() == []                     # node 2 was heard at the start, 9 s ago
    clock.t += 1.5
    (c,) = claims.due()
    assert (c.rank, c.endpoint) == (2, NEW) and not claims.pending


def test_a_claim_of_a_long_silent_rank_still_waits_for_the_probe():
    clock = Clock()
    claims = Claims(3, peer_timeout=4.0, clock=clock)
    clock.t += 60.0
    claims.submit(Membership.from_peers(PEERS), 2, NEW, "node-2", 0)
    assert claims.due() == [] and claims.probe == 2.0
    clock.t += 2.0
    assert [c.rank for c in claims.due()] == [2]


def test_a_word_from_the_live_member_refuses_its_claim():
    clock = Clock()
    claims = Claims(3, peer_timeout=4.0, clock=clock)
    claims.submit(Membership.from_peers(PEERS), 1, NEW, "node-1", 0)
    clock.t += 3.9
    refused = claims.heard_from(1)
    assert refused is not None and refused.endpoint == NEW and not claims.pending
    clock.t += 10.0
    assert claims.due() == []


def test_one_claimant_per_rank():
    claims = Claims(3, peer_timeout=4.0, clock=Clock())
    record = Membership.from_peers(PEERS)
    claims.submit(record, 1, NEW, "node-1", 0)
    assert claims.submit(record, 1, NEW, "node-1", 0) is False  # the same claimant asking again
    with pytest.raises(MembershipRefused, match="being claimed by") as e:
        claims.submit(record, 1, "tcp://127.0.0.3:7000", "node-1", 0)
    assert e.value.retry


def test_may_send_ties_a_keys_identity_to_the_rank_it_speaks_for():
    r = Membership.from_peers(PEERS).admit(2, NEW, "spare-0")
    assert r.may_send("node-1", {"type": "done", "src": 1})
    assert not r.may_send("node-0", {"type": "done", "src": 1})
    assert r.may_send("spare-0", {"type": "alive", "src": 2}) and not r.may_send("node-2", {"type": "alive", "src": 2})
    assert r.may_send("spare-1", {"type": "claim", "src": 0, "identity": "spare-1"})
    assert not r.may_send("spare-1", {"type": "claim", "src": 0, "identity": "node-0"})
    assert r.may_send("anyone", {"type": "member_query", "src": 0})


def test_a_spare_that_holds_a_rank_cannot_claim_a_second_one():
    r = Membership.from_peers(PEERS).admit(2, NEW, "spare-0")
    with pytest.raises(MembershipRefused, match="that identity is node 2's"):
        r.check_claim(1, "tcp://127.0.0.3:7000", "spare-0", 0)
    assert r.check_claim(1, "tcp://127.0.0.3:7000", "spare-1", 0) is False  # another spare may
    assert r.check_claim(2, "tcp://127.0.0.3:7000", "node-2", 1) is False   # node 2's own key wins it back


def test_one_spare_per_lost_rank_and_one_rank_per_spare():
    clock = Clock()
    pool = SparePool(clock)
    pool.offer("spare-0", "tcp://127.0.0.3:1")
    pool.offer("spare-1", "tcp://127.0.0.4:1")
    assert pool.pick([2]) == [(2, "spare-0", "tcp://127.0.0.3:1")]
    assert pool.pick([2]) == []                       # rank 2 has its spare
    assert pool.pick([1, 2]) == [(1, "spare-1", "tcp://127.0.0.4:1")]
    assert pool.pick([0]) == []                       # no free spare left
    assert pool.done(1, admitted=False) == "spare-1"  # refused: spare-1 is free again
    clock.t += 5.0                                    # ... but stopped offering itself
    assert pool.pick([0]) == []
    assert pool.done(2, admitted=True) == "spare-0" and "spare-0" not in pool.offers
