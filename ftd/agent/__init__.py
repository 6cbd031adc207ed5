"""``ftd agent``: the per-node supervisor of the node's daemon and its training workers, and the job store
the agents of one job share.

Starts processes; imports ``ftd.control`` (to ask the daemon whether it is ready) and the shared
basics, and torch only for its TCPStore, lazily. ``standby_main`` is the one module that runs in a
worker process (a warm standby): it imports torch and the trainer's modules there, never in the agent.
"""
