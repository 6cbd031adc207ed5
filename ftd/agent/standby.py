"""Warm standby workers: per local rank, a process that has imported torch before its generation starts.

A restart's seconds go mostly to new interpreters importing torch (about 2 s each here, more when
every rank of a node imports at once). The agent keeps one standby per local rank
(``standby_main``): a fresh interpreter, not a fork of a threaded one, that did those imports and
waits on a pipe. When a generation starts, the agent writes the rank's environment into the pipe
and the standby becomes the worker (same pid, own process group, log appended as a plain start's).
The next standbys start once the new generation trains (``refill``), so their imports do not compete
with the restart for the CPU.

Only ``python -m MODULE ...`` and ``python SCRIPT.py ...`` can be run so (``python_target``); any
other command, an interpreter option, ``--no-standby``, or a standby that died, is started as
before (``subprocess.Popen`` of the command). A standby whose generation never comes exits when its
pipe closes: the agent closes it when it stops, and the kernel does when the agent dies.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

from ftd.util.procs import stop_process_group

log = logging.getLogger(__name__)
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")
STANDBY_STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a standby that was not used


def python_target(command: list[str]) -> tuple[str, list[str]] | None:
    """(interpreter, standby arguments) when ``command`` is ``python -m M ...`` or ``python X.py ...``
    with no interpreter options; None for anything else (it is started as it is)."""
    if len(command) < 2 or not _PYTHON.match(os.path.basename(command[0])):
        return None
    if command[1] == "-m" and len(command) >= 3 and not command[2].startswith("-"):
        return command[0], ["--module", command[2], "--", *command[3:]]
    if command[1].endswith(".py") and not command[1].startswith("-"):
        return command[0], ["--path", command[1], "--", *command[2:]]
    return None


class Standby:
    """One waiting standby process; ``activate(env)`` makes it the worker, ``discard()`` ends it."""

    def __init__(self, interpreter: str, target: list[str], env: dict, log_path: Path):
        read_end, self._write_end = os.pipe()  # both non-inheritable: only this standby gets read_end
        try:
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen([interpreter, "-m", "ftd.agent.standby_main", "--fd", str(read_end),
                                              *target], env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, pass_fds=(read_end,), start_new_session=True)
        except OSError:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def activate(self, env: dict) -> subprocess.Popen | None:
        """Hand the standby its generation's environment; its Popen, or None if it is gone (start plainly)."""
        if self._write_end is None or self.proc.poll() is not None:
            self.discard()
            return None
        message = memoryview(json.dumps({"env": env}).encode())
        try:
            while message:
                message = message[os.write(self._write_end, message):]
        except OSError:  # it died meanwhile
            self.discard()
            return None
        self._close()
        return self.proc

    def _close(self) -> None:
        if self._write_end is not None:
            os.close(self._write_end)
            self._write_end = None

    def discard(self) -> None:
        """The generation never comes: close its pipe and stop it (it holds no rank and no memory)."""
        self._close()
        stop_process_group(self.proc, grace=STANDBY_STOP_GRACE)


class StandbyPool:
    """The node's standbys, one per local rank; empty (every start plain) for a command they cannot run."""

    def __init__(self, command: list[str], env: dict, log_paths: list[Path], enabled: bool = True):
        self.target = python_target(command) if enabled else None
        self.env, self.log_paths = env, log_paths
        self.slots: list[Standby | None] = [None] * len(log_paths)

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def needs_refill(self) -> bool:
        return self.enabled and any(s is None for s in self.slots)

    def refill(self) -> None:
        """Start a standby for every empty slot; if one cannot start (no such interpreter), say why
        and start every worker plainly from now on (where the same error then surfaces as today)."""
        for i, slot in enumerate(self.slots):
            if slot is None and self.target is not None:
                try:
                    self.slots[i] = Standby(self.target[0], self.target[1], self.env, self.log_paths[i])
                except OSError as e:
                    log.warning("cannot start a standby worker (%s); starting workers plainly", e)
                    self.target = None

    def take(self, local_rank: int) -> Standby | None:
        standby, self.slots[local_rank] = self.slots[local_rank], None
        return standby

    def close(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None:
                slot.discard()
                self.slots[i] = None
