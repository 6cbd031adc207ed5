"""The checkpoint folder ``resume_from`` writes is the Trainer's own layout, and plain PyTorch and
transformers load it: ``from_pretrained`` gives the snapshot's weights, ``torch.load(weights_only=True)``
its optimizer and scheduler state, bit for bit; the Trainer resumes from it and removes it at the
first step. A run that forgets ``resume_from`` over an interrupted run is refused; one after a
finished run starts afresh. In process, against a daemon served from a thread.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_pt_utils import safe_globals

from ftd.errors import FtdError
from ftd.integrations.transformers import FtdTrainerCallback, resume_from


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(tmp_path, endpoint, max_steps, seed, finish=True):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=8))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=1e-2, warmup_steps=1, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=seed)
    return Trainer(model=model, args=args, train_dataset=Tokens(),
                   callbacks=[FtdTrainerCallback(endpoint=endpoint, root=tmp_path / "shm", finish=finish)])


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.timeout(60)
def test_the_folder_is_a_trainer_checkpoint_that_plain_torch_and_transformers_load(thread_daemon, tmp_path):
    d = thread_daemon()
    first = trainer_for(tmp_path, d.endpoint, max_steps=3, seed=1, finish=False)
    first.train()  # snapshots steps 0-2; train end commits the last one, and (finish=False) the run is not over

    forgot = trainer_for(tmp_path, d.endpoint, max_steps=5, seed=2)
    with pytest.raises(FtdError, match=r"holds step 2 of an interrupted run.*resume_from\(trainer\)"):
        forgot.train()  # resume_from forgotten: refused, not trained over the interrupted run

    second = trainer_for(tmp_path, d.endpoint, max_steps=5, seed=2)  # other initial weights
    folder = resume_from(second)
    assert folder is not None and folder.endswith("checkpoint-3") and folder.startswith(str(tmp_path / "shm"))
    names = {p.name for p in (tmp_path / "shm").glob("*/checkpoint-3/*")}
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= names

    loaded = GPT2LMHeadModel.from_pretrained(folder)
    assert_same(dict(loaded.state_dict()), dict(first.model.state_dict()), "model")
    assert_same(torch.load(f"{folder}/optimizer.pt", weights_only=True), first.optimizer.state_dict(), "optimizer")
    assert_same(torch.load(f"{folder}/scheduler.pt", weights_only=True), first.lr_scheduler.state_dict(), "scheduler")
    with safe_globals():  # the Trainer's own allowlist for its rng_state.pth (numpy's RNG state)
        states = torch.load(f"{folder}/rng_state.pth", weights_only=True)
    assert set(states) == {"python", "numpy", "cpu"} and len(states["python"][1]) == 625
    with open(f"{folder}/trainer_state.json") as f:
        trainer_state = json.load(f)
    assert trainer_state["global_step"] == 3 and "TrainerControl" in trainer_state["stateful_callbacks"]

    second.train(resume_from_checkpoint=folder)  # the Trainer's own resume reads it
    assert second.state.global_step == 5
    assert not any((tmp_path / "shm").iterdir()), "the folder outlived the resume"

    third = trainer_for(tmp_path, d.endpoint, max_steps=1, seed=3)  # second finished: a rerun starts afresh
    third.train()
    assert third.state.global_step == 1


def test_nothing_to_resume_gives_none(thread_daemon, tmp_path):
    d = thread_daemon()
    trainer = trainer_for(tmp_path, d.endpoint, max_steps=1, seed=1)
    assert resume_from(trainer) is None
    next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FtdTrainerCallback)).client.close()
