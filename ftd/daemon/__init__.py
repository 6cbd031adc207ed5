"""The node daemon (snapshot management process): its loop, its catalog of versions, adoption after a crash.

Never imports torch (its memory and start-up stay small) and nothing of ``ftd.trainer``. May import
``ftd.control``, ``ftd.shm``, ``ftd.cluster`` (its peer side), ``ftd.durable`` (its disk tier; the
torch-side writer there runs in a process of its own) and the shared basics.
"""
