"""Exceptions a user of ftd may catch. Each message says what went wrong and what to do."""


class FtdError(Exception):
    """Base class of every ftd error."""


class DaemonUnavailable(FtdError):
    """No daemon answered at the endpoint."""


class ProtocolError(FtdError):
    """A message that does not follow the ftd protocol."""


class Refused(FtdError):
    """The daemon understood a request and said no (budget full, unknown rank, stale session...)."""


class SerializationError(FtdError):
    """A value in the training state that ftd cannot store safely."""
