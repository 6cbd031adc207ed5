"""``FtdCheckpointManager`` driven the way torchtitan's Trainer drives its checkpoint slot, on
torchtitan's own containers (``OptimizersContainer``, ``LRSchedulersContainer``,
``ParallelAwareDataloader``) and a small unsharded model, against a daemon in this process. The
sharded, launched, crashed case is tests/e2e/integrations/test_torchtitan.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (./scripts/setup installs it)")

from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402

from ftd.errors import FtdError  # noqa: E402
from ftd.integrations.torchtitan import FtdCheckpointManager, LoaderState  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def patient_hook(monkeypatch):
    monkeypatch.setattr("ftd.trainer.client.BEGIN_GRACE_SECONDS", 5.0)  # see tests/unit/trainer/test_client.py


class Counting(IterableDataset):
    """A Stateful dataset (torchtitan's text datasets are): batch i holds the numbers 8i..8i+7."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            x = torch.arange(8.0) + 8 * self.i
            self.i += 1
            yield {"input": x}, x.sum()

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


class TrainState:
    """The Trainer's part of the state (``states={"train_state": trainer}``)."""

    def __init__(self):
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd):
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


class Job:
    """What torchtitan's Trainer builds and hands to ``config.checkpoint.build``, and its loop."""

    def __init__(self, endpoint: str, tmp_path, **options):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.optimizers = default_adamw(lr=1e-2, weight_decay=0.1).build(model_parts=[self.model])
        self.schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=self.optimizers,
                                                                            training_steps=10)
        self.loader = ParallelAwareDataloader(Counting(), dp_rank=0, dp_world_size=1, batch_size=2)
        self.trainer = TrainState()
        self.manager = FtdCheckpointManager.Config(endpoint=endpoint, **options).build(
            dataloader=self.loader, model_parts=[self.model], optimizers=self.optimizers,
            lr_schedulers=self.schedulers, states={"train_state": self.trainer}, sd_adapter=None,
            base_folder=str(tmp_path))
        self.batches = None

    def step(self, last: bool = False) -> torch.Tensor:
        if self.batches is None:
            self.batches = iter(self.loader)
        self.trainer.step += 1
        batch, _ = next(self.batches)
        loss = self.model(batch["input"]).pow(2).mean()
        self.optimizers.zero_grad()
        loss.backward()
        self.manager.maybe_wait_for_staging()
        self.optimizers.step()
        self.schedulers.step()
        self.manager.save(self.trainer.step, last_step=last)
        return batch["input"]

    def snapshot_of_live(self) -> dict:
        moments = {k: v.clone() for k, v in self.optimizers.state_dict().items() if torch.is_tensor(v)}
        return {"params": [p.detach().clone() for p in self.model.parameters()], "moments": moments,
                "lr": [g["lr"] for o in self.optimizers for g in o.param_groups],
                "sched": self.schedulers.state_dict(), "step": self.trainer.step}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["lr"] == b["lr"] and a["sched"] == b["sched"]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    assert a["moments"].keys() == b["moments"].keys()
    assert all(torch.equal(a["moments"][k], b["moments"][k]) for k in a["moments"])


def test_a_new_job_resumes_the_step_its_weights_moments_schedule_and_data_position(thread_daemon, tmp_path):
    d = thread_daemon()
    reference = Job(d.endpoint, tmp_path, enable=False)  # torchtitan with checkpointing off: no ftd
    for _ in range(4):
        reference.step()
    first = Job(d.endpoint, tmp_path)
    assert first.manager.load() is False  # nothing yet: a fresh start
    for _ in range(3):
        first.step()
    assert first.manager.client.wait(10)
    at_3 = first.snapshot_of_live()
    first.manager.close()  # no last step: the run did not finish (as after a crash), a rerun resumes

    second = Job(d.endpoint, tmp_path)
    with torch.no_grad():
        for p in second.model.parameters():
            p.add_(1.0)  # the new job starts from other weights; the restore must replace them all
    assert second.manager.load() is True and second.manager.restored_step == 3
    assert_same(second.snapshot_of_live(), at_3)  # and the optimizer container's restore moved no parameter
    fourth = second.step()
    assert torch.equal(fourth, torch.stack([torch.arange(8.0) + 48, torch.arange(8.0) + 56])), \
        "the data loader did not resume its position"
    assert_same(second.snapshot_of_live(), reference.snapshot_of_live())
    second.manager.close()


def test_the_loader_state_is_handed_over_without_pickle():
    loader = ParallelAwareDataloader(Counting(), dp_rank=0, dp_world_size=1, batch_size=2)
    it = iter(loader)
    next(it)
    state = LoaderState(loader).state_dict()

    def walk(x):
        assert not isinstance(x, (bytes, bytearray)), "pickled bytes in the loader's state"
        for v in (x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()):
            walk(v)

    walk(state)
    assert isinstance(loader.state_dict()["dp_rank_0"], bytes)  # what torchtitan itself would hand over
    other = ParallelAwareDataloader(Counting(), dp_rank=0, dp_world_size=2, batch_size=2)
    with pytest.raises(FtdError, match="one of 1 data-parallel ranks, this one is one of 2"):
        LoaderState(other).load_state_dict(state)


def test_finishing_the_last_step_makes_a_rerun_start_afresh(thread_daemon, tmp_path):
    d = thread_daemon()
    job = Job(d.endpoint, tmp_path)
    job.step()
    job.step(last=True)
    job.manager.close()  # after the last step: finish()
    rerun = Job(d.endpoint, tmp_path)
    assert rerun.manager.load() is False and rerun.trainer.step == 0
    rerun.manager.close()


def test_mistakes_are_refused_saying_what_to_do(thread_daemon, tmp_path):
    d = thread_daemon()
    job = Job(d.endpoint, tmp_path)
    with pytest.raises(FtdError, match="set checkpoint.dcp_checkpoints=True"):
        job.manager.load(step=3)
    with pytest.raises(FtdError, match=r"exclude_from_loading names \['optimiser'\]"):
        job.manager.config.exclude_from_loading = ["optimiser"]
        job.manager.load()
    job.manager.config.exclude_from_loading = []
    with pytest.raises(FtdError, match="resume='must'"):
        job.manager.config.resume = "must"
        job.manager.load()
    job.manager.close()
    with pytest.raises(FtdError, match="was closed"):
        job.manager._save(1)
    with pytest.raises(ValueError, match="snapshot_interval must be at least 1"):
        FtdCheckpointManager.Config(snapshot_interval=0)
    with pytest.raises(ValueError, match="seed checkpoint"):
        FtdCheckpointManager.Config(create_seed_checkpoint=True)
