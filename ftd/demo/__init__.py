"""``ftd demo``: a 4-node job on this machine loses a worker and a node and trains on bit-exact.

Built on ``ftd.local`` (the agents' job) and ``ftd.examples.gpt_trainer`` (the trainer it runs).
"""
