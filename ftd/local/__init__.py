"""A whole cluster on one machine: ``ftd launch`` (node daemons), ``ftd kill-node`` (a node loss), and a
local job of ``ftd agent``s (what the demo, the chaos script and the tests run).

For trying ftd out and for fire drills; imports ``ftd.agent``, ``ftd.control`` and the shared basics.
"""
