"""SFT stage: held-out loss goes down, the export is a course checkpoint, bad runs fail clearly."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ARITH, PoisonGradient, tiny_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from shraygpt_rl.checkpoint import CheckpointError
from shraygpt_rl.data import SFTDataModule
from shraygpt_rl.errors import TrainingError
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages.sft import SFTStage


def _stage(tmp_path, **kwargs):
    return SFTStage(export_path=str(tmp_path / "sft.ckpt"), optimizer="adamw", lr=3e-3, **kwargs)


def test_sft_lowers_held_out_loss_and_exports_a_course_checkpoint(tmp_path):
    stage, data = _stage(tmp_path), SFTDataModule(train_size=512, **ARITH)
    trainer = tiny_trainer(40, limit_val_batches=2)
    before = trainer.validate(stage, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(stage, datamodule=data)
    after = trainer.validate(stage, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < 0.6 * before
    exported = ShrayGPT.load_from_checkpoint(tmp_path / "sft.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), stage.policy.state_dict().values()))


class PositionalLogits(torch.nn.Module):
    """A stand-in policy whose logits depend on the position only, not on the tokens: changing a
    token then changes the loss only through that token's part as a target."""

    def __init__(self, length: int, vocab: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(length, vocab))

    def forward(self, idx, attention_mask=None):
        B, T = idx.shape
        return self.logits[:T].expand(B, T, -1), None, torch.zeros(())


def test_only_the_assistants_tokens_are_targets(tmp_path):
    stage = _stage(tmp_path)
    batch = next(iter(SFTDataModule(**ARITH).val_dataloader()))
    stage.policy = PositionalLogits(batch["input_ids"].size(1), vocab=320)
    loss = stage.loss(batch)[0]

    def shifted(where: torch.Tensor) -> dict:  # every token at ``where`` replaced by another byte
        ids = batch["input_ids"].clone()
        ids[where] = (ids[where] + torch.randint(1, 256, ids[where].shape)) % 256
        return {**batch, "input_ids": ids}

    answer = batch["loss_mask"].bool()
    assert (~answer).any() and answer.any()
    assert torch.equal(stage.loss(shifted(~answer))[0], loss)  # prompt and padding: not targets
    assert not torch.isclose(stage.loss(shifted(answer))[0], loss)  # the answer's tokens are


def test_non_finite_loss_skips_the_update(tmp_path, monkeypatch):
    stage, data = _stage(tmp_path), SFTDataModule(train_size=256, **ARITH)
    real_loss = stage.loss
    calls = {"n": 0}
    snapshots = []

    def flaky(batch):
        calls["n"] += 1
        nll, aux, logits = real_loss(batch)
        if calls["n"] == 3:
            snapshots.append({k: v.clone() for k, v in stage.policy.state_dict().items()})
            return nll * float("nan"), aux, logits
        if calls["n"] == 4:
            snapshots.append({k: v.clone() for k, v in stage.policy.state_dict().items()})
        return nll, aux, logits

    monkeypatch.setattr(stage, "loss", flaky)
    trainer = tiny_trainer(6, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    assert stage.nonfinite_skipped == 1 and calls["n"] == 6  # training went on after the NaN
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in stage.policy.parameters())


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_update(tmp_path):
    """The guard checks the gradients too (issue 33: ORPO's loss was finite where its gradient
    was NaN): the update is dropped, counted, and training goes on with finite weights."""
    poison = PoisonGradient(step=2)
    stage, data = _stage(tmp_path), SFTDataModule(train_size=256, **ARITH)
    trainer = tiny_trainer(5, limit_val_batches=0, callbacks=[poison])
    trainer.fit(stage, datamodule=data)
    assert stage.nonfinite_skipped == 1 and trainer.global_step == 5
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before)  # the step changed nothing
    assert all(torch.isfinite(p).all() for p in stage.policy.parameters())


def test_under_fp16_the_grad_scaler_owns_overflowing_gradients(tmp_path):
    """``16-mixed``: an inf or NaN gradient is how GradScaler finds its scale; it skips that step
    itself. The guard must not count it (nor clear the gradients under the scaler's feet)."""
    poison = PoisonGradient(step=2)
    stage, data = _stage(tmp_path), SFTDataModule(train_size=256, **ARITH)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # what a GPU's 16-mixed sets up
    trainer = tiny_trainer(4, limit_val_batches=0, callbacks=[poison], plugins=[fp16])
    trainer.fit(stage, datamodule=data)
    assert stage.nonfinite_skipped == 0 and trainer.global_step == 4
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before)  # the scaler skipped it
    assert all(torch.isfinite(p).all() for p in stage.policy.parameters())


def test_with_gradient_accumulation_a_dropped_micro_batch_is_not_a_dropped_update(tmp_path, monkeypatch):
    """The first micro-batch of every update is NaN, the second is not: each update still applies
    the second's gradient, so no run of skipped updates builds up to ``max_nonfinite`` (review of
    issue 33: the counter was reset only when no micro-batch had been dropped)."""
    stage, data = _stage(tmp_path, max_nonfinite=3), SFTDataModule(train_size=256, **ARITH)
    real_loss, calls = stage.loss, {"n": 0}

    def every_other(batch):
        calls["n"] += 1
        nll, aux, logits = real_loss(batch)
        return (nll * float("nan") if calls["n"] % 2 else nll), aux, logits

    monkeypatch.setattr(stage, "loss", every_other)
    start = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    trainer = tiny_trainer(6, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(stage, datamodule=data)
    assert trainer.global_step == 6 and calls["n"] == 12 and stage.nonfinite_in_a_row == 0
    assert any(not torch.equal(start[k], v) for k, v in stage.policy.state_dict().items())
    assert all(torch.isfinite(p).all() for p in stage.policy.parameters())


def test_a_run_of_non_finite_losses_stops_in_one_sentence(tmp_path, monkeypatch):
    stage, data = _stage(tmp_path, max_nonfinite=4), SFTDataModule(train_size=256, **ARITH)
    real_loss = stage.loss
    monkeypatch.setattr(stage, "loss", lambda batch: (real_loss(batch)[0] * float("nan"), *real_loss(batch)[1:]))
    trainer = tiny_trainer(50, limit_val_batches=0)
    with pytest.raises(TrainingError, match="4 updates in a row had a non-finite loss or gradient"):
        trainer.fit(stage, datamodule=data)
    assert trainer.global_step == 3 and not (tmp_path / "sft.ckpt").exists()


def test_export_never_overwrites_a_course_checkpoint(tmp_path, course_ckpt):
    target = tmp_path / "shraygpt-instruct.ckpt"
    shutil.copy(course_ckpt, target)
    stage = SFTStage(export_path=str(target), optimizer="adamw")
    with pytest.raises(CheckpointError, match="was not written by shraygpt-rl"):
        tiny_trainer(2).fit(stage, datamodule=SFTDataModule(train_size=64, **ARITH))
    assert target.read_bytes() == course_ckpt.read_bytes()


def test_starting_from_the_course_checkpoint(course_ckpt, tmp_path):
    stage = SFTStage(policy=str(course_ckpt), export_path=None)
    assert stage.aux_weight(stage.policy) == 0.01  # the checkpoint's aux_loss_weight
    reference = ShrayGPT.load_from_checkpoint(course_ckpt)
    assert torch.equal(stage.policy.head.weight, reference.head.weight)
