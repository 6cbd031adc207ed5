"""torchtitan configs (a ``config_registry`` for ``--module``) of a tiny llama3 that needs no download:
the uninterrupted reference, the same job with ftd's checkpoint manager, and with torchtitan's own
DCP checkpoint every step.

    ftd daemon &   # or under `ftd agent`
    torchrun --nproc-per-node 2 -m torchtitan.train --module ftd.examples.torchtitan_configs \\
        --config llama3_tiny_ftd --dump_folder /tmp/titan        # on GPUs
    torchrun --nproc-per-node 2 -m ftd.examples.torchtitan_cpu --module ftd.examples.torchtitan_configs \\
        --config llama3_tiny_ftd --dump_folder /tmp/titan        # on a CPU-only machine (gloo)

The model is torchtitan's llama3 ``debugmodel`` cut to 2 layers, with SDPA (causal) attention instead
of FlexAttention, which has no backward pass on the CPU (torchtitan's own graph_trainer tests swap
it the same way); the text is ``ftd.examples.corpus`` (registered as the dataset ``ftd_corpus``),
the tokenizer its characters. ``LossFile`` appends every step's global loss to
<dump_folder>/losses-rank<R>.txt as "step float.hex()" (and the gradient norm to gradnorm-rank<R>.txt),
and with ``--metrics.crash_rank R --metrics.crash_at S`` rank R SIGKILLs itself after logging step S
of a job's first attempt (torchrun's $TORCHELASTIC_RESTART_COUNT 0).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.nn.functional as F
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer

from ftd.examples import corpus
from ftd.integrations.torchtitan import FtdCheckpointManager

SENTENCES = [s for paragraph in corpus.TEXT.split("\n\n") for s in paragraph.replace("\n", " ").split(". ") if s]


def _load_corpus(path: str):
    import datasets
    return datasets.Dataset.from_dict({"text": SENTENCES})


DATASETS.setdefault("ftd_corpus", DatasetConfig(path="ftd.examples.corpus", loader=_load_corpus,
                                                sample_processor=lambda sample: sample["text"]))


class CorpusTokenizer(BaseTokenizer):
    """One token per character of the corpus, plus BOS and EOS."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, *, tokenizer_path: str = ""):
        super().__init__()
        self.bos_id, self.eos_id = len(corpus.VOCAB), len(corpus.VOCAB) + 1

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [self.bos_id] * add_bos + corpus.encode(text) + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        return "".join(corpus.VOCAB[i] for i in ids if i < len(corpus.VOCAB))

    def get_vocab_size(self) -> int:
        return len(corpus.VOCAB) + 2


class DropoutAttention(ScaledDotProductAttention):
    """Causal SDPA with dropout on the attention weights while training: a model that draws random
    numbers every step (torchtitan's llama3 draws none after its initialisation)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ScaledDotProductAttention.Config):
        dropout_p: float = 0.1

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.dropout_p = config.dropout_p

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, scale=None, enable_gqa=False,
                is_causal=True, **kwargs):
        if attention_masks is not None:
            raise ValueError("DropoutAttention does not take attention_masks (causal attention only)")
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


class LossFile(MetricsProcessor):
    """torchtitan's metrics, plus every step's loss as "step float.hex()" in a file (and a crash switch)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        crash_rank: int = -1
        """In the job's first attempt, this rank SIGKILLs itself ..."""
        crash_at: int = -1
        """... right after logging this step (before the checkpoint manager's save)."""

    def __init__(self, config: Config, *, dump_folder: str = "./outputs", **kwargs):
        super().__init__(config, dump_folder=dump_folder, **kwargs)
        self.out = Path(dump_folder)
        self.out.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict | None = None):
        rank = dist.get_rank()
        for name, value in (("losses", global_avg_loss), ("gradnorm", grad_norm)):
            with open(self.out / f"{name}-rank{rank}.txt", "a") as f:
                f.write(f"{step} {float(value).hex()}\n")
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and rank == self.config.crash_rank and step == self.config.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def llama3_tiny(attention: ScaledDotProductAttention.Config | None = None) -> Trainer.Config:
    """The reference: no checkpoints."""
    config = llama3_debugmodel()
    model = config.model_spec.model
    model.layers = model.layers[:2]
    for layer in model.layers:
        layer.attention.inner_attention = attention or ScaledDotProductAttention.Config()
    config.tokenizer = CorpusTokenizer.Config()
    config.dataloader.dataset = "ftd_corpus"
    config.metrics = LossFile.Config(log_freq=1)
    config.training.seq_len = 64
    config.training.local_batch_size = 2
    config.training.steps = 10
    config.training.disable_cuda_graphs = True
    config.lr_scheduler.warmup_steps = 2
    config.validator.enable = False
    config.debug.seed = 1234  # without a seed torchtitan draws one: each run would start from other weights
    config.parallelism.spmd_backend = "partial_dtensor"  # plain FSDP2 (fully_shard on DTensor shards)
    config.checkpoint = CheckpointManager.Config(enable=False)
    config.dump_folder = "./outputs/titan-tiny"
    return config


def llama3_tiny_ftd() -> Trainer.Config:
    """The same job, snapshotted into ftd every step."""
    config = llama3_tiny()
    config.checkpoint = FtdCheckpointManager.Config()
    return config


def llama3_tiny_dcp() -> Trainer.Config:
    """The same job with torchtitan's own resume: a full DCP checkpoint every step."""
    config = llama3_tiny()
    config.checkpoint = CheckpointManager.Config(enable=True, interval=1, last_save_model_only=False,
                                                 keep_latest_k=0)
    return config


def llama3_tiny_dropout() -> Trainer.Config:
    """The reference, with dropout 0.1 on the attention weights."""
    return llama3_tiny(DropoutAttention.Config())


def llama3_tiny_dropout_ftd() -> Trainer.Config:
    config = llama3_tiny_dropout()
    config.checkpoint = FtdCheckpointManager.Config()
    return config


def llama3_tiny_dropout_dcp() -> Trainer.Config:
    config = llama3_tiny_dropout()
    config.checkpoint = llama3_tiny_dcp().checkpoint
    return config
