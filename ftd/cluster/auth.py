"""Authenticate and encrypt the daemon-to-daemon ZeroMQ links with CURVE, and tie a sender to its key.

The scheme
----------
Every daemon binds one ROUTER socket (the server side of its peer links) and connects one
DEALER socket to each peer's ROUTER (the client side). Those links leave the host, so they are
authenticated and encrypted with ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 key exchange,
per-connection session keys with forward secrecy, every message encrypted and authenticated).
CURVE proves that a peer holds the secret key of the public key it presents.

Per-node keys (recommended; ``ftd keygen --dir DIR --nodes N [--spares S]``, ``keyfiles``): every
identity (``node-0`` ..., ``spare-0`` ...) has a keypair of its own, and the job's *roster* lists their
public keys. Then

* a ROUTER is a CURVE server with its node's own keypair; its ZAP handler admits only public keys in
  the roster and sets each connection's ZMQ ``User-Id`` to the identity the key belongs to;
* the daemon acts on a message received on its ROUTER only if that identity may speak for the node
  rank the message names as ``src`` (:meth:`PeerSecurity.may_speak`, by default ``node-{src}``);
* a DEALER is a CURVE client with the node's own keypair that pins the server's public key to the
  roster's entry for the node rank it connects to, so an answer arriving on a DEALER (or on the
  ``PeerQueries`` sockets of a rebuild thread) comes from that node: the pinning authenticates it,
  and the receivers also require its ``src`` to be that node.

Which identity holds which node rank is one callable, ``identity_for(node_rank) -> str``
(:func:`may_speak_for`; default :func:`keyfiles.node_identity`): a membership record in which a
spare takes a lost node's rank plugs in there (``PeerSecurity.identity_for``).

A shared cluster key (``ftd keygen --out FILE``, the original scheme, still supported): every node
holds one keypair; the ZAP handler admits only it, and every sender's identity is ``"cluster"``, which
may speak for every node. It keeps everybody outside the job out, but any holder can claim to be
any node.

Threat model: other users and other hosts on the network -- anyone who holds no key of the roster
-- can neither connect to a daemon, nor inject messages into a link, nor read or tamper with the
traffic. With per-node keys a node (or whoever stole its key file) can speak only as itself: it
cannot forge another node's messages, though it can still lie about its own data and state (the
daemons refuse the implausible: ``plausible``). Hence the strict checks in ``keyfiles``: a key file
owned by this user, not readable by group or others; a roster not writable by others.

Without a key (``PeerSecurity(None)``) every method is a no-op and the links are plain TCP:
meant for a single machine and for tests only.

Note: the ZAP handler belongs to a ``zmq.Context`` (it binds ``inproc://zeromq.zap.01``), so
:meth:`PeerSecurity.start` must be called on the context that owns the ROUTER, before it binds,
and only one authenticator can run per context. The server socket is also set to *enforce* ZAP
where libzmq allows it, so a CURVE handshake fails closed if no ZAP handler is running.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils import z85

from ftd.cluster.keyfiles import (ROSTER_NAME, SHARED_IDENTITY, ClusterKey, Roster, generate_key_file,
                                  generate_node_keys, load_key_file, load_roster, node_identity, require_curve)
from ftd.errors import KeyFileError

__all__ = ["ClusterKey", "KeyFileError", "PeerSecurity", "Roster", "SHARED_IDENTITY", "generate_key_file",
           "generate_node_keys", "load_key_file", "load_roster", "may_speak_for", "node_identity"]

log = logging.getLogger(__name__)

ZAP_DOMAIN = "ftd-peer"
"""ZAP domain of the peer ROUTER sockets; the authenticator only admits the job's keys in it."""

IdentityFor = Callable[[int], "str | None"]


def may_speak_for(identity: str | None, src: int, identity_for: IdentityFor = node_identity) -> bool:
    """Whether a peer authenticated as ``identity`` may send messages naming node rank ``src``: the
    holder of a shared cluster key may speak for every node; anyone else only for the rank that
    ``identity_for`` gives it (by default ``node-{src}``; a membership record may hand a lost node's
    rank to a spare)."""
    if identity is None:
        return False
    return identity == SHARED_IDENTITY or identity_for(src) == identity


def _callable(identity_for: IdentityFor | Mapping[int, str] | None) -> IdentityFor:
    if identity_for is None:
        return node_identity
    if isinstance(identity_for, Mapping):
        return identity_for.get
    return identity_for


class _RosterKeysOnly:
    """ZAP credentials provider: admit a CURVE client only if its public key is one of the job's;
    logs each refused key once (a refused client reconnects every second)."""

    def __init__(self, key: ClusterKey, roster: Roster | None):
        self._key, self._roster = key, roster
        self._refused: set[bytes] = set()

    def identity(self, public_z85: bytes) -> str | None:
        if self._roster is None:
            return SHARED_IDENTITY if hmac.compare_digest(public_z85, self._key.public) else None
        return self._roster.identity_of(public_z85)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = self.identity(key) is not None
        if not ok and key not in self._refused and len(self._refused) < 1024:
            self._refused.add(key)
            log.warning("refused a peer connection: its CURVE key %s is not %s", key.decode("ascii", "replace"),
                        "this job's cluster key" if self._roster is None else "in this job's roster")
        return ok

    def user_id(self, raw_key: bytes) -> str:
        """The ZMQ User-Id of an admitted client (called by the authenticator with the raw key)."""
        return self.identity(z85.encode(raw_key)) or ""


class PeerSecurity:
    """CURVE settings for the peer sockets, the ZAP handler that admits only the job's keys, and the
    rule of who may speak for which node.

    ``PeerSecurity(None)`` disables security: every method is a no-op (single machine, tests).
    Usage on a daemon: ``sec.start(ctx)`` once, ``sec.server(router)`` before ``router.bind``,
    ``sec.client(dealer, node)`` before each ``dealer.connect`` to node rank ``node``, ``sec.stop()``
    before ``ctx.term()``; ``sec.may_speak(identity, src)`` for each message the ROUTER receives.
    ``identity_for`` (a callable or a mapping node rank -> identity) may be replaced at any time.
    """

    def __init__(self, key: ClusterKey | None, roster: Roster | None = None,
                 identity_for: IdentityFor | Mapping[int, str] | None = None):
        if key is not None:
            require_curve()
            if key.identity is not None and roster is None:
                raise KeyFileError(f"the key of {key.identity!r} is a node key: it needs the job's roster "
                                   f"(peer_roster, or {ROSTER_NAME} next to the key file)")
            if roster is not None and key.identity is None:
                raise KeyFileError("a roster goes with node keys (`ftd keygen --dir DIR --nodes N`), "
                                   "not with a shared cluster key")
            if roster is not None and not hmac.compare_digest(roster.public_of(key.identity) or b"", key.public):
                raise KeyFileError(f"the roster does not list this node's key as {key.identity!r}: the key file "
                                   f"and the roster come from different `ftd keygen` runs")
        self.key, self.roster = key, roster
        self.identity_for = _callable(identity_for)
        self._auth = None
        self._ctx: zmq.Context | None = None

    @classmethod
    def from_key_file(cls, path: Path | str | None, roster: Path | str | None = None) -> "PeerSecurity":
        """Security from a key file (a node key: with ``roster``, by default ``roster.json`` next to
        it), or none when ``path`` is None or empty."""
        if not path:
            return cls(None)
        key = load_key_file(Path(path))
        if key.identity is not None and not roster:
            roster = Path(path).parent / ROSTER_NAME
        return cls(key, load_roster(Path(roster)) if roster else None)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @property
    def per_node(self) -> bool:
        """Each node has a key of its own: a sender's identity is checked against its ``src``."""
        return self.roster is not None

    @property
    def mode(self) -> str:
        return "per-node keys" if self.per_node else "shared key" if self.enabled else "none"

    def set_identity_for(self, identity_for: IdentityFor | Mapping[int, str]) -> None:
        """Who holds which node rank from now on (a membership record's ``identity_for``)."""
        self.identity_for = _callable(identity_for)

    def check_nodes(self, nodes: int) -> None:
        """KeyFileError unless the roster has a key for every node rank below ``nodes``."""
        if not self.per_node:
            return
        missing = [r for r in range(nodes) if self.roster.public_of(self.identity_for(r) or "") is None]
        if missing:
            raise KeyFileError(f"the roster has no key for node rank(s) {missing[:8]} (identities "
                               f"{[self.identity_for(r) for r in missing[:8]]}): generate keys for all "
                               f"{nodes} nodes with `ftd keygen --dir DIR --nodes {nodes}`")

    def may_speak(self, identity: str | None, src: int) -> bool:
        """Whether a message from a peer authenticated as ``identity`` may name ``src`` as its sender."""
        return not self.enabled or may_speak_for(identity, src, self.identity_for)

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler on ``ctx`` (the context of the ROUTER), admitting only the job's keys."""
        if self.key is None:
            return
        if self._auth is not None:
            raise RuntimeError("PeerSecurity.start called twice")
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
        provider = _RosterKeysOnly(self.key, self.roster)
        # configured before the thread starts, so the handler never sees a half-set state
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=provider)
        auth.curve_user_id = provider.user_id  # the connection's User-Id: the identity its key belongs to
        auth.start()
        self._auth, self._ctx = auth, ctx

    def stop(self) -> None:
        """Stop the ZAP handler (idempotent). Call before terminating the context."""
        auth, self._auth, self._ctx = self._auth, None, None
        if auth is not None:
            auth.stop()

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (a ROUTER, before bind) a CURVE server with this node's keypair."""
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

    def server_key(self, node: int | None) -> bytes:
        """The public key the server of node rank ``node`` must present."""
        if not self.per_node:
            return self.key.public
        if node is None:
            raise ValueError("with per-node keys a client must say which node rank it connects to")
        public = self.roster.public_of(self.identity_for(node) or "")
        if public is None:
            raise KeyFileError(f"the roster has no key for node rank {node} ({self.identity_for(node)!r})")
        return public

    def client(self, sock: zmq.Socket, node: int | None = None) -> None:
        """Make ``sock`` (a DEALER, before connect) a CURVE client with this node's keypair, of the
        server of node rank ``node`` (its key pinned to the roster's; any key of the shared scheme)."""
        if self.key is None:
            return
        sock.curve_secretkey = self.key.secret
        sock.curve_publickey = self.key.public
        sock.curve_serverkey = self.server_key(node)
