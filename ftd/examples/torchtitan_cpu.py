"""torchtitan's own ``torchtitan.train`` on a CPU-only machine (gloo), for trying a recipe without GPUs:

    torchrun --nproc-per-node 2 -m ftd.examples.torchtitan_cpu --module ftd.examples.torchtitan_configs \\
        --config llama3_tiny_ftd --dump_folder /tmp/titan

The Trainer, its model, FSDP2, optimizer, data loader and checkpoint slot run unchanged; torchtitan
0.3.0 (with torch 2.13) only assumes an accelerator in three places, which this bends before it
starts:

- the device: ``torchtitan.tools.utils`` takes ``_get_available_device_type() or "cuda"`` and calls
  ``set_device``, ``get_device_name``, ``memory_stats`` and the like on that device's module, so on
  a CPU it picks "cuda" and fails in ``Trainer.__init__``. Here it gets "cpu", and a stand-in device
  module whose memory statistics are empty.
- the gradient reduction: torchtitan sets FSDP2's gradient divide factor to 1.0, which FSDP2 sends
  as ``ReduceOp.PREMUL_SUM(1.0)``, and gloo has no PREMUL_SUM. Here FSDP2 reduces with a plain SUM
  (``set_force_sum_reduction_for_comms``): the same sum, as the factor is 1.
- ``torch.distributed.set_timeout``, which torchtitan calls after the first step, is not in torch
  2.13; here it is ``torch.distributed.distributed_c10d._set_pg_timeout``.

torchtitan also imports triton unconditionally (``minimal_async_ep``); the CPU build of torch does
not bring it, so ``pip install triton`` (the ``ftd[torchtitan]`` extra does).
"""
from __future__ import annotations

import types

import torch
import torch._utils


class _Properties:
    total_memory = 1 << 40  # shown as the "capacity" in the log; memory statistics are empty (-1)


def _cpu_device_module() -> types.SimpleNamespace:
    """What torchtitan calls on ``torch.cuda``, for the CPU."""
    nothing = lambda *args, **kwargs: None  # noqa: E731
    return types.SimpleNamespace(
        set_device=nothing, current_device=lambda: 0, device_count=lambda: 1, is_available=lambda: True,
        get_device_name=lambda *a: "cpu", get_device_properties=lambda *a: _Properties(),
        reset_peak_memory_stats=nothing, empty_cache=nothing, memory_stats=lambda *a: {}, synchronize=nothing,
        manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed)


def patch_for_cpu() -> None:
    """Apply the three changes of the module doc (before anything of torchtitan is imported)."""
    detect, module_of = torch._utils._get_available_device_type, torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda *a: _cpu_device_module()
    try:
        import torchtitan.tools.utils  # noqa: F401  (reads the device once, at import)
    finally:
        torch._utils._get_available_device_type, torch._utils._get_device_module = detect, module_of

    import torchtitan.distributed.fsdp as titan_fsdp
    from torch.distributed.fsdp import FSDPModule
    divide_by_one = titan_fsdp.disable_fsdp_gradient_division

    def sum_without_premul(model: torch.nn.Module) -> None:
        divide_by_one(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    titan_fsdp.disable_fsdp_gradient_division = sum_without_premul

    import torch.distributed as dist
    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout
        dist.set_timeout = _set_pg_timeout


def main() -> None:
    patch_for_cpu()
    from torchtitan.train import main as titan_main
    titan_main()


if __name__ == "__main__":
    main()
