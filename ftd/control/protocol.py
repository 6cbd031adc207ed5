"""The control protocol between trainer clients and their node daemon: messages, no sockets.

One ZeroMQ frame per message, holding a JSON object ``{"v": 1, "type": ..., fields...}``.
JSON rather than pickle: bytes from another process are data, never code. Every request is
checked against a schema (field types and bounds) before the daemon acts on it; a reply is
``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": "..."}``.
"""
from __future__ import annotations

import json
from typing import Any

from ftd.errors import ProtocolError

VERSION = 1
MAX_MESSAGE_BYTES = 32 << 20
MAX_RANK = 1 << 20
MAX_STEP = 1 << 62
MAX_NBYTES = 1 << 44
MAX_STR = 256

_INT, _POS, _STR, _NUM, _DICT, _RANK = "int", "posint", "str", "number", "dict", "rank"
_OPT_STEP, _SIZE, _INTS, _BOOL, _ANY_DICT, _U64 = "optstep", "size", "ints", "bool", "optdict", "u64"
MAX_LIST = 1 << 16

# type -> {field: (kind, required)}
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    "ping": {},
    "status": {},
    "register": {"rank": (_RANK, True), "world": (_POS, True), "pid": (_INT, True), "local_world": (_POS, False)},
    "begin": {"session": (_STR, True), "step": (_INT, True), "nbytes": (_POS, True)},
    "prepare": {"session": (_STR, True), "nbytes": (_POS, True)},  # the buffers of the first snapshot, early
    "commit": {
        "session": (_STR, True), "buffer": (_STR, True), "step": (_INT, True), "manifest": (_DICT, True),
        "copy_seconds": (_NUM, False), "blocked_seconds": (_NUM, False),
    },
    "abort": {"session": (_STR, True), "buffer": (_STR, True), "reason": (_STR, False)},
    # resume: "auto" | "never" | "must" (the client's restore policy); pid: the restoring process
    "restore": {"rank": (_RANK, True), "local_world": (_POS, False), "pid": (_INT, False), "resume": (_STR, False),
                "world": (_POS, False)},
    "finish": {"session": (_STR, True)},            # this rank's run is over
    "detach": {"rank": (_RANK, True), "pid": (_INT, True)},  # the client closes: it holds the rank no more
    "clear": {"force": (_BOOL, False)},              # drop the job's versions (memory and flush_dir)
    "corrupt": {"rank": (_RANK, True), "buffer": (_STR, True), "step": (_INT, True)},
    "recover": {},
    "versions": {},   # read-only: every rank's complete versions (for `ftd export`)
    # another rank's version of a step, for a restore that puts replicated state together from its slices
    "replica_version": {"rank": (_RANK, True), "step": (_INT, True), "world": (_POS, False)},
    "replica_release": {"rank": (_RANK, True), "step": (_INT, True)},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_field(mtype: str, name: str, kind: str, value: Any) -> None:
    """Check one field against its kind; ProtocolError naming ``mtype.name`` if it does not fit."""
    where = f"{mtype}.{name}"
    if kind in (_INT, _POS, _RANK, _OPT_STEP, _SIZE, _U64):
        if not _is_int(value):
            raise ProtocolError(f"{where} must be an integer, got {type(value).__name__}")
        upper = {_INT: MAX_STEP, _POS: MAX_NBYTES, _RANK: MAX_RANK, _OPT_STEP: MAX_STEP, _SIZE: MAX_NBYTES,
                 _U64: (1 << 64) - 1}[kind]
        lower = {_POS: 1, _OPT_STEP: -1}.get(kind, 0)
        if not lower <= value <= upper:
            raise ProtocolError(f"{where}={value} is out of range [{lower}, {upper}]")
    elif kind == _INTS:
        if not isinstance(value, list) or len(value) > MAX_LIST or not all(
                _is_int(v) and -1 <= v <= MAX_NBYTES for v in value):
            raise ProtocolError(f"{where} must be a list of at most {MAX_LIST} integers in [-1, {MAX_NBYTES}]")
    elif kind == _BOOL:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false")
    elif kind == _ANY_DICT:
        if value is not None and not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object or null")
    elif kind == _STR:
        if not isinstance(value, str) or len(value) > MAX_STR:
            raise ProtocolError(f"{where} must be a string of at most {MAX_STR} characters")
    elif kind == _NUM:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 <= value < 1e9):
            raise ProtocolError(f"{where} must be a non-negative number")
    elif kind == _DICT:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object")
    else:  # pragma: no cover - schema typo
        raise AssertionError(kind)


def validate_message(msg: Any, schemas: dict[str, dict[str, tuple[str, bool]]], common: tuple[str, ...] = ("v", "type"),
                     what: str = "request") -> dict:
    """Check a decoded message against its type's schema; return it, or raise ProtocolError saying why."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a {what} must be a JSON object")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {brief(msg.get('v'))} is not supported (this daemon speaks "
                            f"{VERSION}); run the same ftd version everywhere")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in schemas:
        raise ProtocolError(f"unknown {what} type {brief(mtype)}; known: {sorted(schemas)}")
    schema = schemas[mtype]
    for name, (kind, required) in schema.items():
        if name in msg:
            check_field(mtype, name, kind, msg[name])
        elif required:
            raise ProtocolError(f"{mtype} {what} lacks field {name!r}")
    extra = set(msg) - set(schema) - set(common)
    if extra:
        raise ProtocolError(f"{mtype} {what} has unknown fields {brief(', '.join(sorted(extra)))}")
    return msg


def brief(value: Any) -> str:
    """A value from another process, short enough for an error message or a log line (its repr may
    be megabytes long, or nested too deep to print)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = "a huge integer" if isinstance(value, int) and abs(value) >= 1 << 64 else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_request(msg: Any) -> dict:
    """Check a decoded control request against its schema."""
    return validate_message(msg, SCHEMAS)


def decode(frame: bytes) -> Any:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(frame)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an integer of > 4300 digits, deep nesting
        raise ProtocolError(f"message is not valid JSON ({str(e)[:200]})") from None


def decode_request(frame: bytes) -> dict:
    return validate_request(decode(frame))


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def request(mtype: str, **fields: Any) -> bytes:
    msg = {"v": VERSION, "type": mtype, **fields}
    validate_request(msg)
    return encode(msg)


def ok(**fields: Any) -> bytes:
    return encode({"v": VERSION, "ok": True, **fields})


def error(message: str) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": message})


def decode_reply(frame: bytes) -> dict:
    msg = decode(frame)
    if not isinstance(msg, dict) or msg.get("v") != VERSION or not isinstance(msg.get("ok"), bool):
        raise ProtocolError("reply is not an ftd v1 reply; are client and daemon the same ftd version?")
    return msg
