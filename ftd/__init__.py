"""ftd: in-memory fault tolerance for PyTorch training.

    client = ftd.Client()
    start = client.restore(state)
    ... client.snapshot(step, state) after every optimizer.step() ...

``Client`` and ``ddp`` are imported lazily, so the daemon and the CLI start without importing torch.
"""
from ftd.errors import DaemonUnavailable, FtdError, ProtocolError, Refused, SerializationError

__version__ = "0.1.0"
__all__ = ["Client", "FtdError", "DaemonUnavailable", "Refused", "ProtocolError", "SerializationError",
           "__version__"]


def __getattr__(name: str):
    if name == "Client":
        from ftd.trainer.client import Client
        return Client
    if name == "ddp":  # ftd.ddp.ordered_allreduce_hook, imported only by those who use it (it needs torch)
        import importlib
        return importlib.import_module("ftd.ddp")
    raise AttributeError(f"module 'ftd' has no attribute {name!r}")
