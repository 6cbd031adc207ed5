"""What ``ftd status`` shows of a node's cluster side: its versions, group, round, rebuilds, links."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode


def node_status(node: "ClusterNode") -> dict:
    cat, store = node.catalog, node.store
    versions = []
    steps = sorted(set(cat.held_steps()) | set(store.parity), reverse=True)
    for s in steps:
        held = cat.buffers_of(s)
        versions.append({"step": s, "local": bool(held),
                         "data_bytes": sum(b.manifest["nbytes"] for _, b in held),
                         "parity_bytes": store.segment_size(store.parity[s][0]) if s in store.parity else 0,
                         "protected": s in store.parity and (s in node.rounds.group_protected
                                                              or s <= cat.recoverable),
                         "recoverable": s == cat.recoverable})
    return {
        "node_rank": node.me, "nodes": node.config.nodes, "group": node.group.index,
        "group_nodes": list(node.group.nodes), "position": node.pos, "k": node.layout.k, "m": node.layout.m,
        "code": node.codec.kind, "peer_endpoint": node.config.peer_endpoint,
        "membership": node.members.status(),
        "secure": node.security.enabled, "ready": node.ready, "recoverable": cat.recoverable,
        "target": cat.target, "versions": versions, "parity_bytes": store.parity_bytes,
        "data_bytes": cat.used, "round": node.rounds.status(),
        "rebuilding": node.recovery.rebuilding, "last_rebuild": node.recovery.last_rebuild,
        "rebuilds": node.recovery.rebuilds, "lost_error": node.lost_error, "epoch": node.epoch,
        "run_finished": node.cluster_finished, "new_run_wait": node.new_run_wait,
        "disk_wait": node.disk.disk_wait,
        "security": node.security.mode,
        "stats": {**node.stats, "sends_dropped": node.links.dropped if node.links else 0,
                  "impostors_refused": node.links.impostors if node.links else 0,
                  "decodes_served": node.decodes.served},
        "traffic": node.traffic.status(),
        "bandwidth": node.links.budget.status() if node.links else None,
        "hosted_ranks": sorted(r.rank for r in cat.hosted()), "moves": node.moves.status(),
        "coordinator": node.coordinator.status() if node.coordinator else None,
        "coordination": node.leadership.status(),
    }
