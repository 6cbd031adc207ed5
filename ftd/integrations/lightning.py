"""PyTorch Lightning: ``Trainer(callbacks=[FtdCallback()])`` snapshots after every optimizer step and,
when the run starts again, resumes from the newest snapshot bit for bit, mid-epoch included.

A snapshot holds the LightningModule, every optimizer and LR scheduler (restored in place), the fit
loop's state (``trainer.fit_loop.state_dict()``: epoch, global step, batch progress, a stateful
loader's position), the other callbacks', the datamodule's and the precision plugin's
``state_dict()``, the RNG states, and what the data position needs: the RNG state in force when the
epoch's train iterator was made, and how many of the epoch's batches were consumed.

Resume, in ``on_fit_start`` (the strategy has set up optimizers and schedulers; the fit loop has not
started): the snapshot is loaded, the fit loop's state is loaded as Lightning loads a checkpoint's,
so its own mid-epoch restart logic runs, and the RNG is set to the epoch's. The fit loop then makes
the epoch's iterator as the interrupted run did (same shuffle, same worker seeds), and
``on_train_start`` draws the consumed batches off it (loading them: the cost of a replay) before it
puts the RNG back to the snapshot's. A loader that keeps its own position (``state_dict`` /
``load_state_dict``, as torchdata's StatefulDataLoader) is restored by Lightning itself from the fit
loop's state, and nothing is drawn. Lightning's own resume (``ckpt_path=``) does neither: it restores
no RNG state and starts a plain loader's epoch over (README has the measurement).

The first batch of every epoch is fingerprinted; if the replayed epoch starts with another batch
(something drew random numbers between the epoch's start and its first batch that the replay does
not repeat), the resume stops with an error rather than train on other data (``on_data_mismatch``).

Lightning internals used, all of Lightning 2.x: ``fit_loop._data_fetcher`` and
``fit_loop._combined_loader`` (to draw the consumed batches, after setting the samplers' epoch as
the fit loop does), and
``lightning_module._on_before_batch_transfer`` (to fingerprint a batch as the hooks see it).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
import xxhash
from lightning.pytorch import Callback, LightningModule, Trainer

import ftd
from ftd.errors import FtdError
from ftd.trainer import rng

log = logging.getLogger(__name__)

META = "lightning"  # the snapshot's entry for the trainer's own state (plain data)


class FtdCallback(Callback):
    """Snapshot the whole training state into the node's ftd daemon after every optimizer step, and
    resume from the newest snapshot when ``trainer.fit`` starts.

    client: an ``ftd.Client`` to use; by default one is made at ``setup`` (after the strategy set up
      torch.distributed, so rank and world size are known), with ``client_options``.
    restore: resume from the newest snapshot at the start of ``fit`` (default True).
    resume: the client's policy for it: "auto" (the newest snapshot of a run that did not finish),
      "never" (drop what the job holds and start afresh), "must" (restore or raise).
    finish: at the end of a completed ``fit``, mark the run finished (``client.finish()``), so that a
      rerun of the job starts afresh instead of resuming its last step (default True).
    on_data_mismatch: "raise" (default) or "warn" when a replayed epoch does not start with the batch
      the interrupted run started it with.
    """

    def __init__(self, client: "ftd.Client | None" = None, *, restore: bool = True, resume: str = "auto",
                 finish: bool = True, on_data_mismatch: str = "raise", **client_options: Any):
        if on_data_mismatch not in ("raise", "warn"):
            raise ValueError(f"on_data_mismatch must be 'raise' or 'warn', got {on_data_mismatch!r}")
        self.client = client
        self.restore = restore
        self.resume = resume
        self.finish = finish
        self.on_data_mismatch = on_data_mismatch
        self.client_options = client_options
        self.restored_step: int | None = None   # the step the last fit resumed after, None if it started fresh
        self._owns_client = client is None
        self._epoch_rng: dict | None = None      # RNG when this epoch's train iterator was made
        self._first_batch: str | None = None     # fingerprint of this epoch's first batch
        self._iterator_from_setup = False        # the current epoch's iterator was made before on_train_epoch_start
        self._skip = 0                           # batches to draw off the iterator at on_train_start
        self._resume_rng: dict | None = None
        self._expected_first: str | None = None
        self._last_step = -1
        self._closure_hooks: dict[int, Any] = {}

    # ---- what a snapshot holds ----------------------------------------------------------------
    @staticmethod
    def _live(trainer: Trainer, pl_module: LightningModule) -> dict:
        state: dict[str, Any] = {"module": pl_module}
        for i, optimizer in enumerate(trainer.optimizers):
            state[f"optimizer{i}"] = optimizer
        for i, config in enumerate(trainer.lr_scheduler_configs):
            state[f"scheduler{i}"] = config.scheduler
        return state

    def _meta(self, trainer: Trainer, live: dict) -> dict:
        callbacks = {}
        for cb in trainer.callbacks:
            if cb is not self and (sd := cb.state_dict()):
                callbacks[cb.state_key] = sd
        batches = trainer.num_training_batches
        return {
            "entries": sorted(live),
            "fit_loop": trainer.fit_loop.state_dict(),
            "callbacks": callbacks,
            "datamodule": trainer.datamodule.state_dict() if trainer.datamodule is not None else {},
            "precision": trainer.precision_plugin.state_dict(),
            "epoch_rng": self._epoch_rng,
            "epoch_batches": batches if math.isfinite(batches) else -1,
            "first_batch": self._first_batch,
        }

    # ---- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.client is None:
            self.client = ftd.Client(**self.client_options)
            self._owns_client = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for optimizer in trainer.optimizers:
            if type(optimizer) in CLOSURE_ONCE and id(optimizer) not in self._closure_hooks:
                self._closure_hooks[id(optimizer)] = optimizer.register_step_pre_hook(run_closure_first)
        self._last_step = trainer.global_step
        self._iterator_from_setup = True
        self._skip = 0
        self.restored_step = None
        if self.restore:
            self._restore(trainer, pl_module)
        self._epoch_rng = rng.capture()  # the fit loop makes the first epoch's iterator right after this hook

    def _restore(self, trainer: Trainer, pl_module: LightningModule) -> None:
        live = self._live(trainer, pl_module)
        state = {**live, META: None}  # the same keys as a snapshot's: a snapshot of other optimizers is refused
        step = self.client.restore(state, resume=self.resume)
        if step is None:
            return
        if trainer.ckpt_path is not None:
            raise FtdError(f"trainer.fit got ckpt_path={trainer.ckpt_path!r}, and ftd holds a newer snapshot "
                           f"(step {step}); pass ckpt_path=None to resume from ftd, or FtdCallback(restore=False) "
                           "to resume from the checkpoint file")
        meta = state.pop(META)
        if not isinstance(meta, dict) or meta.get("entries") != sorted(live):
            raise FtdError(f"the snapshot of step {step} was not taken by FtdCallback for this module, its "
                           f"optimizers and schedulers ({sorted(live)}); FtdCallback(resume='never') starts afresh")
        trainer.fit_loop.load_state_dict(meta["fit_loop"])
        for cb in trainer.callbacks:
            if cb.state_key in meta["callbacks"]:
                cb.load_state_dict(meta["callbacks"][cb.state_key])
        if meta["datamodule"] and trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(meta["datamodule"])
        if meta["precision"]:
            trainer.precision_plugin.load_state_dict(meta["precision"])
        self._last_step = trainer.global_step
        self.restored_step = step
        self._first_batch = meta["first_batch"]
        consumed = meta["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]
        stateful_loader = bool(meta["fit_loop"].get("state_dict", {}).get("combined_loader"))
        mid_epoch = meta["epoch_batches"] < 0 or consumed < meta["epoch_batches"]
        if consumed and mid_epoch and not stateful_loader:
            if meta["epoch_rng"] is None:
                raise FtdError(f"the snapshot of step {step} does not say how its epoch's data was shuffled")
            self._skip, self._expected_first = consumed, meta["first_batch"]
            self._resume_rng = rng.capture()
            rng.restore(meta["epoch_rng"])
            # Lightning warns that a plain loader cannot resume mid-epoch; this callback replays it
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
        log.info("ftd: resumed after step %d (epoch %d, %d batches of it done)", step, trainer.current_epoch, consumed)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._skip:
            return
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "fetched"):
            raise FtdError("this Lightning version's fit loop has no data fetcher to skip batches on; "
                           "ftd's callback needs lightning 2.x")
        if type(fetcher).__name__ == "_DataLoaderIterDataFetcher":
            raise FtdError("training_step takes dataloader_iter, so ftd cannot replay the epoch's position up to "
                           f"the {self._skip} batches it had consumed; use a loader with state_dict()/load_state_dict() "
                           "(torchdata's StatefulDataLoader), which Lightning restores itself")
        # the fit loop sets the samplers' epoch (DistributedSampler's shuffle) only after this hook
        for loader in trainer.fit_loop._combined_loader.flattened:
            set_sampler_epoch(loader, trainer.fit_loop.epoch_progress.current.processed)
        for i in range(self._skip):
            try:
                batch, _, _ = next(fetcher)
            except StopIteration:
                raise FtdError(f"the train loader ran out after {i} of the {self._skip} batches the interrupted "
                               "run had consumed this epoch: it is not the same data") from None
            if i == 0 and self._expected_first is not None:
                self._check_first(trainer, batch)
        fetcher.fetched -= self._skip  # the epoch loop adds the consumed batches to its count itself
        rng.restore(self._resume_rng)
        self._skip, self._resume_rng = 0, None

    def _check_first(self, trainer: Trainer, batch: Any) -> None:
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        if fingerprint(batch) != self._expected_first:
            message = ("ftd: the replayed epoch does not start with the batch the interrupted run started it with, "
                       "so the resumed run would train on other data (something drew random numbers between the "
                       "epoch's start and its first batch that the replay does not repeat, or the data changed)")
            if self.on_data_mismatch == "raise":
                raise FtdError(message + "; FtdCallback(on_data_mismatch='warn') goes on anyway")
            log.warning("%s; going on (on_data_mismatch='warn')", message)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._iterator_from_setup:
            self._iterator_from_setup = False  # the first epoch of a fit: its iterator came before this hook
        else:
            self._epoch_rng = rng.capture()  # later epochs: the epoch loop makes the iterator after it

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._iterator_from_setup = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._first_batch = fingerprint(batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step since the last snapshot
        self._last_step = trainer.global_step
        step = trainer.global_step - 1  # the index of the optimizer step just taken
        try:
            state = self._live(trainer, pl_module)
            state[META] = self._meta(trainer, state)
        except Exception as e:  # a failed snapshot never stops training, and never passes for a good one
            log.warning("ftd: snapshot of step %d skipped: the trainer's state could not be read: %s "
                        "(training continues)", step, e)
            return
        self.client.snapshot(step, state)  # never raises; warns itself

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.finish and self.client is not None and self._owns_client:
            self.client.finish()  # the run is over: a rerun of the job starts afresh
            self.client = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.client is not None and self._owns_client:
            self.client.close()  # commits the last snapshot
            self.client = None
        for handle in self._closure_hooks.values():
            handle.remove()
        self._closure_hooks.clear()


# Optimizers whose step() calls its closure exactly once (LBFGS calls it many times).
CLOSURE_ONCE = {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adadelta,
                torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
                torch.optim.ASGD}


def run_closure_first(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
    """A step pre-hook that runs the step's closure (Lightning's forward and backward) before the
    hooks registered after it, and hands step() its result instead.

    Lightning calls ``optimizer.step(closure=...)`` with forward and backward inside the closure, so
    ftd's own pre-step hook (which waits for the background copy of the parameters) would wait
    before the forward pass, and the copy would overlap nothing. Registered before ftd's hook, this
    one moves that wait to after the backward pass, where ftd means it to be.
    """
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()
    kwargs = {k: v for k, v in kwargs.items() if k != "closure"}
    return (args[:1], {**kwargs, "closure": lambda: loss})


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on a loader's sampler and its batch sampler's, as the fit loop does at an epoch's start."""
    samplers = {id(s): s for s in (getattr(loader, "sampler", None),
                                   getattr(getattr(loader, "batch_sampler", None), "sampler", None))
                if s is not None and callable(getattr(s, "set_epoch", None))}
    for sampler in samplers.values():
        sampler.set_epoch(epoch)


def fingerprint(batch: Any) -> str | None:
    """xxh3 of every tensor in a batch (nested lists, tuples, dicts), with dtypes and shapes; None
    if it holds no tensor."""
    h = xxhash.xxh3_64()
    found = False

    def walk(x: Any) -> None:
        nonlocal found
        if isinstance(x, torch.Tensor):
            found = True
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(batch)
    return h.hexdigest() if found else None
