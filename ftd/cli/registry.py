"""How a command joins the ``ftd`` command line: one ``Command`` each, listed in its module's ``COMMANDS``."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]   # adds the command's options to its parser
    run: Callable[[argparse.Namespace], int]               # parsed options in, exit status out
    description: str | None = None


def register(subparsers: argparse._SubParsersAction, commands: list[Command]) -> None:
    for c in commands:
        p = subparsers.add_parser(c.name, help=c.help, description=c.description)
        c.arguments(p)
        p.set_defaults(func=c.run)
