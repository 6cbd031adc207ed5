"""What snapshot() copies live and what it clones, and the DTensor layouts it records."""
import pytest
import torch
from torch import nn

import ftd
from ftd.trainer import dtensors
from ftd.trainer.capture import StateCapture

pytestmark = pytest.mark.timeout(60)


class AppState:
    """DCP's AppState pattern: a Stateful over the model and optimizer (here plain state_dict()s; with
    FSDP2 it is get_state_dict, whose values are the same tensors)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.ema = torch.zeros(3)  # not the optimizer's: must be cloned

    def state_dict(self):
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "ema": self.ema}

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optim"])
        self.ema.copy_(sd["ema"])


def trained(width=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    return model, opt


def test_a_stateful_holding_the_optimizer_is_copied_live_not_cloned():
    model, opt = trained()
    hooked = []
    app = AppState(model, opt)
    job = StateCapture(False, hooked.append).capture(0, {"train": app})
    assert hooked == [opt]                              # the pre-step hook goes on the wrapped optimizer
    live = {s.data_ptr() for s, v in zip(job.sources, job.versions) if v is not None}
    owned = [p for p in model.parameters()] + [t for st in opt.state.values() for t in st.values()]
    assert {t.data_ptr() for t in owned} <= live        # parameters and moments: copied in the background
    ema = [s for s, v in zip(job.sources, job.versions) if v is None and s.shape == (3,)]
    assert len(ema) == 1 and ema[0].data_ptr() != app.ema.data_ptr()   # its own tensor: cloned at snapshot()


def test_a_module_or_plain_stateful_finds_no_optimizer():
    model, opt = trained()
    hooked = []
    job = StateCapture(False, hooked.append).capture(0, {"model": model})
    assert hooked == [] and all(v is None for v in job.versions)


def test_stateful_wrapper_snapshot_waits_in_the_pre_step_hook_and_restores_exactly(thread_daemon):
    d = thread_daemon(chunk_size=4096)
    model, opt = trained(width=512)
    state = {"train": AppState(model, opt)}
    with ftd.Client(d.endpoint) as client:
        client._chunk_delay = 0.005
        client.snapshot(0, state)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()                                       # must wait for the live copy
        assert client.stats["hook_wait_seconds"] > 0
        assert client.wait(30)
        fresh_model, fresh_opt = trained(width=512)
        with torch.no_grad():
            for p in fresh_model.parameters():
                p.add_(1.0)
        assert client.restore({"train": AppState(fresh_model, fresh_opt)}) == 0
        for k, v in fresh_model.state_dict().items():
            assert torch.equal(v, expected[k]), k


@pytest.fixture
def fake_world():
    """A process group of 4 fake ranks (no processes, no communication), this process rank 1."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    yield
    dist.destroy_process_group()


def test_dtensor_layout_is_cached_per_kind_of_shard_and_equals_the_computed_one(fake_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    flat = init_device_mesh("cpu", (4,))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    cases = [(flat, [Shard(0)], (10, 3)), (flat, [Shard(1)], (3, 10)), (grid, [Replicate(), Shard(0)], (7, 2))]
    for mesh, placements, shape in cases:
        local_shape, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
        x = DTensor.from_local(torch.zeros(local_shape), mesh, placements, run_check=False, shape=torch.Size(shape),
                               stride=torch.empty(shape).stride())
        first = dtensors.dtensor_layout(x)
        assert first["offsets"] == [int(o) for o in offsets] and first["shape"] == list(shape)
        assert first["coordinate"] == list(mesh.get_coordinate())
        first["offsets"].append(99)                      # a caller's change never reaches the cache
        assert dtensors.dtensor_layout(x)["offsets"] == [int(o) for o in offsets]
        assert dtensors.local_shard(x).data_ptr() == x.to_local().data_ptr()


class WrappedOptimizer(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer in miniature: an Optimizer subclass that skips Optimizer's set-up
    (so it takes no step hooks) and steps the torch optimizer it wraps."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_scheduler_over_a_wrapped_optimizer_hooks_the_optimizer_inside():
    """Under the Hugging Face Trainer the LR scheduler holds accelerate's wrapper: the snapshot must not
    fail on it (it takes no hooks), and the pre-step hook goes on the torch optimizer that steps."""
    model = nn.Linear(4, 4)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    scheduler.optimizer = WrappedOptimizer(inner)
    model(torch.randn(2, 4)).sum().backward()
    inner.step()
    hooked = []
    job = StateCapture(False, hooked.append).capture(0, {"model": model, "sched": scheduler})
    assert hooked == [inner]
    assert sum(v is not None for v in job.versions) == 2  # weight and bias copied live, not cloned
