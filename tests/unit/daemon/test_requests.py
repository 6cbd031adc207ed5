"""The daemon's request table: refusals logged once with counts, not once per request."""
from __future__ import annotations

import logging

import pytest

from ftd.control import protocol
from ftd.daemon import requests

pytestmark = pytest.mark.timeout(10)


def test_refusals_of_one_kind_are_logged_once_then_counted(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(requests.time, "monotonic", lambda: now[0])
    handler = requests.RequestHandler(daemon=None)
    with caplog.at_level(logging.WARNING, "ftd.daemon.requests"):
        for i in range(100):  # a trainer refused at every step, with a step number that changes
            reply = protocol.decode_reply(handler.handle(b'{"v":1,"type":"restore","rank":%d}' % (10**8 + i)))
            assert not reply["ok"] and "out of range" in reply["error"]
        now[0] += requests.REFUSAL_LOG_EVERY
        handler.handle(b'{"v":1,"type":"restore","rank":123456789}')
        handler.handle(b"not json")                               # another kind: logged at once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "out of range" in lines[0] and "100 more time(s)" in lines[1] and "not valid JSON" in lines[2]
    assert handler.invalid_requests == 102
