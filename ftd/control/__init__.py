"""Trainer <-> daemon: the control messages (JSON, validated by schema) and the socket that carries them.

No torch, no shared memory. May import the shared basics only; both sides import it.
"""
