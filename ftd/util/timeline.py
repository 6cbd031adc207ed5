"""Recovery timeline: when each step of a restart happened, for the breakdown the demo prints.

The agent sets ``FTD_TIMELINE`` to a JSON-lines file in its log directory and marks its own events
(failure seen, workers stopped, generation bumped, backoff over, workers spawned); a trainer that calls
``mark`` adds its own (imports done, process group joined, restore done, first step done). Every line
is ``{"t": wall-clock seconds, "event": ..., "pid": ..., ...}``, written with one ``O_APPEND`` write,
so several processes may share a file. Without ``FTD_TIMELINE`` ``mark`` does nothing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "FTD_TIMELINE"


def mark(event: str, path: str | os.PathLike | None = None, **fields) -> None:
    """Append one event to ``path`` (default ``$FTD_TIMELINE``); never raises: a timeline is a diagnostic."""
    target = path or os.environ.get(ENV)
    if not target:
        return
    record = {"t": time.time(), "event": event, "pid": os.getpid(), **fields}
    for name, key in (("rank", "RANK"), ("generation", "TORCHELASTIC_RESTART_COUNT")):
        if name not in record and os.environ.get(key, "").isdigit():
            record[name] = int(os.environ[key])
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read(path: str | os.PathLike) -> list[dict]:
    """Every well-formed event of a timeline file, in file order; [] if it does not exist."""
    events = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("t"), (int, float)) and isinstance(event.get("event"), str):
            events.append(event)
    return events
