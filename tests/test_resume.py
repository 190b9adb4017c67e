"""Checkpoints: atomic writes that fail loudly, resuming past a broken file, a save on SIGTERM,
the interval counted in optimizer steps, and one ``last.ckpt`` per stage."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fails
from lightning.pytorch.utilities.exceptions import SIGTERMException

from shraygpt_rl import checkpoint
from shraygpt_rl import cli as cli_module
from shraygpt_rl.cli import main
from shraygpt_rl.errors import CheckpointError
from shraygpt_rl.resume import resolve_ckpt_path
from shraygpt_rl.runner import run_stage

FAST = "--data.train_size 64 --data.val_size 8 --data.test_size 8 --data.batch_size 16 --data.system_prompt null "
FAST += "--data.max_length 64 --data.max_prompt_length 48 --model.optimizer adamw --trainer.limit_val_batches 1 "
FAST += "--trainer.enable_progress_bar false --trainer.enable_model_summary false"
ONLINE = "--model.max_new_tokens 4 --data.batch_size 4 --trainer.limit_val_batches 0"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _full_disk(monkeypatch):
    """torch.save raises ENOSPC after writing part of the file, as a full disk does."""

    def save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save)


def test_a_full_disk_leaves_no_file_behind_and_says_so(workdir, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(CheckpointError, match=r"Could not write the checkpoint 'out.ckpt' \(No space left on device\)"):
        checkpoint.atomic_save({"a": 1}, "out.ckpt")
    assert os.listdir(workdir) == []  # neither the file nor its temporary


def test_a_full_disk_while_exporting_keeps_the_previous_export(workdir, monkeypatch, capsys):
    main(["--stage", "sft", *FAST.split(), "--trainer.max_steps", "2"])
    before = Path("checkpoints/shraygpt-instruct.ckpt").read_bytes()
    _full_disk(monkeypatch)
    argv = ["--stage", "sft", *FAST.split(), "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false"]
    assert fails(capsys, argv) == (
        "Could not write the checkpoint 'checkpoints/shraygpt-instruct.ckpt' (No space left on device); "
        "nothing was saved there."
    )
    assert Path("checkpoints/shraygpt-instruct.ckpt").read_bytes() == before
    assert not list(Path("checkpoints").rglob("*.tmp"))


def test_a_full_disk_while_checkpointing_stops_the_run_in_one_sentence(workdir, monkeypatch, capsys):
    _full_disk(monkeypatch)
    message = fails(capsys, ["--stage", "sft", *FAST.split(), "--trainer.max_steps", "4", "--checkpoint_every", "2"])
    assert message.startswith("Could not write the checkpoint '") and message.endswith(
        "checkpoints/sft/last.ckpt' (No space left on device); nothing was saved there."
    )
    assert not Path("checkpoints/sft/last.ckpt").exists() and not list(Path("checkpoints").rglob("*.tmp"))


def test_last_skips_a_truncated_checkpoint_and_resumes_from_an_older_one(workdir, caplog):
    main(["--stage", "sft", *FAST.split(), "--trainer.max_steps", "6", "--checkpoint_every", "3"])
    folder = Path("checkpoints/sft")
    older, last = folder / "older.ckpt", folder / "last.ckpt"
    older.write_bytes(last.read_bytes())  # the run's checkpoint at step 6
    os.utime(older, (1, 1))
    last.write_bytes(last.read_bytes()[:1000])  # then a newer one, cut off half-way by a non-atomic writer
    assert resolve_ckpt_path("last", folder) == str(older)
    assert "skipping checkpoints/sft/last.ckpt, which cannot be read" in caplog.text
    # Resuming from what resolve_ckpt_path picks: test_killed_run_resumes_from_last_at_the_right_step.


def test_a_bad_ckpt_path_is_one_sentence(workdir, capsys):
    Path("truncated.ckpt").write_bytes(b"\x80\x02}q")
    argv = ["--stage", "sft", *FAST.split(), "--trainer.max_steps", "1"]
    assert fails(capsys, [*argv, "--ckpt_path", "missing.ckpt"]).startswith("No checkpoint file at 'missing.ckpt'")
    message = fails(capsys, [*argv, "--ckpt_path", "truncated.ckpt"])
    assert message.startswith("'truncated.ckpt' is not a readable PyTorch checkpoint")


def test_an_unsafe_pickle_is_refused_and_never_runs(workdir, capsys):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"state_dict": {}, "x": Boom()}, "evil.ckpt")
    message = fails(capsys, ["--stage", "sft", *FAST.split(), "--ckpt_path", "evil.ckpt"])
    assert "is not a readable PyTorch checkpoint" in message and not Path("pwned").exists()


class Terminate(L.Callback):
    """Send this process SIGTERM once the run has reached ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_to_resume_from(workdir):
    """Lightning turns SIGTERM into an exception at the next batch; the run saves before it stops."""
    argv = [*FAST.split(), "--trainer.max_steps", "50", "--checkpoint_every", "100"]
    with pytest.raises(SIGTERMException):
        run_stage("sft", argv, callbacks=[Terminate(7)])
    assert torch.load("checkpoints/sft/last.ckpt", weights_only=True)["global_step"] == 7
    assert not Path("checkpoints/shraygpt-instruct.ckpt").exists()  # not trained to the end: no export
    # Resuming from last.ckpt at its step: test_killed_run_resumes_from_last_at_the_right_step.


def test_train_py_reports_a_sigterm_stop_with_its_exit_code(monkeypatch, capsys):
    def stopped(*args, **kwargs):
        raise SIGTERMException

    monkeypatch.setattr(cli_module, "run_stage", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["--stage", "sft"])
    assert exit_.value.code == 143 and "stopped by SIGTERM; resume with --ckpt_path last" in capsys.readouterr().err


class Saves(L.Callback):
    """The optimizer steps at which ``StepCheckpoint`` wrote ``last.ckpt``."""

    def __init__(self):
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, ckpt):
        self.steps.append(trainer.global_step)


def test_the_interval_counts_optimizer_steps_whatever_each_batch_takes(workdir, random_policy):
    """PPO with two epochs of two minibatches: four optimizer steps per batch. Every 6 steps means
    the first step at or past 6, 12 and 18 (8, 12 and 20), and the end (24)."""
    saves = Saves()
    options = "--model.num_ppo_epochs 2 --model.num_mini_batches 2 --trainer.max_steps 24 --checkpoint_every 6"
    run_stage("ppo", [*FAST.split(), *ONLINE.split(), "--model.policy", random_policy, *options.split()], [saves])
    assert saves.steps == [8, 12, 20, 24]


def test_a_rerun_replaces_last_ckpt_instead_of_piling_up_versions(workdir, caplog):
    for _ in range(3):
        main(["--stage", "sft", *FAST.split(), "--trainer.max_steps", "2"])
    assert sorted(p.name for p in Path("checkpoints/sft").iterdir()) == ["last.ckpt"]
    assert "is a previous run's; this run replaces it (pass --ckpt_path last to resume instead)" in caplog.text
