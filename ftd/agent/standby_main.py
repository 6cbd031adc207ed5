"""The warm standby worker process: ``python -m ftd.agent.standby_main --fd N --module M|--path P -- ARGS``.

A fresh interpreter (never forked from a process that runs threads) that imports torch and the
trainer's own top-level imports, then blocks on pipe ``N`` from its agent. It holds no rank: it has
no RANK, MASTER_PORT or daemon endpoint until its generation starts and it connects to nothing.
  * End of file without a message (the generation never came: the agent stopped it or died): exit 0.
  * One JSON message ``{"env": {...}}``: become the worker: that environment, ``sys.argv`` and
    ``sys.path[0]`` as ``python -m M ARGS`` / ``python P ARGS`` would have them, then run the trainer
    as ``__main__`` (runpy); its exit status is the process's, as with a plain start. An uncaught
    exception skips the interpreter's teardown (``fail_fast``): the job restarts seconds sooner.
The message is JSON, never pickle. Importing the trainer's imports early is the one difference from a
plain start: a module that reads the environment at import sees the agent's, not the worker's.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import runpy
import sys

from ftd.util.timeline import mark

MAX_MESSAGE = 16 * 2**20  # bytes: an environment is a few KiB


def top_level_imports(source: str) -> list[str]:
    """Absolute modules a trainer imports at its top level (not in functions: those may be optional)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            names.append(node.module)
    return list(dict.fromkeys(names))


def _trainer_source(module: str | None, path: str | None) -> str:
    try:
        if path is not None:
            with open(path, encoding="utf-8") as f:
                return f.read()
        spec = importlib.util.find_spec(module)  # imports the parent packages, as the run would
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return ""
        with open(spec.origin, encoding="utf-8") as f:
            return f.read()
    except (OSError, ImportError, ValueError, UnicodeDecodeError):
        return ""  # the run itself reports it, at its start, as a plain start would


# torch and what a trainer imports on its way to the first step: torch.optim's Optimizer.__init__
# imports torch._dynamo (1.5-3 s here, more than torch itself), ftd.Client its modules
WARM_IMPORTS = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "ftd.trainer.client")


def preimport(module: str | None, path: str | None) -> list[str]:
    """Import torch and the trainer's top-level imports; returns what failed (the run will raise it)."""
    failed = []
    for name in [*WARM_IMPORTS, *top_level_imports(_trainer_source(module, path))]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001: any import error is the run's to report, in its own order
            failed.append(name)
    return failed


def read_message(fd: int) -> dict | None:
    """Block until the agent writes the generation's message and closes; None at end of file alone."""
    chunks, size = [], 0
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise SystemExit(f"ftd standby: a start message over {MAX_MESSAGE} bytes; not starting")
    os.close(fd)
    if not chunks:
        return None
    message = json.loads(b"".join(chunks))
    env = message.get("env") if isinstance(message, dict) else None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SystemExit("ftd standby: the start message has no environment of strings; not starting")
    return message


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ftd.agent.standby_main")
    p.add_argument("--fd", type=int, required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--module")
    target.add_argument("--path")
    p.add_argument("args", nargs=argparse.REMAINDER)
    opts = p.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    preimport(opts.module, opts.path)
    mark("standby_ready")
    message = read_message(opts.fd)
    if message is None:
        return  # the generation never came
    os.environ.clear()
    os.environ.update(message["env"])
    mark("activated")
    try:
        if opts.path is not None:
            sys.argv = [opts.path, *args]
            sys.path[0] = os.path.dirname(os.path.realpath(opts.path))
            runpy.run_path(opts.path, run_name="__main__")
        else:
            sys.argv = [opts.module, *args]  # runpy puts the module's file in argv[0], as python -m does
            runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    except (SystemExit, KeyboardInterrupt):
        raise  # the trainer's own exit status, and Python's usual death by SIGINT
    except BaseException:  # noqa: BLE001: the trainer failed (e.g. a peer is gone): report it, exit 1 now
        fail_fast()


def fail_fast() -> None:
    """What Python does for an uncaught exception (traceback, atexit handlers, exit status 1), minus
    the interpreter's teardown, which after a lost peer takes torch 1-10 s here (gloo and its store
    shut down), and which the whole job waits for: the agents restart every node only once a worker
    of theirs exited. The ``finally`` blocks and ``with`` exits of the trainer have run by now."""
    import atexit
    import traceback
    traceback.print_exc()
    atexit._run_exitfuncs()  # ftd's client finishes its snapshot in flight there
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
