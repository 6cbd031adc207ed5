"""Helpers every side of ftd shares: processes (ports, liveness, signals, waiting, log tails) and files
(atomic writes). No torch, no ftd state; imports nothing of ftd but ``errors``."""
