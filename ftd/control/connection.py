"""A request/reply link to the node daemon over ZeroMQ, with timeouts and transparent reconnects.

REQ sockets wedge after a lost reply, so on any timeout the socket is thrown away and the next
call opens a fresh one (ZeroMQ's "lazy pirate" pattern): a restarted daemon is found again.
"""
from __future__ import annotations

import threading
from pathlib import Path

import zmq

from ftd.control import protocol
from ftd.errors import DaemonUnavailable, Refused

HOW_TO_START = ("start one on this node with `ftd daemon` (or `ftd daemon --config FILE`), "
                "or set FTD_ENDPOINT to the endpoint the daemon printed")


class Connection:
    def __init__(self, endpoint: str, timeout: float):
        self.endpoint = endpoint
        self.timeout_ms = int(timeout * 1000)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            if self.endpoint.startswith("ipc://") and not Path(self.endpoint[6:]).exists():
                raise DaemonUnavailable(f"no ftd daemon at {self.endpoint}: {HOW_TO_START}")
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def call(self, mtype: str, **fields) -> dict:
        """Send one request and return the reply's fields; Refused if the daemon said no."""
        payload = protocol.request(mtype, **fields)
        with self._lock:
            sock = self._socket()
            try:
                sock.send(payload)
                if not sock.poll(self.timeout_ms, zmq.POLLIN):
                    self._drop()
                    raise DaemonUnavailable(f"the ftd daemon at {self.endpoint} did not answer within "
                                            f"{self.timeout_ms / 1000:g} s; is it running? {HOW_TO_START}")
                reply = protocol.decode_reply(sock.recv())
            except zmq.ZMQError as e:
                self._drop()
                raise DaemonUnavailable(f"cannot talk to the ftd daemon at {self.endpoint} ({e}); {HOW_TO_START}")
        if not reply["ok"]:
            raise Refused(str(reply.get("error", "refused")))
        return {k: v for k, v in reply.items() if k not in ("v", "ok")}

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._ctx.term()


def status_or_none(endpoint: str, timeout: float = 3.0) -> dict | None:
    """One `status` request to the daemon at ``endpoint``; None if none answers (or it refuses).
    For tools that poll several daemons and treat a silent one as down."""
    conn = Connection(endpoint, timeout)
    try:
        return conn.call("status")
    except (DaemonUnavailable, Refused):
        return None
    finally:
        conn.close()
