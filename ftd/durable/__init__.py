"""The disk tier: background flush of recoverable versions to DCP directories, and restore from disk.

Its daemon side (``flusher``, ``policy``, ``ondisk``, ``disk_load``, ``cluster_restore``) never imports
torch; ``flush_worker`` and ``dcp_writer`` run in the flush worker process (or ``ftd export``) and do.
May import ``ftd.shm``, ``ftd.daemon.catalog``, ``ftd.trainer.statecodec`` (writer side only) and the
shared basics.
"""
