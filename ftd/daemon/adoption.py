"""What a daemon finds in shared memory when it starts: a killed predecessor's versions.

Every complete version (its sidecar names rank, step and manifest) whose chunks all pass their
checksums is handed to the catalog, in commit order; everything else of this daemon's prefix (torn
writes, sidecars without a segment) is removed. Parity segments are the cluster side's to adopt.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from ftd.config import Config
from ftd.daemon.catalog import Catalog
from ftd.daemon.shm_store import ShmStore
from ftd.errors import ProtocolError
from ftd.shm import segments
from ftd.shm.checksum import bad_chunks
from ftd.shm.layout import Manifest

log = logging.getLogger(__name__)


def segment_pattern(config: Config) -> re.Pattern:
    """Names of rank buffers: ``<prefix>r<rank>.<12 hex digits>``."""
    return re.compile(re.escape(config.shm_prefix) + r"r(\d+)\.([0-9a-f]{12})$")


def adopt_predecessor(config: Config, catalog: Catalog, store: ShmStore,
                      is_parity_file: Callable[[str], bool] = lambda name: False) -> tuple[int, int]:
    """Adopt verified complete versions left in shared memory; remove the rest. Returns (adopted, removed)."""
    pattern = segment_pattern(config)
    found = []
    removed = 0
    for path in segments.list_prefix(config.shm_dir, config.shm_prefix):
        if is_parity_file(path.name):
            continue  # parity: the cluster side adopts it
        if path.name.endswith((".meta", ".tmp")):
            if not (config.shm_dir / path.name.split(".meta")[0]).exists():
                segments.unlink(path)
            continue
        m = pattern.match(path.name)
        meta = segments.read_meta(path)
        version = verified(path, meta) if m and meta else None
        if version is None:
            store.release(path.name)
            removed += 1
            continue
        found.append((meta["seq"], int(m.group(1)), path, meta))
    for _, rank, path, meta in sorted(found, key=lambda f: f[0]):
        pid = meta.get("pid")
        catalog.adopt(rank, meta["world"], path.name, path.stat().st_size, meta["step"],
                      meta["manifest"], meta.get("committed_at"),
                      trainer_pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
                      foreign=meta.get("foreign") is True,
                      origin=meta["origin"] if isinstance(meta.get("origin"), str) else "memory")
        log.info("adopted rank %d step %d from %s", rank, meta["step"], path.name)
    return len(found), removed


def verified(path: Path, meta: dict) -> Manifest | None:
    """The manifest of a complete version whose every chunk passes its checksum, else None (logged)."""
    try:
        if not all(isinstance(meta.get(k), int) for k in ("rank", "world", "step", "seq")):
            return None
        manifest = Manifest.from_json(meta.get("manifest"), max_nbytes=path.stat().st_size)
        mapping = segments.Mapping(path, populate=False, writable=False)
        try:
            bad = bad_chunks(mapping.view(), manifest.layout.nbytes, manifest.chunk_size, manifest.checksums)
        finally:
            mapping.close()
    except (OSError, ProtocolError, ValueError) as e:
        log.warning("discarding %s: %s", path.name, e)
        return None
    if bad:
        log.warning("discarding %s (step %s): %d chunk(s) fail their checksums", path.name, meta["step"], len(bad))
        return None
    return manifest
