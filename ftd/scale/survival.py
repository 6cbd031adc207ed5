"""Which losses ftd rebuilds from memory: on ftd's real groups, in closed form and by Monte Carlo. Pure.

A failure takes a set of nodes with it (``failures``: none for ``process``, one for ``host``, a whole
rack for ``rack``). Until the lost nodes' snapshots are rebuilt and protected again (the *window*), any
further host lost in a group the failure touched adds to that group's losses; each other host is lost
in the window with probability q, on its own. The failure is recoverable from memory when every group
it touched lost at most m nodes in all (groups it did not touch are whole, or a failure of their own).

Racks hold ``rack_nodes`` consecutive node ranks (rank r in rack r // R). Groups are ftd's own
``stripes.Grouping``: consecutive ranks, or strided by R, the rack size, so that a group has one node
per rack. F-way replication is the same arithmetic with k = 1, m = F - 1: NVIDIA's resiliency extension
forms its replica cliques n, n + J, ..., n + (F-1)J exactly as ftd strides its groups.

``closed_form`` sums the exact binomial tails over every node and rack; ``monte_carlo`` draws failures and
window losses; ``loss_recoverable`` asks ftd's own recovery planner (``Group.plan_recovery``) about one
set of lost nodes, the decision a rebuild makes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from typing import Iterable

import numpy as np

from ftd.cluster.stripes import Grouping
from ftd.errors import UnrecoverableLoss
from ftd.scale.failures import HOST, PROCESS, RACK, FailureMix


@dataclasses.dataclass(frozen=True)
class Placement:
    """N nodes in racks of ``rack_nodes``, in ftd groups of k + m, consecutive or one node per rack."""
    nodes: int
    k: int
    m: int
    rack_nodes: int = 1
    strided: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rack_nodes, int) or self.rack_nodes < 1:
            raise ValueError(f"racks need at least one node, got rack_nodes={self.rack_nodes!r}")
        self.grouping  # ftd's own check: ValueError when N does not split into such groups

    @functools.cached_property
    def grouping(self) -> Grouping:
        return Grouping(self.nodes, self.k, self.m, self.rack_nodes if self.strided else 1)

    @property
    def g(self) -> int:
        return self.k + self.m

    @functools.cached_property
    def group_of(self) -> np.ndarray:
        """Group index of every node rank, from ``Grouping.group_of``."""
        return np.array([self.grouping.group_of(r) for r in range(self.nodes)], dtype=np.int64)

    @property
    def racks(self) -> int:
        return -(-self.nodes // self.rack_nodes)

    def rack(self, index: int) -> range:
        return range(index * self.rack_nodes, min((index + 1) * self.rack_nodes, self.nodes))


def binomial_at_most(n: int, q: float, j: int) -> float:
    """P(X <= j) for X ~ Binomial(n, q); 0 for j < 0."""
    if j < 0:
        return 0.0
    return sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(min(j, n) + 1))


def group_survives(g: int, m: int, hits: int, q: float) -> float:
    """A group of g that lost ``hits`` nodes at once keeps at most m lost through the window."""
    return binomial_at_most(g - hits, q, m - hits) if hits <= m else 0.0


def _touched(placement: Placement, lost: Iterable[int]) -> Counter:
    return Counter(int(placement.group_of[n]) for n in lost)


def closed_form(placement: Placement, mix: FailureMix, q: float) -> dict[str, float]:
    """Probability that a failure of each kind, and one of the mix (``any``), is recoverable from memory."""
    if not 0 <= q <= 1:
        raise ValueError(f"q is a probability, got {q}")
    g, m = placement.g, placement.m
    host = group_survives(g, m, 1, q)  # every node sits in a group of g
    per_rack = []
    for r in range(placement.racks):
        p = 1.0
        for hits in _touched(placement, placement.rack(r)).values():
            p *= group_survives(g, m, hits, q)
        per_rack.append(p)
    out = {PROCESS: 1.0, HOST: host, RACK: sum(per_rack) / len(per_rack)}
    out["any"] = sum(mix.shares[kind] * out[kind] for kind in (PROCESS, HOST, RACK))
    return out


def monte_carlo(placement: Placement, mix: FailureMix, q: float, samples: int, seed: int = 0,
                chunk: int = 20000) -> dict[str, tuple[float, float, int]]:
    """(estimate, standard error, samples) of the same probabilities, from ``samples`` drawn failures."""
    rng = np.random.default_rng(seed)
    kinds = (PROCESS, HOST, RACK)
    n, groups, g = placement.nodes, placement.grouping.count, placement.g
    order = np.argsort(placement.group_of, kind="stable")  # the nodes group by group, g each
    rack_of = np.arange(n) // placement.rack_nodes
    ok_by_kind = {kind: [] for kind in kinds}
    left = samples
    while left > 0:
        size = min(chunk, left)
        left -= size
        kind = rng.choice(3, size=size, p=[mix.shares[k] for k in kinds])
        primary = np.zeros((size, n), dtype=bool)
        hosts = np.flatnonzero(kind == 1)
        primary[hosts, rng.integers(0, n, hosts.size)] = True
        racks = np.flatnonzero(kind == 2)
        chosen = rng.integers(0, placement.racks, racks.size)
        primary[racks] = rack_of[None, :] == chosen[:, None]
        lost = primary | (rng.random((size, n)) < q)
        hits = primary[:, order].reshape(size, groups, g).sum(axis=2)
        counts = lost[:, order].reshape(size, groups, g).sum(axis=2)
        ok = ~np.any((hits > 0) & (counts > placement.m), axis=1)
        for i, name in enumerate(kinds):
            ok_by_kind[name].append(ok[kind == i])
    out = {}
    for name in (*kinds, "any"):
        v = np.concatenate([x for k in kinds for x in ok_by_kind[k]] if name == "any" else ok_by_kind[name])
        p = float(v.mean()) if v.size else float("nan")
        out[name] = (p, math.sqrt(max(p * (1 - p), 1e-12) / max(v.size, 1)), int(v.size))
    return out


def loss_recoverable(placement: Placement, lost: Iterable[int]) -> bool:
    """Whether ftd rebuilds every one of the ``lost`` nodes from its peers: each touched group's recovery
    plan (``Group.plan_recovery``, what a rebuild follows) exists."""
    lost = sorted(set(lost))
    by_group: dict[int, list[int]] = {}
    for node in lost:
        by_group.setdefault(placement.grouping.group_of(node), []).append(node)
    try:
        for index, nodes in by_group.items():
            placement.grouping.group(index).plan_recovery(nodes)
    except UnrecoverableLoss:
        return False
    return True
