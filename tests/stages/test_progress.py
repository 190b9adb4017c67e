"""The online stages' progress bar counts rollouts out of rollouts planned, across a resume, for
Lightning's rich and tqdm bars; a bar of the user's own class is left alone."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import ARITH, SpreadReward, tiny_trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.stages.grpo import GRPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.progress import RolloutRichProgressBar, RolloutTQDMProgressBar, planned_rollouts

PROMPTS = dict(ARITH, batch_size=4, train_size=64)


def _ppo(policy: str) -> PPOStage:
    """Two optimizer steps per rollout (2 epochs x 1 minibatch)."""
    return PPOStage(
        policy=policy, rewards=[SpreadReward()], max_new_tokens=4, num_ppo_epochs=2, num_mini_batches=1,
        optimizer="adamw", export_path=None, log_samples_every=0,
    )  # fmt: skip


def _shown(bar) -> tuple[float, float, str]:
    """(done, total, description) of the bar's training line."""
    if isinstance(bar, TQDMProgressBar):
        line = bar.train_progress_bar
        return line.n, line.total, line.desc
    task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    return task.completed, task.total, task.description


class Seen(L.Callback):
    """What the bar shows at the start of each batch (after the previous batch's update)."""

    def __init__(self):
        self.shown = []

    def on_train_batch_start(self, trainer, *args):
        self.shown.append(_shown(trainer.progress_bar_callback))


@pytest.mark.parametrize(
    ("stock", "twin"), [(TQDMProgressBar, RolloutTQDMProgressBar), (RichProgressBar, RolloutRichProgressBar)]
)
def test_the_bar_counts_rollouts_out_of_rollouts_planned_across_a_resume(random_policy, tmp_path, stock, twin):
    """8 optimizer steps of 2 per rollout: 4 rollouts, whatever the prompts' epochs (16 batches
    each). Lightning's own bar read "Epoch 0/-2 ... 2/16", and after a resume "3/-6"."""
    stage, seen = _ppo(random_policy), Seen()
    trainer = tiny_trainer(4, enable_progress_bar=True, callbacks=[stock(), seen], limit_val_batches=0)
    trainer.fit(stage, datamodule=PromptDataModule(**PROMPTS))
    bar = trainer.progress_bar_callback
    assert type(bar) is twin
    assert [s[:2] for s in seen.shown] == [(0, 2), (1, 2)] and _shown(bar)[:2] == (2, 2)
    assert _shown(bar)[2].strip(" :") == "Rollouts"
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    stage, seen = _ppo(random_policy), Seen()
    trainer = tiny_trainer(8, enable_progress_bar=True, callbacks=[stock(), seen], limit_val_batches=0)
    trainer.fit(stage, datamodule=PromptDataModule(**PROMPTS), ckpt_path=tmp_path / "half.ckpt")
    assert [s[:2] for s in seen.shown] == [(2, 4), (3, 4)] and _shown(trainer.progress_bar_callback)[:2] == (4, 4)


def test_a_bar_of_the_users_own_class_is_left_alone(random_policy):
    class Mine(TQDMProgressBar):
        pass

    stage = GRPOStage(policy=random_policy, rewards=[SpreadReward()], max_new_tokens=4, export_path=None)
    trainer = tiny_trainer(1, enable_progress_bar=True, callbacks=[Mine()], limit_val_batches=0)
    trainer.fit(stage, datamodule=PromptDataModule(**PROMPTS))
    assert type(trainer.progress_bar_callback) is Mine
    quiet = tiny_trainer(1, limit_val_batches=0)  # no bar asked for: none added
    quiet.fit(
        GRPOStage(policy=random_policy, max_new_tokens=4, export_path=None), datamodule=PromptDataModule(**PROMPTS)
    )
    assert quiet.progress_bar_callback is None


def test_planned_rollouts_by_steps_and_by_epochs():
    class Run:  # what planned_rollouts reads of a trainer and a stage
        def __init__(self, max_steps, max_epochs, global_step=0, batches=16, rollouts=0, per=2):
            self.max_steps, self.max_epochs, self.global_step = max_steps, max_epochs, global_step
            self.num_training_batches, self.rollouts = batches, rollouts
            self.optimizer_steps_per_rollout = lambda: per

    assert planned_rollouts(*[Run(8, -1)] * 2) == 4
    assert planned_rollouts(*[Run(9, -1)] * 2) == 5  # a last rollout that max_steps cuts short
    assert planned_rollouts(*[Run(8, -1, global_step=5, rollouts=3)] * 2) == 5  # PPO stopped early once
    assert planned_rollouts(*[Run(-1, 2)] * 2) == 32  # two epochs of 16 batches of prompts
    assert planned_rollouts(*[Run(100, 1)] * 2) == 16
    assert planned_rollouts(*[Run(-1, -1)] * 2) == float("inf")
