"""Who coordinates: terms, when a node takes over, and what a new coordinator rebuilds. Pure.

A *term* numbers the cluster's coordinators: term t is coordinated by node ``t % N``, so a term
names its coordinator and two nodes that take over at once never pick the same one. The cluster
starts in term 0 (node 0). Every coordinator message carries its term, and so does every node's
message to the coordinator. A node follows the highest term it has seen (from either kind of
message) unless it is too far ahead to be believed (``plausible``: refused as a forgery); a
coordinator message of an older term is *stale*: refused, counted, and answered with
the node's term, so that an old coordinator still running (it was frozen, or partitioned) learns it
was replaced and stops. A coordinator message of the current term from any other node than the
term's coordinator is refused as forged.

Takeover: the coordinator sends every node something at least every ``resend`` seconds (a ``beat``
when it has nothing else to say). A node that has heard nothing from its term's coordinator for
``peer_timeout`` seconds, plus half of that for each live-rank candidate ahead of it (the nodes of
lower rank, the coordinator aside), takes over in the next term of its own (``next_term``). So the
lowest rank that still hears nobody goes first; the others hear its first message (a higher term)
and follow. Two claimants that overlap are sorted out by the terms: the higher one wins and the
other steps down when it hears of it. Nothing here needs a majority, because nothing a coordinator
decides needs one: a step becomes recoverable only when *every* node reported ``done`` for it in
the coordinator's own term, so a minority side (indeed any side short of one node) never declares
a step recoverable, whoever coordinates it.

A new coordinator first gathers the nodes' reports (``takeover``). Nothing here does I/O.
"""
from __future__ import annotations

from typing import Callable

from ftd.cluster.plausible import implausible_term
from ftd.errors import ProtocolError

STALE, NEWER, CURRENT = "stale", "newer", "current"
STAGGER = 0.5  # of peer_timeout, per candidate ahead of a node in the takeover order


class Terms:
    """One node's view of who coordinates (``term``, ``leader``) and when it takes over."""

    def __init__(self, me: int, nodes: int, peer_timeout: float, clock: Callable[[], float]):
        self.me, self.nodes, self.peer_timeout, self.clock = me, nodes, peer_timeout, clock
        self.term = 0
        self.heard = clock()       # last message from the term's coordinator
        self.stale = 0             # coordinator (or coordination) messages of an older term, refused
        self.implausible = 0       # ... of a term too far ahead to be believed (``plausible``), refused
        self.takeovers: list[dict] = []

    def leader_of(self, term: int) -> int:
        return term % self.nodes

    @property
    def leader(self) -> int:
        return self.leader_of(self.term)

    def _see(self, term: int) -> str:
        why = implausible_term(term, self.term, self.nodes)
        if why is not None:
            self.implausible += 1
            raise ProtocolError(why)
        if term < self.term:
            self.stale += 1
            return STALE
        if term > self.term:
            self.term = term
            self.heard = self.clock()  # a new coordinator: it gets its full peer_timeout
            return NEWER
        return CURRENT

    def from_coordinator(self, src: int, term: int) -> str:
        """A coordinator message (sync, protect, beat, ...) of ``term`` from node ``src``: STALE (refuse
        it), NEWER (follow the new term, then act on it) or CURRENT (act on it). ProtocolError if
        ``src`` is not that term's coordinator."""
        if src != self.leader_of(term):
            raise ProtocolError(f"a coordinator message of term {term} comes from node {self.leader_of(term)} "
                                f"(its coordinator), not from node {src}")
        verdict = self._see(term)
        if verdict != STALE:
            self.heard = self.clock()
        return verdict

    def from_node(self, term: int) -> str:
        """A node's message to the coordinator in ``term``: STALE (the node has not heard of the
        current term yet), NEWER (someone took over since: follow), CURRENT."""
        return self._see(term)

    def next_term(self) -> int:
        """The smallest term above every one known whose coordinator is this node."""
        t = self.term + 1
        return t + (self.me - t) % self.nodes

    def take_over(self, why: str, at: float) -> int:
        """Become the coordinator of a new term; returns it."""
        old = self.term
        self.term = self.next_term()
        self.heard = self.clock()
        self.takeovers = (self.takeovers + [{"term": self.term, "from_term": old, "why": why[:200], "at": at}])[-5:]
        return self.term

    def order(self) -> int:
        """How many candidates are ahead of this node: the lower ranks, the current coordinator aside."""
        return self.me - (1 if self.me > self.leader else 0)

    def silence(self) -> float:
        """Seconds since the term's coordinator was last heard."""
        return self.clock() - self.heard

    def due(self) -> bool:
        """Whether this node takes over now: not the coordinator, and it has not heard it for its wait."""
        if self.leader == self.me:
            return False
        return self.silence() > self.peer_timeout * (1 + STAGGER * self.order())
