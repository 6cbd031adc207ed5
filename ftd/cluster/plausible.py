"""Announcements no honest node makes: steps, epochs and terms far beyond anything known. Pure.

An authenticated node can still lie about itself (``auth``). The lies that would do harm without
bound are numbers from the future: a ``latest`` or ``step`` far ahead makes the coordinator target
a step no trainer reaches (protection stops), a ``recoverable`` or ``epoch`` far ahead in a report
would become the cluster's timeline, a term far ahead moves every node to a coordinator of the
sender's choosing for good (terms only go up). The receiver refuses such a message (counted,
logged, never acted on), judging it against what it knows from *other* nodes, so a sender cannot
raise its own bar:

* a step (``step``, ``latest``, ``recoverable``, ``done``, a disk offer's ``steps``) more than
  ``STEP_AHEAD`` steps beyond the coordinator's recoverable step and the newest step any other node
  reported. Trainers of one job move together (their collectives make them), so an honest node is
  at most a few snapshots ahead of the others; 2^20 steps is a margin no job comes near. While
  nothing is known yet (no recoverable step, no other node heard) there is nothing to judge by and
  the step is taken; the coordinator's own node usually reports first, in-process.
* an epoch (restores from disk and new runs, one at a time) more than ``EPOCH_AHEAD`` beyond the
  coordinator's and the other nodes' reported ones;
* a term more than ``term_ahead(N)`` beyond the receiver's: a takeover raises the term by at most N,
  so that is over a thousand takeovers of which the receiver heard none.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftd.cluster.coordinator import Coordinator

STEP_AHEAD = 1 << 20
EPOCH_AHEAD = 1 << 16
TAKEOVERS_AHEAD = 1024

#: message type -> its step fields (``steps``: a list), for the messages the coordinator acts on
STEP_FIELDS = {
    "candidate": ("step", "latest", "recoverable"), "done": ("step", "latest"), "alive": ("latest",),
    "hello": ("recoverable",), "restored": ("step",), "report": ("recoverable", "done", "latest"),
    "disk_offer": ("recoverable", "steps"), "disk_loaded": ("step",),
}
EPOCH_TYPES = frozenset({"candidate", "hello", "report", "disk_offer", "disk_loaded"})


def term_ahead(nodes: int) -> int:
    """How far above the receiver's term a plausible term may be."""
    return max(1 << 20, TAKEOVERS_AHEAD * nodes)


def implausible_term(term: int, current: int, nodes: int) -> str | None:
    """Why ``term`` is not believable to a node in term ``current``, or None."""
    if term > current + term_ahead(nodes):
        return (f"term {term} is more than {term_ahead(nodes)} terms beyond this node's ({current}): "
                f"no cluster takes over that often unseen")
    return None


def _known(c: "Coordinator", src: int) -> tuple[list[int], list[int]]:
    """(steps, epochs) the coordinator knows from other nodes than ``src`` and from itself."""
    steps = [s for n, s in c.latest.items() if n != src and s >= 0]
    if c.recoverable >= 0:
        steps.append(c.recoverable)
    epochs = [c.epoch]
    if c.takeover is not None:
        for n, r in c.takeover.gather.reports.items():
            if n != src:
                steps += [s for s in (r.latest, r.recoverable) if s >= 0]
                epochs.append(r.epoch)
    return steps, epochs


def implausible_claim(msg: dict, c: "Coordinator") -> str | None:
    """Why a node's message to coordinator ``c`` claims what no honest node does, or None."""
    mtype, src = msg["type"], msg["src"]
    steps, epochs = _known(c, src)
    if mtype in EPOCH_TYPES and "epoch" in msg:
        bound = max(epochs) + EPOCH_AHEAD
        if msg["epoch"] > bound:
            return f"{mtype}.epoch={msg['epoch']} is more than {EPOCH_AHEAD} epochs beyond the newest known ({max(epochs)})"
    if not steps:
        return None  # nothing known yet to judge by
    bound = max(steps) + STEP_AHEAD
    for field in STEP_FIELDS.get(mtype, ()):
        values = msg.get(field, -1)
        top = max(values, default=-1) if isinstance(values, list) else values
        if top > bound:
            return (f"{mtype}.{field}={top} is more than {STEP_AHEAD} steps beyond any step the coordinator "
                    f"knows (recoverable or another node's, up to {max(steps)})")
    return None
