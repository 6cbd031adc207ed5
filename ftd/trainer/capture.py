"""What a snapshot takes from the state, at ``snapshot()`` time, on the trainer thread.

``state_dict()`` of every Stateful value (modules, optimizers, schedulers, anything following the
torch.distributed.checkpoint convention) plus the RNG states, encoded into a JSON skeleton and a flat
list of tensors (``statecodec``). Tensors an optimizer owns (parameters and their optimizer state)
only change inside ``optimizer.step()``, so they are copied live, in the background, until the
optimizer's pre-step hook (an optimizer in ``state``, or one a Stateful of ``state`` holds);
everything else may change in the next forward pass (BatchNorm statistics, loose tensors) and is
cloned now. A tensor caught changing in place outside the optimizer step is
cloned from then on (``learned_clone``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ftd.errors import SerializationError
from ftd.shm.layout import Layout, plan_layout
from ftd.trainer import dtensors, rng, statecodec
from ftd.trainer.copier import SnapshotJob


def is_stateful(x: Any) -> bool:
    return callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))


def identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes the arena holds: a DTensor's local shard, else the tensor itself."""
    return dtensors.local_shard(t) if dtensors.is_dtensor(t) else t


def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers a container of optimizers steps (torchtitan's ``OptimizersContainer``: an
    Optimizer whose ``step()`` steps those in its ``optimizers`` list, its own ``state`` empty); []
    for a plain optimizer."""
    inner = getattr(optimizer, "optimizers", None)
    if not isinstance(inner, (list, tuple)):
        return []
    return [o for o in inner if isinstance(o, torch.optim.Optimizer) and o is not optimizer]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> set[tuple]:
    """Identities of the tensors only optimizer.step() changes: its parameters and their state (for
    DTensors, FSDP2's and tensor parallel's, their local shards); a container's, those of the
    optimizers in it."""
    owned = set()
    for opt in [optimizer, *inner_optimizers(optimizer)]:
        for group in opt.param_groups:
            for p in group["params"]:
                owned.add(identity(_local(p)))
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        owned.add(identity(_local(v)))
    return owned


def optimizers_in(value: Any) -> list[torch.optim.Optimizer]:
    """The optimizers whose tensors ``value``'s state may hold live: ``value`` itself, or those a
    Stateful keeps as attributes (DCP's AppState: ``state_dict()`` returns ``get_state_dict(self.model,
    self.optimizer)``, whose values are the optimizer's own tensors). Without this such a state would be
    cloned whole at every snapshot(); a tensor that is not the optimizer's is still cloned (identities)."""
    if isinstance(value, torch.optim.Optimizer):
        real = _hookable(value)
        return [real] if real is not None else []
    if not is_stateful(value) or isinstance(value, torch.nn.Module) or not hasattr(value, "__dict__"):
        return []
    found = []
    for attr in vars(value).values():
        for item in attr if isinstance(attr, (list, tuple)) else (attr,):
            real = _hookable(item) if isinstance(item, torch.optim.Optimizer) else None
            if real is not None and all(real is not f for f in found):
                found.append(real)
    return found


def _hookable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The optimizer that steps: a wrapper that subclasses Optimizer without its set-up (accelerate's
    AcceleratedOptimizer, which an LR scheduler under the Hugging Face Trainer holds) takes no step
    hooks, the torch optimizer inside it (``.optimizer``) does; None if there is none."""
    for _ in range(4):
        if hasattr(optimizer, "_optimizer_step_pre_hooks"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return None
        optimizer = inner
    return None


class StateCapture:
    """``capture(step, state)`` -> a SnapshotJob; calls ``on_optimizer(opt)`` for every optimizer found
    in ``state`` (the client installs its pre-step hook there)."""

    def __init__(self, capture_rng: bool, on_optimizer: Callable[[torch.optim.Optimizer], None]):
        self.capture_rng = capture_rng
        self.on_optimizer = on_optimizer
        self.layout: Layout | None = None  # the last snapshot's arena layout, reused while shapes stay
        self.learned_clone: set[tuple] = set()   # live tensors caught being mutated outside optimizer.step()
        self.replicas = None  # a ``replicas.ReplicaPolicy``: snapshot only this rank's slice of replicated state

    def capture(self, step: int, state: dict) -> SnapshotJob:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise SerializationError("state must be a dict with string keys")
        owned: set[tuple] = set()
        optimizers: list[torch.optim.Optimizer] = []  # once each (a scheduler holds its optimizer too)
        captured: dict[str, Any] = {}
        for key, value in state.items():
            for optimizer in optimizers_in(value):
                if all(optimizer is not seen for seen in optimizers):
                    optimizers.append(optimizer)
                    self.on_optimizer(optimizer)
                    owned.update(optimizer_tensors(optimizer))
            captured[key] = value.state_dict() if is_stateful(value) else value
        enc = statecodec.Encoder()  # key paths in errors read as the user wrote them: state['meta']['loader']
        skeleton = {"state": {key: enc.encode(value, f"state[{key!r}]") for key, value in captured.items()},
                    "rng": enc.encode(rng.capture(), "the RNG states") if self.capture_rng else None}
        tensors = enc.tensors
        sources, versions = [], []
        for t in tensors:
            ident = identity(t)
            if ident in owned and ident not in self.learned_clone:
                sources.append(t)
                versions.append(t._version)
            else:
                sources.append(t.clone())  # may change before the next optimizer step: capture it now
                versions.append(None)
        sliced = (self.replicas.apply(state, optimizers, skeleton, tensors, sources, versions, enc.dtensors)
                  if self.replicas else None)
        origins = None
        if sliced is not None:  # replicated tensors: only this rank's slice of their bytes (``replicas``)
            sources, versions, origins = sliced.sources, sliced.versions, sliced.origins
            skeleton["replica"] = sliced.info
            signature = tuple(sliced.specs)
        else:
            signature = tuple((statecodec.dtype_name(t.dtype), tuple(t.shape)) for t in tensors)
        if self.layout is None or self.layout.signature != signature:
            self.layout = plan_layout(signature)
        job = SnapshotJob(step, skeleton, self.layout, sources, versions)
        job.origins = origins
        if any(t.is_cuda for t in sources):
            job.ready_event = torch.cuda.Event()
            job.ready_event.record()
        return job


# tensors an optimizer creates per parameter at its first step: (like the parameter, 0-d float32)
_FIRST_STEP_STATE = {
    "Adam": (2, 1), "AdamW": (2, 1), "RAdam": (2, 1), "NAdam": (2, 2), "Adamax": (2, 1), "Adadelta": (2, 1),
    "Rprop": (2, 1), "ASGD": (1, 3), "RMSprop": (1, 1), "SGD": (0, 0),
}


def _first_step_state(optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of what ``optimizer`` will hold once it stepped, for one that has not yet: per
    torch.optim class (amsgrad, momentum and centered included), two moments per parameter for others."""
    like, scalars = _FIRST_STEP_STATE.get(type(optimizer).__name__, (2, 1))
    specs = []
    for group in optimizer.param_groups:
        extra = int(bool(group.get("amsgrad"))) + int(bool(group.get("momentum"))) + int(bool(group.get("centered")))
        for p in group["params"]:
            local = _local(p)
            specs += [(statecodec.dtype_name(local.dtype), tuple(local.shape))] * (like + extra)
            specs += [("float32", ())] * scalars
    return specs


# Stateful values whose state_dict() is known to change nothing. Another Stateful's may (DCP's
# get_optimizer_state_dict initialises a fresh optimizer's state by stepping it with zero gradients,
# which changes the run), so it is called only where a snapshot calls it anyway.
_PURE_STATE_DICT = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


def expected_nbytes(state: dict, capture_rng: bool) -> int | None:
    """The arena size of the next snapshot of ``state``, known before it is taken (at ``restore``): its
    tensors now, plus what each optimizer that has not stepped yet will hold after its first step.
    None where a value's ``state_dict()`` might have side effects (a Stateful other than a module,
    a torch.optim optimizer or a scheduler): its first snapshot sets the buffers up instead."""
    specs = []
    for key, value in state.items():
        if is_stateful(value) and not isinstance(value, _PURE_STATE_DICT):
            return None
        _, tensors = statecodec.encode(value.state_dict() if is_stateful(value) else value, f"state[{key!r}]")
        specs += [(statecodec.dtype_name(_local(t).dtype), tuple(_local(t).shape)) for t in tensors]
        if isinstance(value, torch.optim.Optimizer) and not value.state:
            specs += _first_step_state(value)
    if capture_rng:
        specs += [(statecodec.dtype_name(t.dtype), tuple(t.shape)) for t in statecodec.encode(rng.capture())[1]]
    return plan_layout(specs).nbytes
