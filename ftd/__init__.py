"""ftd: in-memory fault tolerance for PyTorch training.

    client = ftd.Client()
    start = client.restore(state)
    ... client.snapshot(step, state) after every optimizer.step() ...

    ftd.status()     # what the node daemon holds, as dataclasses (ftd.control.status); no torch

``Client`` and ``ddp`` are imported lazily, so the daemon and the CLI start without importing torch;
``ftd.integrations`` (Lightning, Hugging Face) only when a trainer imports it.
"""
from ftd.errors import DaemonUnavailable, FtdError, ProtocolError, Refused, SerializationError

__version__ = "0.1.0"
__all__ = ["Client", "status", "FtdError", "DaemonUnavailable", "Refused", "ProtocolError", "SerializationError",
           "__version__"]


def __getattr__(name: str):
    if name == "Client":
        from ftd.trainer.client import Client
        return Client
    if name == "status":  # no torch: scripts and notebooks that only watch a daemon stay light
        from ftd.control.status import status
        return status
    if name == "ddp":  # ftd.ddp.ordered_allreduce_hook, imported only by those who use it (it needs torch)
        import importlib
        return importlib.import_module("ftd.ddp")
    raise AttributeError(f"module 'ftd' has no attribute {name!r}")
