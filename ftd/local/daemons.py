"""Finding a local cluster's daemons by their command line, including those a user restarted by hand."""
from __future__ import annotations

import os
from pathlib import Path

import psutil

from ftd.util.procs import own_process, process_alive


def config_arg(cmdline: list[str]) -> str | None:
    """The value of --config in an `ftd daemon` command line, else None."""
    if "daemon" not in cmdline:
        return None
    for i, arg in enumerate(cmdline):
        if arg == "--config" and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def find_daemons(configs: list[Path]) -> dict[int, Path]:
    """pid -> config of every live `ftd daemon --config X` of this user, for X in ``configs``.

    This finds daemons that a user restarted by hand, which the launcher did not start itself.
    """
    wanted = {Path(c).resolve() for c in configs}
    found: dict[int, Path] = {}
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.pid == os.getpid() or not proc.info["uids"] or proc.info["uids"].real != os.getuid():
                continue
            arg = config_arg(proc.info["cmdline"] or [])
            if arg is None:
                continue
            path = Path(arg) if os.path.isabs(arg) else Path(proc.cwd()) / arg
            if path.resolve() in wanted and process_alive(proc.pid):
                found[proc.pid] = path.resolve()
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return found


def is_daemon_of(pid, config: Path) -> bool:
    """True if ``pid`` is still the `ftd daemon --config <config>` (and not a recycled pid)."""
    proc = own_process(pid)
    if proc is None:
        return False
    try:
        arg = config_arg(proc.cmdline())
        if arg is None:
            return False
        path = Path(arg) if os.path.isabs(arg) else Path(proc.cwd()) / arg
        return path.resolve() == Path(config).resolve()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False
