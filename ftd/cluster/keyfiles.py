"""CURVE key files and the job's roster of public keys: writing them, and reading them strictly.

Two kinds of key file, both a small JSON object of mode 0600 with a CURVE keypair in Z85 text:

* a *node key file* (``ftd keygen --dir DIR --nodes N``: ``DIR/node-0.key`` ..., ``DIR/spare-0.key``
  ...) also names its ``identity``. Its public half is listed in the job's *roster*
  (``DIR/roster.json``: identity -> public key; public, but it decides who may connect, so it must not
  be writable by others). Recommended: a node can then speak only for itself (``auth``).
* a *cluster key file* (``ftd keygen --out FILE``, no identity): one keypair that every node of the
  job shares, the original scheme, kept working. Any holder can speak as any node.

Every check happens on the file actually opened (``fstat`` of the descriptor), so a path that
changes meanwhile cannot slip an unchecked file in. Nothing here talks to the network.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

from ftd.errors import FtdError, KeyFileError
from ftd.util.files import write_all

_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text
_IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHARED_IDENTITY = "cluster"
"""The identity of every holder of a shared cluster key (never a name in a roster)."""
ROSTER_NAME = "roster.json"
MAX_ROSTER = 1 << 16  # identities in a roster
_MAX_FILE = 16 << 20


def node_identity(node_rank: int) -> str:
    """The identity whose key file ``ftd keygen --nodes`` writes for node rank ``node_rank``."""
    return f"node-{node_rank}"


def spare_identity(index: int) -> str:
    return f"spare-{index}"


@dataclass(frozen=True)
class ClusterKey:
    """A CURVE keypair, each key as 40 bytes of Z85 text; ``identity`` None: the shared cluster key."""

    public: bytes
    secret: bytes = field(repr=False)
    identity: str | None = None


@dataclass(frozen=True)
class Roster:
    """Identity -> public key (Z85 bytes) of everyone who may connect to the job's daemons."""

    keys: dict[str, bytes]

    def public_of(self, identity: str) -> bytes | None:
        return self.keys.get(identity)

    def identity_of(self, public: bytes) -> str | None:
        for name, key in self.keys.items():
            if hmac.compare_digest(key, public):
                return name
        return None


# ---- writing ----------------------------------------------------------------------------------
def generate_key_file(path: Path, identity: str | None = None) -> ClusterKey:
    """Write a fresh keypair to ``path`` (mode 0600); never overwrite an existing file."""
    require_curve()
    public, secret = zmq.curve_keypair()
    doc = {"public": public.decode("ascii"), "secret": secret.decode("ascii")}
    if identity is not None:
        doc = {"identity": _checked_identity(identity, str(path)), **doc}
    _create(Path(path), (json.dumps(doc, indent=2) + "\n").encode("ascii"), 0o600, "key file")
    return ClusterKey(public, secret, identity)


def generate_node_keys(directory: Path, nodes: int, spares: int = 0) -> list[Path]:
    """One node key file per identity (``node-0.key`` ..., ``spare-0.key`` ...) and ``roster.json`` in
    ``directory`` (created 0700). Refuses before writing anything if any of those files exists."""
    require_curve()
    if not 1 <= nodes <= MAX_ROSTER or not 0 <= spares <= MAX_ROSTER - nodes:
        raise KeyFileError(f"--nodes must be 1..{MAX_ROSTER} and --spares 0.. (got {nodes} nodes, {spares} spares)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = [node_identity(n) for n in range(nodes)] + [spare_identity(s) for s in range(spares)]
    paths = [directory / f"{name}.key" for name in names]
    roster_path = directory / ROSTER_NAME
    existing = [p for p in (*paths, roster_path) if p.exists()]
    if existing:
        raise KeyFileError(f"{existing[0]} already exists; refusing to overwrite the keys in {directory} "
                           f"(choose an empty directory, or delete the old keys first)")
    keys = {name: generate_key_file(p, name).public.decode("ascii") for name, p in zip(names, paths)}
    doc = {"ftd_roster": 1, "identities": keys}
    _create(roster_path, (json.dumps(doc, indent=2) + "\n").encode("ascii"), 0o644, "roster")
    return [*paths, roster_path]


def _create(path: Path, data: bytes, mode: int, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a {what} "
                           f"(delete it first, or choose another path)") from None
    except FileNotFoundError:
        raise KeyFileError(f"cannot create {path}: directory {path.parent} does not exist") from None
    except PermissionError:
        raise KeyFileError(f"cannot create {path}: permission denied") from None
    try:
        os.fchmod(fd, mode)  # whatever the umask
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


# ---- reading ----------------------------------------------------------------------------------
def load_key_file(path: Path) -> ClusterKey:
    """Read and check a key file written by :func:`generate_key_file` (a node's or the cluster's).

    Refuses a file that is not a regular file owned by this user with no group/other
    permissions, or whose keys are not a valid, matching CURVE keypair in Z85.
    """
    require_curve()
    path = Path(path)
    doc = _read_json(path, "key file", secret=True)
    if not isinstance(doc, dict):
        raise KeyFileError(f"key file {path} must hold a JSON object with 'public' and 'secret'")
    keys = {}
    for name in ("public", "secret"):
        value = doc.get(name)
        if not isinstance(value, str) or not _valid_z85_key(value):
            raise KeyFileError(f"key file {path}: {name!r} must be a {_KEY_LEN}-character Z85 "
                               f"CURVE key; regenerate the file with `ftd keygen`")
        keys[name] = value.encode("ascii")
    if not hmac.compare_digest(zmq.curve_public(keys["secret"]), keys["public"]):
        raise KeyFileError(f"key file {path}: the public key does not belong to the secret key; "
                           f"regenerate the file with `ftd keygen`")
    identity = doc.get("identity")
    if identity is not None:
        identity = _checked_identity(identity, f"key file {path}")
    return ClusterKey(public=keys["public"], secret=keys["secret"], identity=identity)


def load_roster(path: Path) -> Roster:
    """Read and check a roster written by :func:`generate_node_keys`: a regular file not writable by
    group or others (it decides who may connect), identities and distinct valid Z85 public keys."""
    path = Path(path)
    doc = _read_json(path, "roster", secret=False)
    ids = doc.get("identities") if isinstance(doc, dict) and doc.get("ftd_roster") == 1 else None
    if not isinstance(ids, dict) or not 1 <= len(ids) <= MAX_ROSTER:
        raise KeyFileError(f"roster {path} must be a JSON object {{\"ftd_roster\": 1, \"identities\": "
                           f"{{name: public key}}}} with 1..{MAX_ROSTER} identities, as `ftd keygen --dir` writes")
    keys: dict[str, bytes] = {}
    for name, public in ids.items():
        _checked_identity(name, f"roster {path}")
        if not isinstance(public, str) or not _valid_z85_key(public):
            raise KeyFileError(f"roster {path}: the key of {name!r} must be a {_KEY_LEN}-character Z85 CURVE key")
        keys[name] = public.encode("ascii")
    if len(set(keys.values())) != len(keys):
        raise KeyFileError(f"roster {path} lists one public key under two identities: each identity needs a key of its own")
    return Roster(keys)


def _read_json(path: Path, what: str, secret: bool):
    hint = "`ftd keygen --dir DIR --nodes N`" if not secret else "`ftd keygen`"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist; create one with {hint} and copy it to the node") from None
    except PermissionError:
        raise KeyFileError(f"cannot read {what} {path}: permission denied") from None
    try:
        st = os.fstat(fd)  # of the file actually opened, not of whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        if st.st_uid != os.getuid() and (secret or st.st_uid != 0):
            raise KeyFileError(f"{what} {path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {os.getuid()}); copy it and `chmod {'600' if secret else '644'}` the copy, or `chown` it")
        if secret and st.st_mode & 0o077:
            raise KeyFileError(f"{what} {path} is accessible by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); it is a secret: run `chmod 600 {path}`")
        if not secret and st.st_mode & 0o022:
            raise KeyFileError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                               f"whoever can write it decides who may connect; run `chmod 644 {path}`")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(_MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_FILE:
        raise KeyFileError(f"{what} {path} is larger than {_MAX_FILE} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KeyFileError(f"{what} {path} is not valid JSON ({str(e)[:200]}); regenerate it with {hint}") from None


def _checked_identity(name, where: str) -> str:
    if not isinstance(name, str) or not _IDENTITY.match(name) or name == SHARED_IDENTITY:
        raise KeyFileError(f"{where}: identity {str(name)[:80]!r} must be 1-64 letters, digits, '_', '.' or '-' "
                           f"(and not {SHARED_IDENTITY!r}, the name of a shared key's holders)")
    return name


def _valid_z85_key(text: str) -> bool:
    if len(text) != _KEY_LEN or not text.isascii():
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, KeyError, TypeError):
        return False


def require_curve() -> None:
    if not zmq.has("curve"):
        raise FtdError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE support; "
                       f"install a pyzmq wheel with bundled libzmq")
