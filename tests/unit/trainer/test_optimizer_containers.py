"""A container of optimizers (torchtitan's ``OptimizersContainer``: an Optimizer whose ``step()`` steps the
optimizers in its ``optimizers`` list, with no state or learning rate of its own) handed to ftd as one
optimizer: its moments are copied live like a plain optimizer's, and creating its state before a
restore moves no parameter."""
from __future__ import annotations

import torch
from torch import nn

from ftd.trainer.capture import identity, inner_optimizers, optimizer_tensors
from ftd.trainer.restore import _init_optimizer_state


class Container(torch.optim.Optimizer):
    """The shape of torchtitan's OptimizersContainer (ftd's tests do not import torchtitan)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        torch.optim.Optimizer.__init__(self, params, {})  # as torchtitan does, for the step hooks

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()


def make() -> tuple[nn.Module, Container]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    inner = [torch.optim.AdamW(model[0].parameters(), lr=0.1, weight_decay=0.5),
             torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)]
    return model, Container(inner)


def test_the_moments_of_a_containers_optimizers_count_as_the_optimizers_own():
    model, container = make()
    assert inner_optimizers(container) == container.optimizers and inner_optimizers(container.optimizers[0]) == []
    model(torch.randn(3, 4)).sum().backward()
    container.step()
    moments = {identity(v) for o in container.optimizers for s in o.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0}
    assert moments and moments <= optimizer_tensors(container)  # copied live, not cloned every step


def test_creating_a_containers_state_before_a_restore_moves_no_parameter():
    model, container = make()
    before = [p.detach().clone() for p in model.parameters()]
    _init_optimizer_state(container)  # what a restore of DTensor moments does first
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(o.state for o in container.optimizers)
    assert [g["lr"] for o in container.optimizers for g in o.param_groups] == [0.1, 0.1]
