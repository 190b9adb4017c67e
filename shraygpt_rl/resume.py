"""A run's Lightning checkpoints: how they are written, when, and which one a run resumes from.

* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file in the same folder, fsyncs
  it and renames it into place, so a full disk or a crash never leaves a truncated file; a failed
  write stops the run with one sentence instead of passing in silence.
* ``StepCheckpoint`` keeps one ``last.ckpt`` per stage, replaced in place (no ``last-v1.ckpt``):
  written at the first optimizer step at or past each multiple of ``every`` (PPO takes several
  optimizer steps per batch, so a plain ``step % every`` would skip most multiples), at the end
  of training, and when Ctrl-C or SIGTERM stops the run.
* ``resolve_ckpt_path`` turns ``--ckpt_path last`` into the newest checkpoint that can be read,
  skipping (with a warning) any it cannot, and checks an explicit path before Lightning sees it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from shraygpt_rl.checkpoint import atomic_save, read_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        atomic_save(checkpoint, path)


class StepCheckpoint(Checkpoint):
    """``last.ckpt`` in ``dirpath`` every ``every`` optimizer steps, at the end, and on interrupt.

    Built on Lightning's public ``Checkpoint`` callback and ``trainer.save_checkpoint`` only
    (``ModelCheckpoint``'s private methods change between releases). Being a ``Checkpoint``, it
    stops the Trainer from adding its default ``ModelCheckpoint``, and ``trainer.checkpoint_callbacks``
    lists it.

    Args:
        dirpath: The stage's checkpoint folder (``checkpoints/<stage>``).
        every: Optimizer steps between checkpoints; 0 saves only at the end and on interrupt.
    """

    def __init__(self, dirpath: str | os.PathLike, every: int = 100):
        self.dirpath, self.every = Path(dirpath), every
        self.saved_step = -1  # the optimizer step of the last checkpoint written

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved_step = trainer.global_step  # a resumed run has written its own step already
        last = self.path
        if last.is_file() and trainer.ckpt_path is None:
            log.warning(
                "%s is a previous run's; this run replaces it (pass --ckpt_path last to resume instead)", self.path
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step // self.every > self.saved_step // self.every:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Ctrl-C or SIGTERM: save what the run has done before it stops. Under DDP every rank
        would have to take part, so there the periodic checkpoints are what survives."""
        if isinstance(exception, KeyboardInterrupt | SIGTERMException) and trainer.world_size == 1:
            self.save(trainer)
            if trainer.global_step:
                log.warning("stopped at step %d; resume with --ckpt_path last", trainer.global_step)

    def save(self, trainer) -> None:
        """Write ``last.ckpt`` unless this step's is written already or the run is a dry run."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == self.saved_step:
            return
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes on rank 0
        self.saved_step = trainer.global_step


def resolve_ckpt_path(ckpt_path: str | None, folder: str | os.PathLike | None) -> str | None:
    """The checkpoint a run resumes from: ``None`` (a fresh run), a checked explicit path, or for
    ``last`` the newest readable ``*.ckpt`` in the stage's ``folder`` (None when there is none)."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        read_checkpoint(ckpt_path)  # one sentence if it is missing, unreadable or unsafe
        return ckpt_path
    candidates = sorted(Path(folder).glob("*.ckpt"), key=os.path.getmtime, reverse=True) if folder else []
    for candidate in candidates:
        try:
            torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # truncated, corrupt or unsafe: never resume from it
            log.warning("skipping %s, which cannot be read (%s)", candidate, type(err).__name__)
            continue
        return str(candidate)
    log.warning("--ckpt_path last: no readable checkpoint in %s; starting a fresh run", folder)
    return None
