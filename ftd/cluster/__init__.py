"""The daemon's peer side: protection rounds, stripes and the erasure code, links, parity held, rebuilds.

Pure logic (``stripes``, ``coordinator``, ``terms``, ``takeover``, ``protection``, ``messages``,
``bandwidth``, ``rebuild_plan``) apart from sockets (``links``) and shared memory (``parity_store``). Never
imports torch or ``ftd.trainer``. May import
``ftd.control`` (message validation), ``ftd.shm``, ``ftd.daemon.catalog`` and the shared basics.
"""
