"""Public alias: ``ftd.ddp.ordered_allreduce_hook`` lives in ``ftd.trainer.ddp``."""
from ftd.trainer.ddp import ordered_allreduce_hook

__all__ = ["ordered_allreduce_hook"]
