"""What the node agents of one job agree on: the current generation of workers, and who joined it.

A DDP job is all-or-nothing: when one worker dies, the others are stuck in a collective that can
never finish, so every node must stop its workers and start a new *generation* together (torchrun's
elastic agent does the same). The agents share a small key-value store, a torch ``TCPStore``
hosted by node 0's agent (the same kind of store torchrun's c10d rendezvous uses; it carries only
integers and short strings, never pickles). Keys:

  gen               the current generation (0 at the first start, +1 per failure anywhere)
  g<G>/joined       how many agents joined generation G (a barrier: workers start when all did)
  g<G>/port         MASTER_PORT of generation G's workers, chosen by node 0 (a fresh store per try)
  g<G>/why          the first failure that ended generation G, for the logs
  g<G>/finished     how many nodes' workers all exited 0 in generation G
  g<G>/left         how many agents saw the job finished (node 0 keeps the store up until all did)
  give_up           why the job stopped restarting (restarts exhausted)

An agent that joins a generation whose barrier is already complete is a newcomer (a replacement
node, or a restarted agent): it ends that generation, so everyone restarts together with it.
"""
from __future__ import annotations

import signal
import socket
import threading
import time
from datetime import timedelta

from ftd.errors import JobStoreLost


class MemoryKV:
    """The store's operations in memory: a single-node job needs nobody else (and tests use it)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add(self, key: str, amount: int) -> int:
        with self._lock:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            return value

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        with self._lock:
            if self._data.get(key, b"").decode() == expected:
                self._data[key] = desired.encode()
            return self._data.get(key, b"")

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        with self._lock:
            return all(k in self._data for k in keys)

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._data[key]


def tcp_kv(host: str, port: int, *, host_it: bool, timeout: float):
    """A torch TCPStore at host:port, served by this process if ``host_it`` (node 0's agent)."""
    from torch.distributed import TCPStore
    try:
        return TCPStore(host, port, world_size=None, is_master=host_it, timeout=timedelta(seconds=timeout),
                        wait_for_workers=False)
    except (RuntimeError, ValueError, TimeoutError) as e:
        role = "serve" if host_it else "reach"
        raise JobStoreLost(f"cannot {role} the job's agent store at {host}:{port} ({e}); "
                           + ("is the port free on this host?" if host_it else
                              "is node 0's agent running, and is --rdzv-endpoint its host and a free port?")) from None


class JobStore:
    """The generation protocol over a key-value store (MemoryKV or TCPStore)."""

    def __init__(self, kv, nnodes: int):
        self.kv = kv
        self.nnodes = nnodes

    def _do(self, op, *args):
        try:
            return op(*args)
        except (RuntimeError, ValueError, TimeoutError, OSError) as e:
            raise JobStoreLost(f"lost the job's agent store ({e}); node 0's agent may be gone") from None

    def _count(self, key: str, add: int = 0) -> int:
        return int(self._do(self.kv.add, key, add))

    def generation(self) -> int:
        return self._count("gen")

    def end_generation(self, generation: int, why: str) -> int:
        """Move the job past ``generation`` (once, whoever calls first); returns the new generation."""
        self.generation()  # creates the key if this is the job's first word
        new = int(self._do(self.kv.compare_set, "gen", str(generation), str(generation + 1)))
        if new == generation + 1:
            self._do(self.kv.compare_set, f"g{generation}/why", "", why)
        return new

    def why(self, generation: int) -> str:
        key = f"g{generation}/why"
        return self._do(self.kv.get, key).decode() if self._do(self.kv.check, [key]) else "unknown"

    def join(self, generation: int) -> bool:
        """Count this agent in; False if the generation's barrier was already complete (a newcomer)."""
        return self._count(f"g{generation}/joined", 1) <= self.nnodes

    def all_joined(self, generation: int) -> bool:
        return self._count(f"g{generation}/joined") >= self.nnodes

    def publish_port(self, generation: int, port: int) -> None:
        self._do(self.kv.set, f"g{generation}/port", str(port))

    def port(self, generation: int) -> int | None:
        key = f"g{generation}/port"
        return int(self._do(self.kv.get, key)) if self._do(self.kv.check, [key]) else None

    def finish(self, generation: int) -> None:
        self._count(f"g{generation}/finished", 1)

    def all_finished(self, generation: int) -> bool:
        return self._count(f"g{generation}/finished") >= self.nnodes

    def leave(self, generation: int) -> None:
        self._count(f"g{generation}/left", 1)

    def all_left(self, generation: int) -> bool:
        return self._count(f"g{generation}/left") >= self.nnodes

    def give_up(self, why: str) -> None:
        self._do(self.kv.compare_set, "give_up", "", why)

    def given_up(self) -> str | None:
        return self._do(self.kv.get, "give_up").decode() if self._do(self.kv.check, ["give_up"]) else None


def serve_job_store(port: int, host: str = "0.0.0.0") -> int:
    """``ftd job-store``: serve the agents' store until SIGINT/SIGTERM (run it where no node is lost,
    e.g. on the login or scheduler host, and give the agents --rdzv-external)."""
    kv = tcp_kv(host, port, host_it=True, timeout=60)
    print(f"ftd job-store: serving the agents' job store on {host}:{kv.port}; agents: --rdzv-endpoint "
          f"{socket.gethostname()}:{kv.port} --rdzv-external", flush=True)
    stop = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, _frame: stop.append(signum))
    while not stop:
        time.sleep(0.2)
    return 0
