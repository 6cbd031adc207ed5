"""Shared memory: segments in /dev/shm (mode 0600), the arena layout of a snapshot, chunk checksums.

Pure logic (``layout``) and file I/O (``segments``); no torch, no sockets. May import the shared
basics only; the trainer, the daemon, the cluster and the disk tier all build on it.
"""
