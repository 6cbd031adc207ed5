"""The ``ftd`` command: arguments in, library calls out. Each group of commands is a module with a
``COMMANDS`` list (``registry.Command``); this one builds the parser from them and runs the one asked for."""
from __future__ import annotations

import argparse
import logging
import sys

from ftd.cli import agent, demo, keys, local, node, status
from ftd.cli.registry import register
from ftd.errors import ConfigError, FtdError, UsageError

GROUPS = (node, status, local, keys, agent, demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftd", description="In-memory fault tolerance for PyTorch training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        register(sub, group.COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:  # what the user typed or configured: one line, status 2
        print(f"ftd {args.command}: {e}", file=sys.stderr)
        return 2
    except FtdError as e:
        print(f"ftd {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
