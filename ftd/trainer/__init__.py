"""Runs inside the training process: the ``ftd.Client`` hook, the copy engine, the state encoding.

The only side of ftd that imports torch. May import ``ftd.control`` (to talk to the daemon),
``ftd.shm`` (to map and check buffers) and the shared basics (``errors``, ``config``, ``units``);
nothing of the daemon's own packages.
"""
