"""Where the seconds of a restart go: the agents' and workers' timeline marks, relative to the failure.

Pure: takes the events of every node's ``timeline.jsonl`` (``ftd.util.timeline``). Each phase is the
moment the *last* participant reached it (a DDP job trains again only when every rank does), except
the first three, which one worker or agent does for everyone.
"""
from __future__ import annotations

# (event, who, label): "first" = the earliest agent, "agents"/"ranks" = the latest of them (of the
# generation that trains again), "any" = the latest of any generation
PHASES = (
    ("failed", "first", "a surviving worker saw the error (its peer is gone)"),
    ("failure_seen", "first", "failure seen by an agent"),
    ("generation_bumped", "first", "generation bumped in the job store"),
    ("workers_stopped", "agents", "every surviving node's workers stopped"),
    ("agent_started", "any", "the replacement node's agent started"),
    ("backoff_done", "agents", "backoff over"),
    ("daemon_ready", "agents", "every daemon ready (the replacement's rebuilt)"),
    ("joined", "agents", "every node joined the new generation"),
    ("spawned", "agents", "workers spawned / standbys activated"),
    ("imported", "ranks", "trainer's imports done (torch, ...)"),
    ("pg_joined", "ranks", "process group joined (gloo)"),
    ("restored", "ranks", "model and optimizer built, restore from the daemon done"),
    ("ddp_ready", "ranks", "DDP wrapped (parameters broadcast)"),
    ("first_step", "ranks", "first step after the failure done"),
)


def breakdown(events: list[dict], failed_at: float, failed_generation: int, generation: int) -> list[dict]:
    """Phases of the restart from ``failed_generation`` (failed at wall time ``failed_at``) into
    ``generation`` (the one that trained again): [{"event", "label", "seconds"}] in order, seconds after
    the failure (None where no one marked it)."""
    rows = []
    for event, who, label in PHASES:
        wanted = failed_generation if who == "first" or event == "workers_stopped" else generation
        times = [e["t"] for e in events if e["event"] == event and e["t"] >= failed_at
                 and (who == "any" or e.get("generation") == wanted)]
        at = (min(times) if who == "first" else max(times)) if times else None
        rows.append({"event": event, "label": label, "seconds": None if at is None else at - failed_at})
    return rows


def training_again(rows: list[dict]) -> float | None:
    """Seconds from the failure until every rank finished its first step after it."""
    return next((r["seconds"] for r in rows if r["event"] == "first_step"), None)


def lines(rows: list[dict], indent: str) -> list[str]:
    out, previous = [], 0.0
    for r in rows:
        if r["seconds"] is None:
            continue
        out.append(f"{indent}{r['seconds']:6.2f} s  (+{max(0.0, r['seconds'] - previous):5.2f})  {r['label']}")
        previous = max(previous, r["seconds"])
    return out
