"""Close every live ``ftd.Client`` when the interpreter exits.

A trainer that exits without close() must still finish the snapshot in flight and stop the copier
thread before the interpreter tears down: a thread still inside torch then aborts the process with
"terminate called without an active exception", exit status 134, which launchers count as a failure.
"""
from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)

EXIT_TIMEOUT = 10.0  # at interpreter exit, longest wait for the snapshot in flight

_live: weakref.WeakSet[Any] = weakref.WeakSet()


def track(client: Any) -> None:
    _live.add(client)


def untrack(client: Any) -> None:
    _live.discard(client)


@atexit.register
def _close_at_exit() -> None:
    for client in list(_live):
        try:
            client.close(EXIT_TIMEOUT)
        except Exception as e:  # never turn a clean exit into a failing one
            log.warning("ftd: closing the client at exit failed: %s", e)
