"""Hugging Face ``Trainer``: snapshots every optimizer step, resumes through the Trainer's own resume.

    trainer = Trainer(model, args, train_dataset=data, callbacks=[FtdTrainerCallback()])
    trainer.train(resume_from_checkpoint=resume_from(trainer))   # None: nothing to resume, train afresh

``FtdTrainerCallback`` snapshots after every optimizer step (``on_step_end``): the model, the
optimizer and the LR scheduler (the torch objects inside accelerate's wrappers, so ftd's pre-step
hook sits on the optimizer that steps), the ``TrainerState`` (global step, epoch, log history, the
exportable callbacks' states) and the RNG states. ``resume_from(trainer)`` loads the newest
snapshot and writes it as a checkpoint folder in memory-backed storage (``/dev/shm``), laid out as
the Trainer's own ``checkpoint-<step>``: the model by ``trainer.save_model`` (``model.safetensors``
and its config: ``from_pretrained`` loads it), ``optimizer.pt``, ``scheduler.pt`` and
``rng_state.pth`` by ``torch.save`` (``torch.load(weights_only=True)`` loads them), and
``trainer_state.json``. ``trainer.train(resume_from_checkpoint=...)`` then does the rest as it does
for its own checkpoints: it loads the weights, optimizer and scheduler, skips the batches of the
epoch already trained (``skip_first_batches``) and sets the RNG after the skip. The folder goes once
the first step after the resume has begun.

The RNG states are ftd's own capture (``ftd.trainer.rng``), written in the Trainer's layout at
resume; the client itself captures none (``capture_rng=False``), so ``resume_from`` changes no RNG
of the process: the Trainer sets them from the folder when it should.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

import ftd
from ftd.errors import FtdError
from ftd.trainer import rng
from ftd.util.procs import process_alive

log = logging.getLogger(__name__)

META = "hf"
DEFAULT_ROOT = Path("/dev/shm")


def _inner(wrapped: Any, attribute: str) -> Any:
    """The torch object inside accelerate's AcceleratedOptimizer / AcceleratedScheduler."""
    return getattr(wrapped, attribute, wrapped) if type(wrapped).__module__.startswith("accelerate") else wrapped


class FtdTrainerCallback(TrainerCallback):
    """Snapshot the training state into the node's ftd daemon after every optimizer step.

    client: an ``ftd.Client`` (made with ``capture_rng=False``); by default one is made, for the
      Trainer's process index and world size, by ``resume_from`` or at ``on_train_begin``.
    root: where ``resume_from`` writes the checkpoint folder (default /dev/shm: memory-backed).
    resume: the client's policy in ``resume_from``: "auto" (the newest snapshot of a run that did not
      finish), "never" (drop what the job holds, start afresh), "must" (restore or raise).
    finish: when training ends, mark the run finished (``client.finish()``), so that a rerun of the
      job starts afresh instead of resuming its last step (default True).
    """

    def __init__(self, client: "ftd.Client | None" = None, *, root: str | os.PathLike = DEFAULT_ROOT,
                 resume: str = "auto", finish: bool = True, **client_options: Any):
        self.client = client
        self.root = Path(root)
        self.resume, self.finish = resume, finish
        self.client_options = client_options
        self.trainer: Trainer | None = None     # set by resume_from: the exportable callbacks' states
        self.folder: Path | None = None         # the checkpoint folder resume_from wrote
        self.resolved = False                   # the daemon was asked what to resume (resume_from or train begin)
        self._owns_client = client is None

    def connect(self, args: Any) -> "ftd.Client":
        if self.client is None:
            self.client = ftd.Client(rank=args.process_index, world_size=args.world_size, capture_rng=False,
                                     **self.client_options)
            self._owns_client = True
        return self.client

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        client = self.connect(args)
        if self.resolved:
            return
        # train() was not given resume_from(trainer): never train over an interrupted run unawares
        held = {"model": model, "optimizer": None, "scheduler": None, META: None}
        step = client.restore(held, resume=self.resume)  # "auto": an interrupted run's snapshot, if any
        self.resolved = True
        if step is not None:
            if self._owns_client:
                client.close()
                self.client = None
            raise FtdError(f"ftd holds step {step} of an interrupted run of this job; "
                           "trainer.train(resume_from_checkpoint=resume_from(trainer)) resumes it, and "
                           "FtdTrainerCallback(resume='never') starts afresh instead")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.folder is not None:
            shutil.rmtree(self.folder.parent, ignore_errors=True)  # the Trainer read it all, RNG included
            self.folder = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step - 1  # the index of the optimizer step just taken
        try:
            snapshot = {"model": model, "optimizer": _inner(optimizer, "optimizer"),
                        "scheduler": _inner(lr_scheduler, "scheduler"),
                        META: {"trainer_state": self._trainer_state(state, control), "rng": rng.capture()}}
        except Exception as e:  # a failed snapshot never stops training, and never passes for a good one
            log.warning("ftd: snapshot of step %d skipped: the trainer's state could not be read: %s "
                        "(training continues)", step, e)
            return
        self.client.snapshot(step, snapshot)  # never raises; warns itself

    def on_train_end(self, args, state, control, **kwargs):
        if self.client is not None and self._owns_client:
            if self.finish:
                self.client.finish()  # commits the last snapshot; a rerun of the job starts afresh
            else:
                self.client.close()  # commits the last snapshot
            self.client = None
        if self.folder is not None:
            shutil.rmtree(self.folder.parent, ignore_errors=True)
            self.folder = None

    def _trainer_state(self, state: Any, control: Any) -> dict:
        """The TrainerState as the Trainer writes it into a checkpoint (its exportable callbacks' states
        brought up to date, as ``Trainer._save_checkpoint`` does)."""
        out = dataclasses.asdict(state)
        callbacks = self.trainer.callback_handler.callbacks if self.trainer is not None else []
        for cb in [cb for cb in callbacks if isinstance(cb, ExportableState)] + [control]:
            name = type(cb).__name__
            if isinstance(out["stateful_callbacks"].get(name), list):
                out["stateful_callbacks"][name] = [cb.state()]
            else:
                out["stateful_callbacks"][name] = cb.state()
        return out


def resume_from(trainer: Trainer, callback: FtdTrainerCallback | None = None) -> str | None:
    """Write the newest snapshot as a checkpoint folder for ``trainer.train(resume_from_checkpoint=...)``;
    its path, or None when the daemon holds nothing to resume (train afresh).

    Loads the snapshot's model weights into ``trainer.model`` (the Trainer loads them again from the
    folder). Raises DaemonUnavailable when no daemon answers.
    """
    callback = callback or next((cb for cb in trainer.callback_handler.callbacks
                                 if isinstance(cb, FtdTrainerCallback)), None)
    if callback is None:
        callback = FtdTrainerCallback()
        trainer.add_callback(callback)
    callback.trainer = trainer
    args = trainer.args
    client = callback.connect(args)
    # the keys of a snapshot: the model loads in place, the rest comes back as plain data
    state: dict[str, Any] = {"model": trainer.model, "optimizer": None, "scheduler": None, META: None}
    step = client.restore(state, resume=callback.resume)
    callback.resolved = True
    if step is None:
        return None
    meta = state[META]
    if not isinstance(meta, dict) or not isinstance(state["optimizer"], dict) or not isinstance(state["scheduler"], dict):
        raise FtdError(f"the snapshot of step {step} was not taken by FtdTrainerCallback; "
                       "FtdTrainerCallback(resume='never') starts afresh")
    trainer_state = meta["trainer_state"]
    remove_stale_folders(callback.root)
    folder = callback.root / f"ftd-hf-{os.getpid()}-rank{args.process_index}" / f"checkpoint-{trainer_state['global_step']}"
    if folder.parent.exists():
        shutil.rmtree(folder.parent)
    folder.mkdir(parents=True, mode=0o700)
    write_checkpoint(trainer, folder, state["optimizer"], state["scheduler"], trainer_state, meta["rng"])
    callback.folder = folder
    log.info("ftd: rank %d resumes after step %d through %s", args.process_index, step, folder)
    return str(folder)


def remove_stale_folders(root: Path) -> None:
    """Checkpoint folders of processes that died before they got to train (SIGKILL leaves them)."""
    for path in root.glob("ftd-hf-*-rank*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(trainer: Trainer, folder: Path, optimizer: dict, scheduler: dict, trainer_state: dict,
                     rng_states: dict) -> None:
    """The files of the Trainer's own checkpoint folder (``Trainer._save_checkpoint``), from a snapshot."""
    trainer.save_model(str(folder))
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save(scheduler, folder / "scheduler.pt")
    args = trainer.args
    name = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
    torch.save(trainer_rng(rng_states, distributed=args.world_size > 1), folder / name)
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")


def trainer_rng(states: dict, distributed: bool) -> dict:
    """ftd's RNG capture in the layout of the Trainer's ``rng_state.pth`` (``Trainer._save_rng_state``)."""
    py = states["python"]
    out = {"python": (py["version"], tuple(int(x) for x in py["state"]), py["gauss"]),
           "numpy": states["numpy"], "cpu": states["torch"]}
    cuda = states.get("cuda") or []
    if cuda:
        out["cuda"] = list(cuda) if distributed else cuda[torch.cuda.current_device()]
    return out

