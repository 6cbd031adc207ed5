"""Who node r is: the membership record the daemons keep among themselves, and its rules. Pure.

The record maps every node rank to its member: the peer endpoint it answers at, a *generation*
(0: as the configs list it; +1 each time the coordinator admits a replacement for that rank) and
the key *identity* that may speak for the rank (``node-<r>`` by default; a spare that takes rank r
brings its own, ``identity_for`` is what the receiving side checks keys against).

Why generations: records travel between daemons (gossip) and may be old (a daemon restarted with
its config, a message delayed), so a merge keeps, per rank, the member of the higher generation, and
an old record can never roll a replacement back. Two members of one generation that differ are a
conflict: the record keeps its own and says so (only a coordinator admits, one generation at a time).

Admission (``Claims``, run by the coordinator, whoever it is): a daemon that is node r at another
endpoint than the record's *claims* rank r. The coordinator probes rank r's current member (pings)
and admits the claim only once that member has been silent for ``peer_timeout`` and did not answer
a probe for ``PROBE`` seconds: a live node is never replaced, its claimant is refused. A spare host's
claim is filed by the coordinator itself, for a rank that has been silent that long (``SparePool``:
one spare per rank, one rank per spare).

The record of a daemon lives only in memory: a restarted daemon starts from its config's ``peers``
(generation 0) and re-learns the rest from its peers' answers (``members``), the newer generation
winning; nothing is written to disk.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from ftd.errors import FtdError, ProtocolError

ENDPOINT = re.compile(r"^tcp://[^\s:/]+:\d{1,5}$")
IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_GENERATION = 1 << 40
PROBE = 2.0  # seconds (at most half of peer_timeout) a claimed rank's member gets to answer a probe


class MembershipRefused(FtdError):
    """A change of the membership record that cannot be admitted (the reason says why and what to do)."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry  # the claimant may ask again (its view was old, or the rank is still being decided)


def default_identity(rank: int) -> str:
    return f"node-{rank}"


@dataclasses.dataclass(frozen=True)
class Member:
    endpoint: str
    generation: int = 0
    identity: str = ""


@dataclasses.dataclass(frozen=True)
class Merge:
    record: Membership
    changed: tuple[int, ...]     # ranks whose member the other record replaced
    conflicts: tuple[str, ...]   # ranks both records hold in one generation, differently (kept ours)
    behind: bool                 # the other record lacks something newer of ours (tell it)


@dataclasses.dataclass(frozen=True)
class Membership:
    members: tuple[Member, ...]

    @classmethod
    def from_peers(cls, peers) -> Membership:
        """The record as the config lists it: every rank at generation 0, with its default identity."""
        return cls(tuple(Member(ep, 0, default_identity(r)) for r, ep in enumerate(peers)))

    # ---- reading ------------------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        return len(self.members)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    @property
    def version(self) -> int:
        """Grows with every admission: two daemons whose versions differ should compare records."""
        return sum(m.generation for m in self.members)

    def endpoint_of(self, rank: int) -> str:
        return self.members[rank].endpoint

    def generation_of(self, rank: int) -> int:
        return self.members[rank].generation

    def identity_for(self, rank: int) -> str:
        """The key identity that may speak for node ``rank`` (``node-<rank>`` unless a spare took it)."""
        return self.members[rank].identity

    def may_send(self, identity: str, msg: dict) -> bool:
        """Whether a message that came on the key of ``identity`` may speak for its ``src``: the rank's
        identity in the record; a ``claim`` names the identity it claims with (it is not in the record
        yet), and a ``member_query`` asks only for what every node may read. For per-node keys to call."""
        if msg["type"] == "member_query":
            return True
        if msg["type"] in ("claim", "spare_offer"):
            return identity == msg["identity"]
        return identity == self.identity_for(msg["src"])

    def rank_at(self, endpoint: str) -> int | None:
        return next((r for r, m in enumerate(self.members) if m.endpoint == endpoint), None)

    def table(self) -> list[dict]:
        return [{"node": r, "endpoint": m.endpoint, "generation": m.generation, "identity": m.identity}
                for r, m in enumerate(self.members)]

    # ---- changing -----------------------------------------------------------------------------
    def merge(self, other: Membership) -> Merge:
        """Per rank, the member of the higher generation; a tie that differs keeps ours."""
        if other.nodes != self.nodes:
            raise ProtocolError(f"a membership record of {other.nodes} nodes, this cluster has {self.nodes}")
        out, changed, conflicts, behind = list(self.members), [], [], False
        for r, (mine, theirs) in enumerate(zip(self.members, other.members)):
            if theirs.generation > mine.generation:
                out[r] = theirs
                changed.append(r)
            elif theirs.generation < mine.generation:
                behind = True
            elif theirs != mine:
                conflicts.append(f"node {r}: {theirs.endpoint} ({theirs.identity}) against ours {mine.endpoint} "
                                 f"({mine.identity}), both generation {mine.generation}")
        record = Membership(tuple(out))
        if changed:
            record._check_distinct()
        return Merge(record, tuple(changed), tuple(conflicts), behind)

    def admit(self, rank: int, endpoint: str, identity: str) -> Membership:
        """Rank ``rank`` at ``endpoint`` in the next generation (checks by ``check_claim`` first)."""
        out = list(self.members)
        out[rank] = Member(endpoint, self.members[rank].generation + 1, identity)
        return Membership(tuple(out))

    def check_claim(self, rank: int, endpoint: str, identity: str, known: int) -> bool:
        """Whether a claim of ``rank`` at ``endpoint`` (by a daemon that saw generation ``known`` of it)
        is plausible: True if it names the current member (nothing to change), False if it is to be
        decided (``Claims``); MembershipRefused otherwise."""
        if not 0 <= rank < self.nodes:
            raise MembershipRefused(f"node {rank} is not a node of this cluster (nodes 0..{self.nodes - 1})")
        if not ENDPOINT.match(endpoint) or not IDENTITY.match(identity):
            raise MembershipRefused(f"a claim of node {rank} at {endpoint[:80]!r} as {identity[:80]!r}: the endpoint "
                                    f"must be tcp://host:port and the identity 1-64 letters, digits, '.', '_', '-'")
        holder = next((r for r, m in enumerate(self.members) if r != rank and m.identity == identity), None)
        if holder is None and identity != default_identity(rank):
            holder = next((r for r in range(self.nodes) if r != rank and identity == default_identity(r)), None)
        if holder is not None:  # with per-node keys, one key would then speak for two ranks
            raise MembershipRefused(f"a claim of node {rank} as {identity!r}: that identity is node {holder}'s; "
                                    f"a replacement claims as {default_identity(rank)!r}, a spare under its own name")
        cur = self.members[rank]
        if endpoint == cur.endpoint:
            return True
        other = self.rank_at(endpoint)
        if other is not None:
            raise MembershipRefused(f"{endpoint} is node {other}'s peer endpoint; a node cannot take another's address")
        if known < cur.generation:
            raise MembershipRefused(f"the claim of node {rank} is based on generation {known}, but node {rank} is at "
                                    f"generation {cur.generation} ({cur.endpoint}) now", retry=True)
        if known > cur.generation:
            raise MembershipRefused(f"the claim of node {rank} names generation {known}, newer than any admitted "
                                    f"(generation {cur.generation}, {cur.endpoint})")
        return False

    def _check_distinct(self) -> None:
        seen: dict[str, int] = {}
        for r, m in enumerate(self.members):
            if m.endpoint in seen:
                raise ProtocolError(f"a membership record names {m.endpoint} for nodes {seen[m.endpoint]} and {r}")
            seen[m.endpoint] = r

    # ---- on the wire --------------------------------------------------------------------------
    def to_wire(self) -> dict:
        return {"endpoints": list(self.endpoints), "generations": [m.generation for m in self.members],
                "identities": [m.identity for m in self.members]}

    @classmethod
    def from_wire(cls, data, nodes: int) -> Membership:
        """A record from another daemon, checked (ProtocolError saying what is wrong)."""
        if not isinstance(data, dict) or set(data) != {"endpoints", "generations", "identities"}:
            raise ProtocolError("a membership record has exactly endpoints, generations and identities")
        eps, gens, ids = data["endpoints"], data["generations"], data["identities"]
        if not all(isinstance(x, list) and len(x) == nodes for x in (eps, gens, ids)):
            raise ProtocolError(f"a membership record lists {nodes} endpoints, generations and identities")
        for r, (ep, g, i) in enumerate(zip(eps, gens, ids)):
            if not isinstance(ep, str) or not ENDPOINT.match(ep):
                raise ProtocolError(f"membership record: node {r}'s endpoint is not tcp://host:port")
            if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= MAX_GENERATION:
                raise ProtocolError(f"membership record: node {r}'s generation is not in 0..{MAX_GENERATION}")
            if not isinstance(i, str) or not IDENTITY.match(i):
                raise ProtocolError(f"membership record: node {r}'s identity is not 1-64 letters, digits, '.', "
                                    f"'_', '-'")
        record = cls(tuple(Member(ep, g, i) for ep, g, i in zip(eps, gens, ids)))
        record._check_distinct()
        return record


@dataclasses.dataclass
class Claim:
    rank: int
    endpoint: str
    identity: str
    since: float


class Claims:
    """The coordinator's claims to decide: a claim is admitted once the rank's current member has been
    silent for ``peer_timeout`` (``heard_from``: any message from it, an answer to a probe included)
    and at least ``probe`` seconds passed since the claim came; any word from the member refuses it."""

    def __init__(self, nodes: int, peer_timeout: float, clock: Callable[[], float]):
        self.peer_timeout, self.clock = peer_timeout, clock
        self.probe = min(PROBE, peer_timeout / 2)
        self.heard = {n: clock() for n in range(nodes)}
        self.pending: dict[int, Claim] = {}
        self.refused: list[dict] = []  # recent refusals (status)

    def heard_from(self, rank: int) -> Claim | None:
        """Rank ``rank``'s current member spoke: it is alive. Returns its claim that is now refused, if any."""
        self.heard[rank] = self.clock()
        return self.pending.pop(rank, None)

    def submit(self, record: Membership, rank: int, endpoint: str, identity: str, known: int) -> bool:
        """A claim came. True: it names the current member (answer it at once); False: pending (``due``
        decides). MembershipRefused if it is not plausible, or another claim of the rank is pending."""
        if record.check_claim(rank, endpoint, identity, known):
            return True
        cur = self.pending.get(rank)
        if cur is not None and cur.endpoint != endpoint:
            raise MembershipRefused(f"node {rank} is being claimed by {cur.endpoint} already; a rank goes to one "
                                    f"claimant", retry=True)
        if cur is None:
            self.pending[rank] = Claim(rank, endpoint, identity, self.clock())
        return False

    def silence(self, rank: int) -> float:
        return self.clock() - self.heard[rank]

    def due(self) -> list[Claim]:
        """The pending claims to admit now (removed from pending)."""
        now = self.clock()
        ready = [c for c in self.pending.values()
                 if now - self.heard[c.rank] >= self.peer_timeout and now - c.since >= self.probe]
        for c in ready:
            del self.pending[c.rank]
        return ready

    def note_refusal(self, rank: int, endpoint: str, reason: str, at: float) -> None:
        self.refused = (self.refused + [{"node": rank, "endpoint": endpoint, "reason": reason[:200], "at": at}])[-5:]


class SparePool:
    """The spares that offer themselves to the coordinator (every second; ``ttl`` without an offer:
    gone), and which one is in the claim of which rank: one spare per rank, one rank per spare."""

    def __init__(self, clock: Callable[[], float], ttl: float = 3.0):
        self.clock, self.ttl = clock, ttl
        self.offers: dict[str, tuple[str, float]] = {}  # identity -> (endpoint, last offer)
        self.claimed: dict[int, str] = {}               # rank -> the spare in its claim

    def offer(self, identity: str, endpoint: str) -> None:
        self.offers[identity] = (endpoint, self.clock())

    def pick(self, lost: list[int]) -> list[tuple[int, str, str]]:
        """(rank, identity, endpoint): a free spare for each of ``lost`` that has none, lowest ranks first."""
        now = self.clock()
        self.offers = {i: o for i, o in self.offers.items() if now - o[1] <= self.ttl or i in self.claimed.values()}
        free = [(i, ep) for i, (ep, _) in sorted(self.offers.items()) if i not in self.claimed.values()]
        out = []
        for rank in sorted(r for r in lost if r not in self.claimed):
            if not free:
                break
            identity, endpoint = free.pop(0)
            self.claimed[rank] = identity
            out.append((rank, identity, endpoint))
        return out

    def done(self, rank: int, admitted: bool) -> str | None:
        """The claim of ``rank`` is over; returns its spare (admitted: it leaves the pool)."""
        identity = self.claimed.pop(rank, None)
        if admitted and identity is not None:
            self.offers.pop(identity, None)
        return identity
