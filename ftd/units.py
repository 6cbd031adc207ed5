"""Byte sizes and rates as people write them ("4MiB", "50%", "200MB/s") and as people read them."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Parse "512MiB", "2GB", "1048576" or, when ``total`` is given, "40%" (of total)."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    s = str(text).strip()
    if s.endswith("%"):
        if total is None:
            raise ValueError(f"a percentage is not allowed here: {text!r}")
        pct = float(s[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100]: {text!r}")
        return int(total * pct / 100)
    m = _SIZE.match(s)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 512MiB, 2GB, 40%)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str | int) -> int:
    """Bytes per second from "200MB/s", "1.5GiB/s" or a plain size ("200MB", 1048576: per second)."""
    if isinstance(text, str) and text.strip().lower().endswith("/s"):
        text = text.strip()[:-2]
    if isinstance(text, float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"rate must not be negative: {text}")
        return int(text)
    return parse_size(text)


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
