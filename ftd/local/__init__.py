"""A whole cluster on one machine: ``ftd launch`` (node daemons), ``ftd kill-node`` (a node loss), a
local job of ``ftd agent``s (what the demo, the chaos script and the tests run), and one of torchrun's
own c10d agents on simulated nodes (``torchrun_job``).

For trying ftd out and for fire drills; imports ``ftd.agent``, ``ftd.control`` and the shared basics.
"""
