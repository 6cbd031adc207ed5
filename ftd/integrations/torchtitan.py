"""torchtitan: ``checkpoint=FtdCheckpointManager.Config()`` in a torchtitan config (``Trainer.Config``)
snapshots every step into the node's ftd daemon and, when the job starts again, resumes from the
newest snapshot bit for bit.

torchtitan's Trainer drives a checkpoint manager through ``BaseCheckpointManager``'s slot:
``load(step)`` before the loop, ``maybe_wait_for_staging()`` right before ``optimizers.step()``,
``save(step, last_step)`` after every step, ``close()`` at the end (also after an exception). Here:

- ``_save`` hands ftd's client torchtitan's own Stateful containers: ``model`` (a ``ModelWrapper``
  over the model parts: FQN keys, DTensor shards), ``optimizer`` (the ``OptimizersContainer``:
  flat FQN-keyed state), ``lr_scheduler``, ``dataloader`` (``LoaderState``), ``train_state`` (the
  Trainer: step, tokens seen) and whatever else torchtitan passes in ``states``; the client adds the
  RNG states, which torchtitan's own checkpoint does not hold.
- ``_maybe_wait_for_staging`` waits for nothing of ftd's: the client's pre-step hook on the
  ``OptimizersContainer`` (an ``Optimizer``) already waits there, and only while the background copy
  of the parameters is still running; waiting here too would block on copies the hook would skip.
- ``_load`` restores the newest snapshot (``resume`` policy as ``ftd.Client.restore``); the step it
  restored becomes the Trainer's step through ``train_state``. With nothing in ftd it falls back to
  torchtitan's own DCP manager where one is configured (``dcp_checkpoints``, ``initial_load_path``).
- ``_close`` marks the run finished (``client.finish()``) once ``save`` saw the last step, so a
  rerun of the job starts afresh; after a failure it only closes (a rerun resumes).

``dcp_checkpoints=True`` also keeps torchtitan's periodic DCP checkpoints (``interval``, ``folder``,
``keep_latest_k``, ``async_mode``, the final model-only export): the manager then drives a
torchtitan ``CheckpointManager`` beside ftd. Without it, ftd's ``flush_dir`` is the disk tier.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from torchtitan.components.checkpointer import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    TRAIN_STATE,
    BaseCheckpointManager,
    CheckpointManager,
    ModelWrapper,
)

import ftd
from ftd.errors import FtdError
from ftd.trainer import rng

log = logging.getLogger(__name__)


class LoaderState:
    """torchtitan's data loader, as a Stateful without pickle.

    ``ParallelAwareDataloader.state_dict()`` pickles the ``StatefulDataLoader`` state into bytes, and
    its ``load_state_dict()`` unpickles them: bytes that come back from the daemon's memory (or a peer
    that rebuilt them) must never reach ``pickle.loads``. This hands ftd the plain state instead
    (dicts, lists, numbers: what ftd's codec stores) and loads it the same way. A loader that is no
    ``StatefulDataLoader`` is snapshotted through its own ``state_dict()``."""

    def __init__(self, loader: Any):
        self.loader = loader

    def _stateful_base(self):
        from torchdata.stateful_dataloader import StatefulDataLoader
        return StatefulDataLoader if isinstance(self.loader, StatefulDataLoader) else None

    def state_dict(self) -> dict:
        base = self._stateful_base()
        if base is None:
            return self.loader.state_dict()
        return {"dp_world_size": getattr(self.loader, "dp_world_size", 1), "loader": base.state_dict(self.loader)}

    def load_state_dict(self, state: dict) -> None:
        base = self._stateful_base()
        if base is None:
            self.loader.load_state_dict(state)
            return
        saved, live = state.get("dp_world_size"), getattr(self.loader, "dp_world_size", 1)
        if saved != live:
            raise FtdError(f"the snapshot's data loader was one of {saved} data-parallel ranks, this one is one of "
                           f"{live}: torchtitan's loaders do not reshard their position; restart with the same "
                           "data-parallel degree, or start afresh with --checkpoint.resume never")
        base.load_state_dict(self.loader, state["loader"])


class RngAtFirstForward:
    """Puts the RNG states a restore set back at the first forward pass after it.

    torchtitan's loop makes its data loader's iterator lazily, at the first batch it draws, and making
    one draws a seed from torch's RNG. The interrupted run made its iterator at its first step; the
    resumed run makes a new one at the first step after the resume, between the restore and the
    forward pass, where the interrupted run drew nothing. Without this, that draw would shift every
    random number of the resumed run (dropout masks) against the uninterrupted run's."""

    def __init__(self, model_parts: list, states: dict):
        self.states = states
        self.handles = [part.register_forward_pre_hook(self._first_forward, prepend=True) for part in model_parts]

    def _first_forward(self, module, args) -> None:
        rng.restore(self.states)
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class FtdCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint slot, backed by ftd's in-memory snapshots (module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        enable: bool = True
        """Snapshot into ftd (choosing this manager means so)."""

        snapshot_interval: int = 1
        """Snapshot every N steps (and the last one). 1: a crash loses at most the step in flight."""

        endpoint: str | None = None
        """The ftd daemon's control endpoint; by default found from the environment as ftd.Client does
        ($FTD_ENDPOINT, $FTD_CONFIG, the node rank torchrun or SLURM set)."""

        resume: Literal["auto", "never", "must"] = "auto"
        """auto: resume the newest snapshot of a run that did not finish; never: drop what the job holds
        and start afresh; must: resume or stop with an error."""

        finish: bool = True
        """After the last step, mark the run finished, so that a rerun of the job starts afresh."""

        dcp_checkpoints: bool = False
        """Also write torchtitan's own DCP checkpoints every `interval` steps into `folder` (and load the
        newest of them when ftd holds no snapshot)."""

        async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
        """How those DCP checkpoints are written (torchtitan's CheckpointManager.Config.async_mode)."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            if self.snapshot_interval < 1:
                raise ValueError(f"checkpoint.snapshot_interval must be at least 1, got {self.snapshot_interval}")
            if self.resume not in ("auto", "never", "must"):
                raise ValueError(f"checkpoint.resume must be auto, never or must, got {self.resume!r}")
            if self.create_seed_checkpoint:
                raise ValueError("checkpoint.create_seed_checkpoint writes a DCP seed checkpoint: run it with "
                                 "torchtitan's CheckpointManager, then train with FtdCheckpointManager and "
                                 "checkpoint.initial_load_path pointing at it")

    def __init__(self, config: Config, *, dataloader: Any, model_parts: list, optimizers: Any, lr_schedulers: Any,
                 states: dict[str, Any], sd_adapter: Any = None, base_folder: str = "") -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.config = config
        self._dcp: CheckpointManager | None = None
        if config.dcp_checkpoints or config.initial_load_path or config.initial_load_in_hf:
            self._dcp = CheckpointManager(dcp_config(config), dataloader=dataloader, model_parts=model_parts,
                                          optimizers=optimizers, lr_schedulers=lr_schedulers, states=dict(states),
                                          sd_adapter=sd_adapter, base_folder=base_folder)
        self.states: dict[str, Any] = dict(states)
        self.states.update({MODEL: ModelWrapper(model_parts), OPTIMIZER: optimizers, LR_SCHEDULER: lr_schedulers})
        if dataloader is not None:
            self.states[DATALOADER] = LoaderState(dataloader)
        self.model_parts = model_parts
        self.client: ftd.Client | None = ftd.Client(config.endpoint)
        self._rng_replay: RngAtFirstForward | None = None
        self.restored_step: int | None = None  # the step the last load() resumed after, None if none
        self._completed = False  # save() saw the last step

    @property
    def save_future(self):
        """torchtitan's handle on an asynchronous DCP save (ftd's snapshots are no futures: they commit in
        the background and are waited for at the next optimizer step)."""
        return self._dcp.save_future if getattr(self, "_dcp", None) is not None else None

    @save_future.setter
    def save_future(self, value) -> None:
        if value is not None:
            raise AttributeError("FtdCheckpointManager.save_future is its DCP manager's")

    # ---- the slot -------------------------------------------------------------------------------
    def _load(self, step: int = -1) -> bool:
        if step != -1:  # --checkpoint.load_step names one of torchtitan's DCP checkpoints
            if self._dcp is None:
                raise FtdError(f"checkpoint.load_step={step} asks for a DCP checkpoint, and this FtdCheckpointManager "
                               "writes none: set checkpoint.dcp_checkpoints=True (or leave load_step at -1 to "
                               "resume ftd's newest snapshot)")
            return self._dcp._load(step)
        excluded = set(self.config.exclude_from_loading)
        unknown = excluded - set(self.states)
        if unknown:
            raise FtdError(f"checkpoint.exclude_from_loading names {sorted(unknown)}, which are not part of the "
                           f"training state ({sorted(self.states)})")
        state = {k: v for k, v in self.states.items() if k not in excluded}
        restored = self._client().restore(state, resume=self.config.resume, strict=not excluded)
        if restored is None:
            return self._dcp._load(-1) if self._dcp is not None else False
        trainer_step = state[TRAIN_STATE].state_dict().get("step") if TRAIN_STATE in state else restored
        if trainer_step != restored:
            raise FtdError(f"ftd restored the snapshot of step {restored}, but its train_state says step "
                           f"{trainer_step}: the snapshot was not taken by FtdCheckpointManager.save(step); "
                           "start afresh with --checkpoint.resume never")
        self.restored_step = restored
        if self._client().capture_rng:
            self._rng_replay = RngAtFirstForward(self.model_parts, rng.capture())  # as the restore set them
        log.info("ftd: resumed after step %d (rank %d)", restored, self._client().rank)
        return True

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if self.config.load_only:
            return False
        saved = False
        if last_step or curr_step % self.config.snapshot_interval == 0:
            self._client().snapshot(curr_step, self.states)  # never raises after the first; warns itself
            saved = True
        if last_step:
            self._completed = True
        if self._dcp is not None:
            saved = self._dcp._save(curr_step, last_step) or saved
        return saved

    def _maybe_wait_for_staging(self) -> None:
        # ftd: nothing to do; the client's pre-step hook on the OptimizersContainer waits (module doc).
        if self._dcp is not None:
            self._dcp.maybe_wait_for_staging()

    def _wait_for_saving(self) -> None:
        if self.client is not None and not self.client.wait(60):
            log.warning("ftd: the last snapshot was not committed (see the warning before this one)")
        if self._dcp is not None:
            self._dcp.maybe_wait_for_saving()

    def _close(self) -> None:
        if self._rng_replay is not None:
            self._rng_replay.remove()
        client, self.client = self.client, None
        if client is not None:
            if self._completed and self.config.finish:
                client.finish()  # the run is over: a rerun of the job starts afresh
            else:
                client.close()   # commits the last snapshot; a rerun resumes it
        if self._dcp is not None:
            self._dcp.close()

    def _client(self) -> ftd.Client:
        if self.client is None:
            raise FtdError("this FtdCheckpointManager was closed; build a new one (config.checkpoint.build)")
        return self.client


def dcp_config(config: FtdCheckpointManager.Config) -> CheckpointManager.Config:
    """torchtitan's own DCP manager's config, from the fields both share."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(BaseCheckpointManager.Config)}
    shared["enable"] = True
    return CheckpointManager.Config(**shared, async_mode=config.async_mode)
