"""Startup checks: every option out of range, every mismatch between data and model, and every
folder that cannot be written stops ``train.py`` before training, in one sentence with exit code 2.
A model with non-finite weights is never exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ARITH, fails, tiny_trainer

from shraygpt_rl.data import PromptDataModule, SFTDataModule
from shraygpt_rl.errors import ConfigError, TrainingError
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.stages import checks
from shraygpt_rl.stages.dpo import DPOStage
from shraygpt_rl.stages.grpo import GRPOStage
from shraygpt_rl.stages.kto import KTOStage
from shraygpt_rl.stages.online_dpo import OnlineDPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.reward import RewardStage
from shraygpt_rl.stages.sft import SFTStage

SMALL = "--data.train_size 32 --data.val_size 8 --data.test_size 8 --data.system_prompt null --data.max_length 64 "
SMALL += "--data.max_prompt_length 48 --trainer.max_steps 1 --trainer.enable_progress_bar false"

# (class, options, what the sentence says): one per option range the issue listed, and more. The
# constructors check them, so the tests build the objects; test_an_option_out_of_range_stops_
# train_py_in_one_sentence shows the CLI turning such an error into exit code 2.
OUT_OF_RANGE = [
    (GRPOStage, dict(num_generations=1), "num_generations must be at least 2"),
    (GRPOStage, dict(num_generations=0), "num_generations must be at least 2"),
    (GRPOStage, dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (PPOStage, dict(eval_samples=0), "eval_samples must be at least 1"),
    (PromptDataModule, dict(batch_size=0), "batch_size must be at least 1"),
    (PromptDataModule, dict(batch_size=-3), "batch_size must be at least 1"),
    (GRPOStage, dict(temperature=0), "temperature must be > 0"),
    (PPOStage, dict(temperature=-1), "temperature must be > 0"),
    (SFTStage, dict(lr=-1), "Learning rates must be >= 0"),
    (SFTDataModule, dict(max_length=64, max_prompt_length=64), "must be at least 1 and below max_length"),
    (PPOStage, dict(gamma=1.5), "gamma and lam must be in [0, 1]"),
    (DPOStage, dict(beta=0), "beta must be > 0"),
    (DPOStage, dict(label_smoothing=0.5), "label_smoothing must be in [0, 0.5)"),
    (DPOStage, dict(loss_type="simpo", label_smoothing=0.1), "label_smoothing applies to sigmoid and robust"),
    (DPOStage, dict(loss_type="simpo", simpo_gamma=-1), "simpo_gamma must be >= 0"),
    (RewardStage, dict(center_rewards_coefficient=-1), "center_rewards_coefficient must be >= 0"),
    (SFTDataModule, dict(wrong_fraction=2), "wrong_fraction must be in [0, 1]"),
    (SFTStage, dict(max_nonfinite=0), "max_nonfinite must be at least 1"),
    (OnlineDPOStage, dict(num_generations=1), "num_generations must be at least 2 to form a pair"),
    (OnlineDPOStage, dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing applies to sigmoid and robust"),
    (OnlineDPOStage, dict(rpo_alpha=-1), "rpo_alpha must be >= 0"),
    (KTOStage, dict(beta=0), "beta must be > 0"),
    (KTOStage, dict(beta=-0.1), "beta must be > 0"),
    (KTOStage, dict(desirable_weight=-1), "desirable_weight and undesirable_weight must be >= 0 and not both 0"),
    (KTOStage, dict(undesirable_weight=-0.5), "desirable_weight and undesirable_weight must be >= 0 and not both 0"),
    (KTOStage, dict(desirable_weight=0, undesirable_weight=0), "must be >= 0 and not both 0"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, random_policy):
    monkeypatch.chdir(tmp_path)
    return random_policy


def one_sentence(error: Exception) -> str:
    message = str(error)
    assert message.endswith(".") and message.count(". ") <= 1, message
    return message


@pytest.mark.parametrize(
    ("cls", "options", "says"), OUT_OF_RANGE, ids=[f"{c.__name__} {o}" for c, o, _ in OUT_OF_RANGE]
)
def test_an_option_out_of_range_is_one_sentence(random_policy, cls, options, says):
    if cls.__module__.startswith("shraygpt_rl.stages") and cls not in (SFTStage, RewardStage):
        options = dict(options, policy=random_policy)
    with pytest.raises(ConfigError) as refused:
        cls(**options)
    assert says in one_sentence(refused.value)


def test_a_rollout_that_does_not_split_into_minibatches_is_one_sentence(random_policy):
    stage = PPOStage(policy=random_policy, num_mini_batches=3, export_path=None)
    stage.check_minibatches(6)
    with pytest.raises(ConfigError) as refused:
        stage.check_minibatches(4)
    assert "does not split into num_mini_batches=3" in one_sentence(refused.value)


@pytest.mark.parametrize(
    ("flags", "says"),
    [("--model.num_generations 1", "num_generations must be at least 2"), ("--checkpoint_every -1", ">= 0")],
)
def test_an_option_out_of_range_stops_train_py_in_one_sentence(workdir, capsys, flags, says):
    """The constructors' errors (and the runner's own option, --checkpoint_every) reach the
    command line as one sentence and exit code 2 (``fails``)."""
    assert says in fails(capsys, ["--stage", "grpo", "--model.policy", workdir, *SMALL.split(), *flags.split()])


class Never(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("training started")


def _no_training(monkeypatch):
    """Make any training step fail the test: the checks must come before it."""
    monkeypatch.setattr(SFTStage, "training_step", lambda *args: Never()())


def test_a_byte_tokenizer_on_an_r50k_model_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _no_training(monkeypatch)
    ShrayGPT(**tiny_config(vocab_size=50257)).save_checkpoint("r50k.ckpt")
    message = fails(capsys, ["--stage", "sft", "--model.policy", "r50k.ckpt", *SMALL.split()])
    assert message.startswith("The model's vocabulary has 50257 tokens but the tokenizer 'shraygpt_byte' only 257")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, monkeypatch, capsys, r50k_file):
    monkeypatch.chdir(tmp_path)
    _no_training(monkeypatch)
    r50k = ["--data.tokenizer", "r50k_base", "--data.tokenizer_path", str(r50k_file)]
    assert "has 50257 tokens but the model's vocabulary has 320" in fails(
        capsys, ["--stage", "sft", *SMALL.split(), *r50k]
    )


def test_sequences_longer_than_the_block_size_are_refused(workdir, monkeypatch, capsys):
    _no_training(monkeypatch)
    message = fails(capsys, ["--stage", "sft", *SMALL.split(), "--data.max_length", "400"])
    assert message == "--data.max_length 400 exceeds the model's block_size 128; lower it to 128 or less."
    message = fails(
        capsys, ["--stage", "grpo", "--model.policy", workdir, *SMALL.split(), "--model.max_new_tokens", "100"]
    )
    assert message.startswith("--data.max_prompt_length 48 + --model.max_new_tokens 100 exceeds the model's block_size")


def test_task_verifiers_on_other_data_are_refused(workdir, capsys, hh_sample):
    source = ["--data.source", str(hh_sample), "--data.max_length", "128", "--data.max_prompt_length", "96"]
    message = fails(capsys, ["--stage", "grpo", "--model.policy", workdir, *SMALL.split(), *source])
    assert message.startswith(f"TaskVerifier needs 'task' in each prompt's metadata, which the data '{hh_sample}'")


def test_rewards_are_checked_against_the_prompts_metadata():
    data = PromptDataModule(**ARITH, train_size=8)
    keys = data.metadata_keys()
    assert {"task", "target"} <= keys and "prompt" not in keys
    from shraygpt_rl.rewards import LexicalPreferenceReward, TaskVerifier

    checks.check_rewards([TaskVerifier()], keys, "arithmetic")
    with pytest.raises(ValueError, match="LexicalPreferenceReward needs 'chosen_response'"):
        checks.check_rewards([LexicalPreferenceReward()], keys, "arithmetic")


def test_an_unwritable_folder_is_found_before_training(workdir, monkeypatch, capsys):
    """A checkpoint folder that cannot be written (simulated): one sentence at startup, no step."""
    _no_training(monkeypatch)
    real_write = Path.write_bytes

    def refuse(path, data):
        if "checkpoints" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    message = fails(capsys, ["--stage", "sft", *SMALL.split(), "--model.export_path", "out/sft.ckpt"])
    assert message.startswith("Cannot write the checkpoints in '")
    assert message.endswith("checkpoints/sft' (Permission denied); choose another.")
    message = fails(capsys, ["--stage", "sft", *SMALL.split(), "--model.export_path", "checkpoints/x/sft.ckpt"])
    assert message.startswith("Cannot write the export in 'checkpoints/x'")


def test_an_export_path_under_a_regular_file_is_found_before_training(workdir, monkeypatch, capsys):
    _no_training(monkeypatch)
    Path("a-file").write_text("not a folder")
    message = fails(capsys, ["--stage", "sft", *SMALL.split(), "--model.export_path", "a-file/sft.ckpt"])
    assert message == "Cannot write the export in 'a-file': 'a-file' is a file, not a folder."


def test_a_model_with_non_finite_weights_is_not_exported(tmp_path):
    stage = SFTStage(export_path=str(tmp_path / "sft.ckpt"), optimizer="adamw", lr=0.0)
    with torch.no_grad():
        stage.policy.layers[0].moe.gate.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite values in the model \(layers.0.moe.gate.weight\)"):
        tiny_trainer(1, limit_val_batches=0).fit(stage, datamodule=SFTDataModule(**ARITH, train_size=32))
    assert not (tmp_path / "sft.ckpt").exists()


def test_finite_check_also_probes_the_outputs():
    model = ShrayGPT(**tiny_config())
    checks.check_finite(model, "x.ckpt")
    with torch.no_grad():
        model.head.weight.fill_(3e38)  # finite weights, but the logits overflow
    with pytest.raises(TrainingError, match="its outputs on a probe batch"):
        checks.check_finite(model, "x.ckpt")
