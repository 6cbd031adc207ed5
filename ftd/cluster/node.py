"""The daemon's cluster side: one node of a group, its peer links, and the parts that share its state.

``ClusterNode`` owns what every part needs (the catalog, the parity store, the links, the node's
identity in its group) and hands each peer message to its handler through one table
(``_handlers``). The parts, each one concern:
  - ``rounds.ProtectionRounds``: pin, send, encode and report one step per round;
  - ``recovery.Recovery``: rebuilds from the peers, on their own thread;
  - ``moves.RankMoves``: ranks that restore here though another node holds their version (fetches);
  - ``decode_service.DecodeRequests``: frames a rebuilding peer asked this node to gather and decode;
  - ``durable.cluster_restore.ClusterDisk``: the flushes the coordinator marks, the restore from disk;
  - ``leadership.Leadership``: the term this node follows, and the ``coordinator.Coordinator`` it runs
    when it coordinates (node 0 in term 0, another node after a takeover): its messages to this
    node itself are delivered in-process;
  - ``members.Members``: the membership record (node rank -> endpoint, generation, identity): this
    node's claim of its rank when it comes back under another address, and, on the coordinator, the
    admission of others' claims. Until this node is *settled* in the record, nothing else starts.

Call order (the daemon's loop, one thread, no locks): ``start(ctx)`` once (links, the question
for the membership record; the start-up rebuild and the coordinator start in the first ``tick()``
after this node is settled in the record); then ``on_socket(sock)`` for each waiting peer message and ``tick()`` every
loop turn; the control side calls ``maybe_candidate()`` after a commit, ``restore_wait()`` before a
restore and ``on_restored()`` after it, ``on_corrupt()`` and ``start_recover()``; ``close()`` at exit.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import zmq

from ftd.cluster import moves
from ftd.cluster.auth import PeerSecurity
from ftd.cluster.decode_service import DecodeRequests
from ftd.cluster.erasure import Codec
from ftd.cluster.leadership import Leadership
from ftd.cluster.links import PeerLinks
from ftd.cluster.members import Members
from ftd.cluster.node_status import node_status
from ftd.cluster.messages import (
    FROM_COORDINATOR,
    MEMBERSHIP,
    TO_COORDINATOR,
    PeerMessages,
)
from ftd.cluster.parity_store import ParityStore
from ftd.cluster.plausible import implausible_claim
from ftd.cluster.recovery import Recovery
from ftd.cluster.rounds import ProtectionRounds
from ftd.cluster.traffic import PeerTraffic
from ftd.config import Config
from ftd.daemon.catalog import Catalog
from ftd.durable.cluster_restore import ClusterDisk
from ftd.durable.flusher import Flusher
from ftd.errors import ProtocolError
from ftd.shm.checksum import chunk_checksum

log = logging.getLogger(__name__)

NEW_RUN_ASK_AGAIN = 2.0  # seconds before an unanswered request for a new run is sent again

Handler = Callable[[dict, object, list | None], None]  # (message, payload, envelope of a query)


class ClusterNode:
    def __init__(self, config: Config, catalog: Catalog, flusher: Flusher | None = None):
        self.config, self.catalog = config, catalog
        self.me = config.node_rank
        self.grouping = config.grouping()
        self.group = self.grouping.group_for(self.me)
        self.layout = self.group.layout
        self.pos = self.group.position(self.me)
        self.codec = Codec(self.layout.k, self.layout.m, config.parity_code)
        self.messages = PeerMessages(config.job, self.me, config.nodes, self.layout.g)
        self.security = PeerSecurity.from_key_file(config.peer_key_file, config.peer_roster)
        self.security.check_nodes(config.nodes)
        if self.security.enabled and not self.security.per_node:
            log.info("peer links use a shared cluster key: any holder may speak as any node; per-node keys "
                     "(`ftd keygen --dir DIR --nodes %d`) are recommended", config.nodes)
        self.links: PeerLinks | None = None
        self.traffic = PeerTraffic()                      # peer messages by type, peer and bytes (status)
        catalog.clustered = True
        self.store = ParityStore(config, catalog, self.layout, self.pos)
        catalog.extra_used = lambda: self.store.parity_bytes
        self.ready = False                                # the start-up sync with the peers is over
        self.epoch = 0                                    # the cluster's timeline (restores from disk, new runs)
        self.fresh_epoch: int | None = None               # the epoch in which this node last dropped a run
        self.cluster_finished = False                     # every node's trainers finished the run
        self.new_run_wait: str | None = None              # why this node asked for a new run, until it starts
        self._new_run_asked = 0.0
        self.lost_error: str | None = None
        self.latest_step = -1                             # newest step a trainer asked to snapshot
        self.stats = {"rounds_done": 0, "rounds_aborted": 0, "bytes_sent": 0, "bytes_received": 0,
                      "last_round_seconds": None, "invalid_messages": 0, "implausible_refused": 0,
                      # commit of a step by the node's last rank -> that step recoverable on every node
                      "protection_lag": {"count": 0, "total_seconds": 0.0, "max_seconds": 0.0, "last_seconds": None}}
        self._implausible_logged: set[tuple[int, str]] = set()
        self.rounds = ProtectionRounds(self)
        self.recovery = Recovery(self)
        self.moves = moves.RankMoves(self)
        self.decodes = DecodeRequests(self)
        self.disk = ClusterDisk(self, flusher)
        self.leadership = Leadership(self, flushes=flusher is not None)
        self.members = Members(self)
        self.started = False                              # settled in the membership record: the rest runs
        self._handlers = self._handler_table()

    @property
    def coordinator(self):
        """The coordinator this node runs (of the term it follows), or None."""
        return self.leadership.coordinator

    # ---- start and stop ---------------------------------------------------------------------
    def start(self, ctx: zmq.Context) -> None:
        self.security.start(ctx)
        self.links = PeerLinks(self.config, ctx, self.security, self.messages, self.traffic)
        # per-node keys: who may speak for a rank, and whose server key a DEALER pins, follow the record
        self.security.set_identity_for(lambda rank: self.members.record.identity_for(rank))
        self.links.may_send = lambda identity, msg: self.members.record.may_send(identity, msg)
        self.members.start()

    def _start_cluster(self) -> None:
        """This node is settled in the membership record: its start-up rebuild and coordination begin."""
        self.started = True
        self.recovery.start("start-up: checking what the peers hold")
        self.leadership.start()

    @property
    def fatal(self) -> str | None:
        """Why this daemon must stop (its claim of its rank was refused, or another took the rank)."""
        return self.members.fatal

    def sockets(self) -> list[zmq.Socket]:
        return self.links.sockets() if self.links else []

    def close(self, keep: bool = False) -> None:
        """Stop; with ``keep``, leave the protected parity in shared memory for the next daemon."""
        self.recovery.close()
        self.moves.close()
        self.disk.close()
        self.rounds.drop_round()
        self.store.close(keep=keep)
        if self.links:
            self.links.close()
        self.security.stop()

    # ---- delivery -----------------------------------------------------------------------------
    def send(self, dest: int, mtype: str, payload=None, **fields) -> bool:
        """To node ``dest``; to this node itself (the coordinator's messages to node 0) in-process."""
        if not self.started and mtype not in MEMBERSHIP:
            return False  # not (yet) this rank's member: it speaks for nobody
        if dest == self.me:
            msg = {"type": mtype, "src": self.me, **fields}
            self.traffic.in_process(mtype)
            self._dispatch(None, msg, payload)
            return True
        return self.links.send(dest, mtype, payload, **fields)

    def to_coordinator(self, mtype: str, **fields) -> None:
        """To the coordinator of the term this node follows, in that term."""
        self.send(self.leadership.leader, mtype, term=self.leadership.terms.term, **fields)

    def flush_coordinator(self) -> None:
        """Deliver what the coordinator (if this node runs it) has to say, in its term; nothing more
        once it stepped down (a message to itself can teach it a newer term)."""
        for _ in range(100):  # messages to itself can make it speak again
            c = self.coordinator
            out = c.take() if c else None
            if not out:
                return
            for o in out:
                for d in o.dests:
                    if self.coordinator is not c:
                        return
                    self.send(d, o.mtype, term=c.term, mv=self.members.record.version, **o.fields)

    def on_socket(self, sock: zmq.Socket) -> None:
        got = self.links.receive(sock)
        if got is None:
            self.stats["invalid_messages"] += 1
            return
        envelope, msg, payload = got
        try:
            self._dispatch(envelope, msg, payload)
        except ProtocolError as e:
            self.stats["invalid_messages"] += 1
            log.warning("peer message from node %s refused: %s", msg.get("src"), e)
        self.flush_coordinator()

    def _dispatch(self, envelope, msg: dict, payload) -> None:
        mtype = msg["type"]
        if mtype in MEMBERSHIP:
            self.members.on_message(msg, envelope)
            return
        if not self.started:
            return  # until settled in the membership record (peers ask again)
        if msg["src"] != self.me:
            self.members.heard(msg["src"])
        if mtype in FROM_COORDINATOR and "mv" in msg:
            self.members.on_version(msg["src"], msg["mv"])
        if mtype in FROM_COORDINATOR and not self.leadership.from_coordinator(msg):
            return  # stale, or a beat or a report query (answered there)
        if mtype in TO_COORDINATOR and not self.leadership.from_node(msg):
            return  # for another coordinator, of another term, or not yet (it gathers)
        if mtype in TO_COORDINATOR and msg["src"] != self.me:  # (its own node is the coordinator's yardstick)
            why = implausible_claim(msg, self.coordinator)
            if why is not None:
                self._refuse_implausible(msg, why)
                return
        if self.coordinator:
            self.coordinator.heard_from(msg["src"])
        handler = self._handlers.get(mtype)
        if handler is not None:
            handler(msg, payload, envelope)

    def _refuse_implausible(self, msg: dict, why: str) -> None:
        """Counted; logged the first time per node and type (a liar repeats itself every second)."""
        self.stats["implausible_refused"] += 1
        seen = self._implausible_logged
        level = logging.WARNING if (msg["src"], msg["type"]) not in seen else logging.DEBUG
        seen.add((msg["src"], msg["type"]))
        log.log(level, "refused an implausible %s from node %d (not acted on): %s", msg["type"], msg["src"], why)

    def _handler_table(self) -> dict[str, Handler]:
        """Peer message type -> what this node does with it."""
        rounds, disk = self.rounds, self.disk
        table: dict[str, Handler] = {
            "sync": self._on_sync,
            "protect": self._on_protect,
            "node_meta": lambda m, p, e: rounds.on_round_message(m["src"], m, p),
            "chunk": lambda m, p, e: rounds.on_round_message(m["src"], m, p),
            "chunk_ack": lambda m, p, e: rounds.on_chunk_ack(m["src"], m["round"], m["length"]),
            "protected": lambda m, p, e: rounds.on_protected(m["step"]),
            "abort": lambda m, p, e: rounds.on_abort(m["round"], m["reason"]),
            "lost": lambda m, p, e: self._on_lost(m["src"], m["error"]),
            "disk_query": lambda m, p, e: disk.offer_disk(need=self.lost_error is not None, asked=True),
            "disk_load": lambda m, p, e: disk.on_disk_load(m["epoch"], m["step"]),
            "disk_none": lambda m, p, e: disk.on_disk_none(m["reason"]),
            "state_query": self._answer_state,
            "meta_query": self._answer_meta,
            "fetch": self._answer_fetch,
            "decode": lambda m, p, e: self.decodes.on_request(m, e),
            "block": lambda m, p, e: self.decodes.on_block(m, p),
            "rank_query": lambda m, p, e: self.moves.answer_query(m, e),
            "rank_fetch": lambda m, p, e: self.moves.answer_fetch(m, e),
            "moved": lambda m, p, e: self.moves.on_moved(m["src"], m["step"], m["rank"]),
        }
        def co(name: str, *fields: str, **optional) -> Handler:  # late-bound: the coordinator changes
            return lambda m, p, e: getattr(self.coordinator, name)(
                m["src"], *(m[f] for f in fields), *(m.get(f, d) for f, d in optional.items()))
        table.update({  # messages for the coordinator (``leadership`` lets them through only to it)
            "alive": co("on_alive", "latest", finished=False),
            "candidate": co("on_candidate", "target", "step", "nbytes", "mismatch", "recoverable", "latest", epoch=0),
            "done": co("on_done", "round", "step", "latest", flushing=False),
            "hello": co("on_hello", "recoverable", epoch=0),
            "refuse": co("on_refuse", "round", "reason"),
            "restored": co("on_restored", "step"),
            "disk_offer": co("on_disk_offer", "epoch", "recoverable", "steps", "need"),
            "disk_loaded": co("on_disk_loaded", "epoch", "step", "ok", "error"),
            "reset": co("on_reset", "epoch", "reason"),
            "report": lambda m, p, e: self.coordinator.on_report(m["src"], Leadership.report_of(m), m["fresh"]),
        })
        return table

    def _on_sync(self, m: dict, payload, envelope) -> None:
        self.rounds.on_sync(m["target"], m["recoverable"], m.get("epoch", 0), m.get("flush", False),
                            m.get("finished", False), m.get("lost", []))
        self._alive()

    def _on_protect(self, m: dict, payload, envelope) -> None:
        self.rounds.on_protect(m["round"], m["step"], m["sizes"])
        self._alive()

    def _alive(self) -> None:
        """The answer to every sync and protect: the coordinator's heartbeat of this node."""
        self.to_coordinator("alive", latest=self.latest_step, finished=self.catalog.run_finished())

    def _on_lost(self, src: int, error: str) -> None:
        self.lost_error = error
        if self.coordinator and not self.coordinator.gathering:  # (else its report says so)
            self.coordinator.on_lost(src)
        self.disk.offer_disk(need=True)

    # ---- answers to a rebuilding peer's queries -------------------------------------------------
    def _answer_state(self, msg: dict, payload, envelope) -> None:
        self.links.reply(envelope, msg["src"], "state", qid=msg["qid"], recoverable=self.catalog.recoverable,
                         data=[s for s in self.catalog.held_steps() if s in self.store.parity],
                         parity=sorted(self.store.parity), rebuilding=self.recovery.rebuilding is not None)

    def _answer_meta(self, msg: dict, payload, envelope) -> None:
        self.links.reply(envelope, msg["src"], "meta", qid=msg["qid"], step=msg["step"], node=msg["node"],
                         meta=self.store.meta_for(msg["step"], msg["node"]))

    def _answer_fetch(self, msg: dict, payload, envelope) -> None:
        data, error, corrupt = self.store.fetch(msg["step"], msg["stripe"], msg["number"], msg["frame"])
        if corrupt:
            self.recovery.schedule_repair(f"{corrupt} of step {msg['step']} fails its checksums")
        self.links.reply(envelope, msg["src"], "block", data, qid=msg["qid"], length=len(data),
                         hash=chunk_checksum(data) if not error else 0, error=error[:200])

    # ---- loop turn ----------------------------------------------------------------------------------
    def tick(self) -> None:
        self.members.tick()
        if not self.started:
            if not self.members.settled:
                self.links.pump()
                return
            self._start_cluster()
        if self.new_run_wait and time.monotonic() - self._new_run_asked > NEW_RUN_ASK_AGAIN:
            self._ask_new_run()  # the coordinator may have restarted or missed it
        self.recovery.tick()
        self.decodes.tick()
        self.moves.tick()
        self.rounds.pump()
        self.links.pump()
        self.disk.tick()
        self.leadership.tick()
        self.flush_coordinator()

    # ---- timelines: a restore from disk, or a new run ------------------------------------------------
    def new_timeline(self, epoch: int, recoverable: int) -> bool:
        """The coordinator's sync of a newer ``epoch``: a new run (``recoverable`` -1: drop everything)
        or a restore from disk (``disk.reset_to_disk``). False: ignore this sync."""
        if recoverable >= 0:
            return self.disk.reset_to_disk(epoch, recoverable)
        newest = self.catalog.newest_step()
        self.rounds.drop_round(keep_parity=False)
        self.rounds.done_unsynced = None
        self.rounds.group_protected = set()
        self.store.drop_steps(keep=lambda s: False)
        self.store.prune_mappings()
        self.catalog.reset_to(-1)
        self.epoch, self.fresh_epoch = epoch, epoch
        self.latest_step, self.lost_error, self.cluster_finished, self.new_run_wait = -1, None, False, None
        self.disk.new_run()
        log.warning("a new run of job %r starts (epoch %d): node %d dropped the previous run%s", self.config.job,
                    epoch, self.me, f" (its versions up to step {newest})" if newest >= 0 else "")
        return True

    def request_new_run(self, reason: str, always: bool = False) -> str | None:
        """This node's trainers start a new run: ask the coordinator to have every node drop the
        previous one. Returns why a restore must wait meanwhile, or None if there is nothing to drop
        (a timeline this node started afresh, holding nothing of a trainer that is gone)."""
        if self.new_run_wait:
            return self.restore_wait()
        cat = self.catalog
        if (not always and cat.recoverable < 0 and not self.cluster_finished and not cat.has_previous_run()
                and not self.disk.has_flushed() and not self.disk.disk_wait):
            return None
        self.new_run_wait = reason
        self._ask_new_run()
        return self.restore_wait()

    def _ask_new_run(self) -> None:
        self._new_run_asked = time.monotonic()
        self.to_coordinator("reset", epoch=self.epoch, reason=self.new_run_wait[:200])
        self.flush_coordinator()

    # ---- control-side hooks -----------------------------------------------------------------------
    @property
    def rebuilding(self) -> str | None:
        return self.recovery.rebuilding

    def maybe_candidate(self) -> None:
        self.rounds.maybe_candidate()

    def on_restored(self, rank: int, step: int) -> None:
        self.rounds.on_restored(rank, step)

    def on_corrupt(self) -> None:
        self.recovery.on_corrupt()

    def start_recover(self) -> bool:
        return self.recovery.start_recover()

    def restore_wait(self) -> str | None:
        """Why a restore must wait now, or None."""
        if not self.started:
            return f"node {self.me} waits to join the cluster: {self.members.waiting}"
        if self.new_run_wait:
            return (f"the cluster starts a new run ({self.new_run_wait}): waiting for every node to drop the "
                    f"previous one")
        if not self.ready or self.recovery.rebuilding:
            return f"node {self.me} is rebuilding from its peers ({self.recovery.rebuilding or 'start-up'})"
        if self.disk.disk_wait:
            return self.disk.disk_wait
        if self.rounds.done_unsynced is not None:
            return f"waiting for the coordinator to settle whether step {self.rounds.done_unsynced} is recoverable"
        return None

    def status(self) -> dict:
        return node_status(self)
