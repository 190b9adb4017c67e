"""Progress bars for the online stages: rollouts done out of rollouts planned.

Lightning's training bar counts the batches of an epoch, and an online stage's epoch is one pass
over the prompts while ``max_steps`` counts optimizer steps: the stock bar read "Epoch 0/-2 ━━
28/79" (``max_epochs`` is -1 when ``max_steps`` ends the run), and "29/-6" after a resume. Here
the unit is the rollout: "Rollouts 28/240", with the count kept across a resume (the stage's
``rollouts``, saved in its checkpoints).

A rollout takes ``optimizer_steps_per_rollout()`` of the steps ``max_steps`` counts (PPO: epochs x
minibatches), so the rollouts planned are those done plus the steps left over that; PPO's
``target_kl`` can end a rollout's updates early, and the total is recomputed at every rollout.
The online stages turn Lightning's own bar into these (``count_rollouts``, at ``setup``); a bar of
the user's own class is left as it is.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

DESCRIPTION = "Rollouts"


def planned_rollouts(trainer: L.Trainer, module: Any) -> float:
    """The rollouts the run will have taken when it stops: by ``max_steps`` (each rollout takes
    ``module.optimizer_steps_per_rollout()`` optimizer steps), by ``max_epochs`` (a rollout per
    batch of prompts), whichever comes first; ``inf`` when neither bounds the run."""
    by_steps = by_epochs = math.inf
    if trainer.max_steps is not None and trainer.max_steps > 0:
        left = max(trainer.max_steps - trainer.global_step, 0)
        by_steps = module.rollouts + math.ceil(left / module.optimizer_steps_per_rollout())
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(trainer.num_training_batches):
        by_epochs = trainer.max_epochs * trainer.num_training_batches
    return min(by_steps, by_epochs)


class RolloutRichProgressBar(RichProgressBar):
    """Lightning's rich bar, counting rollouts (see the module docstring)."""

    @property
    def total_train_batches(self) -> float:
        return planned_rollouts(self.trainer, self.trainer.lightning_module)

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{DESCRIPTION:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_rollouts(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_rollouts(pl_module)

    def _show_rollouts(self, pl_module) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            total, done = self.total_train_batches, pl_module.rollouts
            self.progress.update(self.train_progress_bar_id, total=total, completed=done)
            self.refresh()


class RolloutTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting rollouts (see the module docstring)."""

    @property
    def total_train_batches(self) -> float:
        return planned_rollouts(self.trainer, self.trainer.lightning_module)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.initial = trainer.lightning_module.rollouts
        self.train_progress_bar.n = trainer.lightning_module.rollouts
        self.train_progress_bar.set_description(DESCRIPTION)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, total = self.train_progress_bar, self.total_train_batches
        bar.total = total if math.isfinite(total) else None
        if self._should_update(pl_module.rollouts, bar.total):
            bar.n = pl_module.rollouts
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also redraws the bar


def count_rollouts(bar: ProgressBar | None) -> None:
    """Make Lightning's stock ``bar`` count rollouts: it becomes its rollout-counting twin, with
    its settings (refresh rate, theme, leave) and before it starts. In place rather than a new
    callback from ``configure_callbacks``, which Lightning announces as an override on every
    run. A bar of another class (the user's own) or none is left as it is."""
    twin = {RichProgressBar: RolloutRichProgressBar, TQDMProgressBar: RolloutTQDMProgressBar}.get(type(bar))
    if twin is not None:
        bar.__class__ = twin  # a subclass that only overrides methods: the object's state fits it as it is
