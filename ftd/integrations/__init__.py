"""ftd inside the training frameworks people already use: one line added to their trainer.

``ftd.integrations.lightning.FtdCallback`` (PyTorch Lightning),
``ftd.integrations.transformers.FtdTrainerCallback`` (Hugging Face ``Trainer``) and
``ftd.integrations.torchtitan.FtdCheckpointManager`` (torchtitan's checkpoint slot) snapshot after
every optimizer step through ``ftd.Client`` and, when a run starts again, resume from the newest
snapshot.

Runs in the training process. May import the trainer side's public API (``ftd.Client``), its RNG
helpers (``ftd.trainer.rng``) and the shared basics (``ftd.errors``); each module imports its
framework (``lightning``, ``transformers``, ``torchtitan``) itself, so importing this package costs nothing and
``import ftd`` never loads a framework. Nothing of the daemon side imports this package.
"""
