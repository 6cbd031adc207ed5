"""ftd: in-memory fault tolerance for PyTorch training.

    client = ftd.Client()
    start = client.restore(state)
    ... client.snapshot(step, state) after every optimizer.step() ...
"""
from .client import Client
from .errors import CorruptSnapshot, DaemonUnavailable, FtdError, ProtocolError, Refused, SerializationError

__version__ = "0.1.0"
__all__ = ["Client", "FtdError", "DaemonUnavailable", "Refused", "ProtocolError", "SerializationError",
           "CorruptSnapshot", "__version__"]
