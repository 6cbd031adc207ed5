"""Authenticate and encrypt the daemon-to-daemon ZeroMQ links with CURVE.

The scheme
----------
Every daemon binds one ROUTER socket (the server side of its peer links) and connects one
DEALER socket to each peer's ROUTER (the client side). Those links leave the host, so they are
authenticated and encrypted with ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 key exchange,
per-connection session keys with forward secrecy, every message encrypted and authenticated).

All nodes of one job share a single *cluster key file* (``ftd keygen --out FILE``): a CURVE
keypair in Z85 text, in a small JSON file of mode 0600. It plays the role of a job secret, like
a shared token that a scheduler hands to every node of the job:

* every ROUTER is a CURVE server with the cluster keypair;
* every DEALER is a CURVE client that uses the same keypair as its own and expects the server's
  public key to be the cluster public key;
* a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``) on the server's context admits only
  clients whose public key is the cluster public key. CURVE proves that a client holds the
  secret key matching the public key it presents, so only holders of the key file get in.

Why one shared key rather than one keypair per node: all nodes of a job are trusted equally
(any of them may hold any other's snapshot), so per-node identities would add key distribution
and rotation without adding any protection; the job secret is what separates "this job" from
"everybody else".

Threat model: other users and other hosts on the network -- anyone who cannot read the key
file -- can neither connect to a daemon, nor inject messages into a link, nor read or tamper
with the traffic. Nothing protects the job against itself: a node of the job (or anyone who
can read the key file, e.g. root or the same Unix user) is fully trusted. Hence the strict
checks in :func:`load_key_file`: owned by this user, not readable by group or others.

Without a key (``PeerSecurity(None)``) every method is a no-op and the links are plain TCP:
meant for a single machine and for tests only.

Note: the ZAP handler belongs to a ``zmq.Context`` (it binds ``inproc://zeromq.zap.01``), so
:meth:`PeerSecurity.start` must be called on the context that owns the ROUTER, before it binds,
and only one authenticator can run per context. The server socket is also set to *enforce* ZAP
where libzmq allows it, so a CURVE handshake fails closed if no ZAP handler is running.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

from ftd.errors import FtdError, KeyFileError
from ftd.util.files import write_all

log = logging.getLogger(__name__)

ZAP_DOMAIN = "ftd-peer"
"""ZAP domain of the peer ROUTER sockets; the authenticator only admits the cluster key in it."""

_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text




@dataclass(frozen=True)
class ClusterKey:
    """The job's CURVE keypair, each key as 40 bytes of Z85 text."""

    public: bytes
    secret: bytes = field(repr=False)


def generate_key_file(path: Path) -> None:
    """Write a fresh cluster keypair to ``path`` (mode 0600); never overwrite an existing file."""
    _require_curve()
    path = Path(path)
    public, secret = zmq.curve_keypair()
    data = (json.dumps({"public": public.decode("ascii"), "secret": secret.decode("ascii")}, indent=2)
            + "\n").encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a cluster key file "
                           f"(delete it first, or choose another path)") from None
    except FileNotFoundError:
        raise KeyFileError(f"cannot create {path}: directory {path.parent} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"cannot create {path}: permission denied") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def load_key_file(path: Path) -> ClusterKey:
    """Read and check a cluster key file written by :func:`generate_key_file`.

    Refuses a file that is not a regular file owned by this user with no group/other
    permissions, or whose keys are not a valid, matching CURVE keypair in Z85.
    """
    _require_curve()
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"cluster key file {path} does not exist; create one with "
                           f"`ftd keygen --out {path}` and copy it to every node of the job") from None
    except PermissionError:
        raise KeyFileError(f"cannot read cluster key file {path}: permission denied") from None
    try:
        st = os.fstat(fd)  # of the file actually opened, not of whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"cluster key file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise KeyFileError(f"cluster key file {path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {os.getuid()}); copy it and `chmod 600` the copy, or `chown` it")
        if st.st_mode & 0o077:
            raise KeyFileError(f"cluster key file {path} is accessible by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); it is a secret: run `chmod 600 {path}`")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(64 * 1024)
    finally:
        os.close(fd)

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyFileError(f"cluster key file {path} is not valid JSON ({e}); "
                           f"regenerate it with `ftd keygen --out FILE`") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"cluster key file {path} must hold a JSON object with 'public' and 'secret'")
    keys = {}
    for name in ("public", "secret"):
        value = doc.get(name)
        if not isinstance(value, str) or not _valid_z85_key(value):
            raise KeyFileError(f"cluster key file {path}: {name!r} must be a {_KEY_LEN}-character Z85 "
                               f"CURVE key; regenerate the file with `ftd keygen --out FILE`")
        keys[name] = value.encode("ascii")
    if not hmac.compare_digest(zmq.curve_public(keys["secret"]), keys["public"]):
        raise KeyFileError(f"cluster key file {path}: the public key does not belong to the secret key; "
                           f"regenerate the file with `ftd keygen --out FILE`")
    return ClusterKey(public=keys["public"], secret=keys["secret"])


def _valid_z85_key(text: str) -> bool:
    if len(text) != _KEY_LEN or not text.isascii():
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise FtdError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE support; "
                       f"install a pyzmq wheel with bundled libzmq")


class _ClusterKeyOnly:
    """ZAP credentials provider: admit a CURVE client only if its public key is the cluster's."""

    def __init__(self, public: bytes):
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self._public)
        if not ok:
            log.warning("refused a peer connection: its CURVE key is not this job's cluster key")
        return ok


class PeerSecurity:
    """CURVE settings for the peer sockets, plus the ZAP handler that admits only the cluster key.

    ``PeerSecurity(None)`` disables security: every method is a no-op (single machine, tests).
    Usage on a daemon: ``sec.start(ctx)`` once, ``sec.server(router)`` before ``router.bind``,
    ``sec.client(dealer)`` before each ``dealer.connect``, ``sec.stop()`` before ``ctx.term()``.
    """

    def __init__(self, key: ClusterKey | None):
        if key is not None:
            _require_curve()
        self.key = key
        self._auth = None
        self._ctx: zmq.Context | None = None

    @classmethod
    def from_key_file(cls, path: Path | str | None) -> "PeerSecurity":
        """Security from a key file, or none when ``path`` is None or empty."""
        return cls(load_key_file(Path(path)) if path else None)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler on ``ctx`` (the context of the ROUTER), admitting only the cluster key."""
        if self.key is None:
            return
        if self._auth is not None:
            raise RuntimeError("PeerSecurity.start called twice")
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        # configured before the thread starts, so the handler never sees a half-set state
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_ClusterKeyOnly(self.key.public))
        auth.start()
        self._auth, self._ctx = auth, ctx

    def stop(self) -> None:
        """Stop the ZAP handler (idempotent). Call before terminating the context."""
        auth, self._auth, self._ctx = self._auth, None, None
        if auth is not None:
            auth.stop()

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (a ROUTER, before bind) a CURVE server with the cluster keypair."""
        if self.key is None:
            return
        if self._auth is None or sock.context is not self._ctx:
            raise RuntimeError("PeerSecurity.start(ctx) must run on the socket's context before server()")
        sock.zap_domain = ZAP_DOMAIN.encode("ascii")
        try:  # fail closed: refuse handshakes if the ZAP handler is gone
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (AttributeError, zmq.ZMQError):
            pass
        sock.curve_secretkey = self.key.secret
        sock.curve_publickey = self.key.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (a DEALER, before connect) a CURVE client of a cluster-key server."""
        if self.key is None:
            return
        sock.curve_secretkey = self.key.secret
        sock.curve_publickey = self.key.public
        sock.curve_serverkey = self.key.public
