"""The parts of the Lightning callback, in process (Lightning itself is too heavy an import for the
unit loop): the closure is run before ftd's pre-step hook (so the wait lands after the backward
pass), batch fingerprints, and a snapshot that does not fit this run is refused with a clear error.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftd
from ftd.integrations.lightning import FtdCallback, fingerprint, run_closure_first


def test_the_closure_runs_before_the_hooks_registered_after_it_and_once():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    order = []
    opt.register_step_pre_hook(run_closure_first)
    opt.register_step_pre_hook(lambda o, a, k: order.append("later hook"))

    def closure():
        order.append("closure")
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure=closure)
    assert order == ["closure", "later hook"] and loss.item() == 3.0
    assert torch.equal(p.detach(), torch.full((3,), 0.8))  # one step, from the closure's gradient
    assert opt.step() is None and order == ["closure", "later hook", "later hook"]  # no closure: nothing to run


def test_fingerprint_sees_every_tensor_in_a_batch():
    x, y = torch.arange(6.0).view(2, 3), torch.tensor([1, 0])
    assert fingerprint([x, y]) == fingerprint((x.clone(), y.clone()))
    assert fingerprint([x, y]) != fingerprint([x, y.flip(0)])
    assert fingerprint({"a": x, "b": y}) != fingerprint({"a": y, "b": x})
    assert fingerprint(x.view(3, 2)) != fingerprint(x)        # the shape counts
    assert fingerprint(["no tensors", 3]) is None


class TwoOptimizers(pl.LightningModule):
    def __init__(self, count: int):
        super().__init__()
        self.net, self.count = nn.Linear(4, 1), count
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers() if self.count > 1 else [self.optimizers()]:
            opt.zero_grad()
            loss = self.net(batch[0]).square().mean()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.parameters(), lr=0.1) for _ in range(self.count)]


def fit(endpoint: str, count: int, save_to=None, **fit_kwargs) -> FtdCallback:
    cb = FtdCallback(ftd.Client(endpoint), finish=False)  # as if interrupted: the next fit resumes
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(TwoOptimizers(count), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2), **fit_kwargs)
    finally:
        cb.client.close()
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return cb


@pytest.mark.timeout(60)
def test_a_snapshot_of_another_setup_is_refused_with_what_differs(thread_daemon, tmp_path):
    d = thread_daemon()
    assert fit(d.endpoint, 1, save_to=tmp_path / "x.ckpt").restored_step is None
    with pytest.raises(ftd.FtdError, match=r"the state has key\(s\) \['optimizer1'\] that the snapshot lacks"):
        fit(d.endpoint, 2)
    with pytest.raises(ftd.FtdError, match=r"ckpt_path=.*pass ckpt_path=None"):
        fit(d.endpoint, 1, ckpt_path=str(tmp_path / "x.ckpt"))
