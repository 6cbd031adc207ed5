"""Every error ftd raises to a user, under one root: ``except ftd.FtdError`` catches them all.

Each message says what went wrong and what to do. The kinds:

  FtdError
  ├── DaemonUnavailable   no daemon answered where the client looked
  ├── Refused             the daemon understood a request and said no (budget, rank, session ...)
  ├── ProtocolError       a message that does not follow the ftd protocol (from a client or a peer)
  ├── SerializationError  a value in the training state that ftd cannot store safely
  ├── ConfigError         a config file or value that is wrong (also a ValueError)
  ├── KeyFileError        a cluster key file that is missing, unsafe or malformed (also a ValueError)
  ├── UsageError          bad command-line input
  ├── UnrecoverableLoss   more nodes of a group lost than its parity rebuilds
  ├── InvalidBlocks       blocks the erasure code refuses to touch (also a ValueError)
  ├── TornVersion         a version changed while it was read out of shared memory
  ├── CorruptVersion      a version on disk that is incomplete or fails its checksums
  ├── JobStoreLost        the agents' job store is unreachable
  ├── AgentFailed         the node agent cannot go on
  └── DemoError           something kept the demo from running
"""
from __future__ import annotations

from typing import Sequence


class FtdError(Exception):
    """Base class of every ftd error."""


class DaemonUnavailable(FtdError):
    """No daemon answered at the endpoint."""


class ProtocolError(FtdError):
    """A message that does not follow the ftd protocol."""


class Refused(FtdError):
    """The daemon understood a request and said no (budget full, unknown rank, stale session...)."""


class SerializationError(FtdError):
    """A value in the training state that ftd cannot store safely."""


class ConfigError(FtdError, ValueError):
    """A config file, or a value in one, that is wrong; the message names the key."""


class KeyFileError(FtdError, ValueError):
    """A cluster key file that is missing, unsafe or malformed (the message says what to do)."""


class UsageError(FtdError):
    """Bad input on the command line: printed as one line, exit status 2."""


class UnrecoverableLoss(FtdError):
    """More nodes of one group are lost than its parity can rebuild."""

    def __init__(self, lost_nodes: Sequence[int], m: int, group: int | None = None):
        self.lost_nodes = tuple(lost_nodes)
        self.m = m
        self.group = group
        where = "a group" if group is None else f"group {group}"
        super().__init__(
            f"{where} lost {len(self.lost_nodes)} nodes {list(self.lost_nodes)}, but its parity "
            f"(m={m}) rebuilds at most {m}; these nodes' snapshots cannot be rebuilt from peer memory: "
            f"restore from the durable tier (disk), or use more parity (a larger m) next time")


class InvalidBlocks(FtdError, ValueError):
    """A block list that the codec refuses to touch (wrong count, numbers, lengths or buffers)."""


class TornVersion(FtdError):
    """The version changed while it was being read (the trainer reused its buffer): read another."""


class CorruptVersion(FtdError):
    """A version on disk is incomplete, or fails its checksums."""


class JobStoreLost(FtdError):
    """The store is unreachable (node 0's agent is gone): the job cannot coordinate restarts."""


class AgentFailed(FtdError):
    """The job cannot go on from this node; the message says why and what to do."""


class DemoError(FtdError):
    """Something kept the demo from running; the message says what."""
