"""The ``ftd`` command: arguments in, library calls out. One module per group of commands."""
from ftd.cli.main import main

__all__ = ["main"]
