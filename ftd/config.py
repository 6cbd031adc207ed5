"""Daemon configuration: a TOML file, with defaults that make one machine work with no file at all.

`configs/local.toml` documents every key. Paths derived from the config (control socket,
shared-memory names) live here too, so the daemon and the client derive them the same way.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import psutil

from .units import parse_size

_JOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_runtime_dir() -> Path:
    return Path(f"/tmp/ftd-{os.getuid()}")


@dataclasses.dataclass(frozen=True)
class Config:
    job: str = "default"
    node_rank: int = 0
    runtime_dir: Path = dataclasses.field(default_factory=default_runtime_dir)
    shm_dir: Path = Path("/dev/shm")
    memory_budget: int = 0          # bytes of shared memory the daemon may hold; 0 means "half of RAM"
    memory_reserve: int = 1 << 30   # never allocate below this much memory available to the system
    chunk_size: int = 4 << 20       # checksum (and later transfer) unit
    request_timeout: float = 10.0   # seconds a client waits for a reply

    def __post_init__(self) -> None:
        if not _JOB_NAME.match(self.job):
            raise ValueError(f"job name {self.job!r} must be 1-64 letters, digits, '_' or '-'")
        if self.node_rank < 0:
            raise ValueError(f"node_rank must be >= 0, got {self.node_rank}")
        if not (4096 <= self.chunk_size <= 64 << 20) or self.chunk_size % 4096:
            raise ValueError(f"chunk_size must be a multiple of 4 KiB between 4 KiB and 64 MiB, got {self.chunk_size}")
        if self.memory_budget == 0:
            object.__setattr__(self, "memory_budget", psutil.virtual_memory().total // 2)

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / self.job / f"node{self.node_rank}.sock"

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def shm_prefix(self) -> str:
        """Every shared-memory file of this daemon starts with this; a restarted daemon adopts by it."""
        return f"ftd.{self.job}.n{self.node_rank}."


_KEYS = {f.name for f in dataclasses.fields(Config)}


def load_config(path: str | os.PathLike | None = None, *, node_rank: int | None = None) -> Config:
    """Read a TOML config; ``None`` gives the defaults (with $FTD_JOB / $FTD_NODE_RANK applied)."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"config file {path}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    else:
        if "FTD_JOB" in os.environ:
            raw["job"] = os.environ["FTD_JOB"]
        if "FTD_NODE_RANK" in os.environ:
            raw["node_rank"] = int(os.environ["FTD_NODE_RANK"])
    total = psutil.virtual_memory().total
    kwargs: dict = {}
    for key, value in raw.items():
        if key == "runtime_dir":
            kwargs[key] = Path(value).expanduser() if value else default_runtime_dir()
        elif key == "shm_dir":
            kwargs[key] = Path(value).expanduser() if value else Path("/dev/shm")
        elif key in ("memory_budget", "memory_reserve", "chunk_size"):
            kwargs[key] = parse_size(value, total=total)
        elif key == "request_timeout":
            kwargs[key] = float(value)
        elif key == "node_rank":
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    if node_rank is not None:
        kwargs["node_rank"] = node_rank
    return Config(**kwargs)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700; refuse one that others can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you; choose another runtime_dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
