import json

import pytest

from ftd.control import protocol
from ftd.errors import ProtocolError


def req(**fields):
    return json.dumps({"v": 1, **fields}).encode()


def test_valid_requests_round_trip():
    frame = protocol.request("register", rank=3, world=8, pid=123)
    assert protocol.decode_request(frame) == {"v": 1, "type": "register", "rank": 3, "world": 8, "pid": 123}
    reply = protocol.decode_reply(protocol.ok(session="abc"))
    assert reply == {"v": 1, "ok": True, "session": "abc"}
    assert protocol.decode_reply(protocol.error("no"))["error"] == "no"


@pytest.mark.parametrize("frame,why", [
    (b"\xff\xfe garbage", "not valid JSON"),
    (b'{"v": 1, "type": "register", "rank": 1', "not valid JSON"),          # truncated
    (b"[1, 2, 3]", "JSON object"),
    (req(type="register", rank=1, world=2), "lacks field 'pid'"),
    (req(type="register", rank="1", world=2, pid=1), "must be an integer"),
    (req(type="register", rank=True, world=2, pid=1), "must be an integer"),
    (req(type="register", rank=-1, world=2, pid=1), "out of range"),
    (req(type="begin", session="s", step=1, nbytes=0), "out of range"),
    (req(type="begin", session="s" * 1000, step=1, nbytes=5), "string of at most"),
    (req(type="commit", session="s", buffer="b", step=1, manifest=[]), "must be an object"),
    (req(type="launch_missiles"), "unknown request type"),
    (req(type="ping", extra=1), "unknown fields"),
    (json.dumps({"v": 99, "type": "ping"}).encode(), "protocol version"),
])
def test_bad_requests_are_rejected_with_a_reason(frame, why):
    with pytest.raises(ProtocolError, match=why):
        protocol.decode_request(frame)


def test_oversized_message_rejected():
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(b" " * (protocol.MAX_MESSAGE_BYTES + 1))


def test_reply_from_something_else_rejected():
    with pytest.raises(ProtocolError):
        protocol.decode_reply(b'{"hello": "world"}')
