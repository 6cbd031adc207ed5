"""What ftd buys at 1,000-10,000 nodes: a failure and cost model, for planning (``scripts/scale_model.py``).

Pure arithmetic, no I/O and no processes: ``failures`` (rates and kinds of failures, from published
figures), ``survival`` (which losses ftd rebuilds from memory: the probability in closed form and by Monte
Carlo, on ftd's real groups), ``costs`` (memory, network, time to protection, steps lost and effective
training time of ftd, F-way replication and disk-only checkpoints). Imports only ``ftd.cluster.stripes``
(the groups ftd really forms) and ``ftd.errors``; numpy for the Monte Carlo.
"""
