"""Bit-exact gradient averaging for DDP across restarts: a comm hook that sums in rank order.

DDP's default allreduce sums each gradient element over the ranks in an order that depends on where
the element sits in its bucket (ring allreduce starts each chunk at a different rank), and DDP lays
its buckets out again after the first iteration of every process. A process restarted from a
snapshot therefore averages its first step in another order than the uninterrupted run did, and the
result differs in the last bits (with 2 ranks a + b == b + a, so only 3 or more ranks show it).
This hook all-gathers the bucket and adds the ranks' gradients in rank order, so every element's
sum is ((g0 + g1) + g2) + ... whatever the bucket layout: a resumed run stays bit-exact with an
uninterrupted one. It moves world_size times the bytes of an allreduce, so use it where exactness
matters more than gradient bandwidth (tests, small models, audits of a restore):

    ddp_model.register_comm_hook(None, ftd.ddp.ordered_allreduce_hook)
"""
import torch
import torch.distributed as dist


def ordered_allreduce_hook(process_group, bucket) -> torch.futures.Future[torch.Tensor]:
    # (a real annotation, not a string: DDP checks it)
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    grads = bucket.buffer()
    gathered = [torch.empty_like(grads) for _ in range(world)]
    work = dist.all_gather(gathered, grads, group=group, async_op=True)

    def mean_in_rank_order(fut) -> torch.Tensor:
        fut.value()  # raises if the gather failed (a peer died): never average a partial gather
        total = gathered[0]
        for other in gathered[1:]:
            total.add_(other)
        return total.div_(world)

    return work.get_future().then(mean_in_rank_order)
