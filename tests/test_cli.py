"""train.py: every config parses, overrides work, bad input fails in one sentence, runs resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import fails

from shraygpt_rl.checkpoint import stamped
from shraygpt_rl.cli import main, split_stage
from shraygpt_rl.resume import resolve_ckpt_path
from shraygpt_rl.runner import STAGES, build_cli, stage_of

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FAST = (
    "--data.train_size 128 --data.val_size 32 --data.test_size 32 --data.batch_size 16 --data.system_prompt null "
    "--data.max_length 64 --data.max_prompt_length 48 --model.optimizer adamw --trainer.limit_val_batches 1 "
    "--trainer.enable_progress_bar false --trainer.enable_model_summary false"
).split()
ONLINE = "--model.max_new_tokens 4 --data.batch_size 4".split()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stage_of(config: Path) -> str:
    """The stage a config is for (``runner.stage_of``), or ``pipeline``."""
    return "pipeline" if "pipeline" in config.stem.split("-") else stage_of(config)


def test_there_is_a_config_per_stage():
    assert {_stage_of(c) for c in CONFIGS} >= set(STAGES)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--stage", _stage_of(config), "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        for key, value in (given.get(section) or {}).items():
            assert _contains(printed[section][key], value), f"{config.name}: {section}.{key}"


def _contains(printed, given) -> bool:
    """``given`` as written, allowing the defaults the CLI fills in (``init_args`` of classes)."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(k in printed and _contains(printed[k], v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(printed, list) and len(printed) == len(given) and all(map(_contains, printed, given))
    return printed == given


def test_overrides_reach_the_module(workdir, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "--stage",
                "dpo",
                "--config",
                str(ROOT / "configs/dpo.yaml"),
                *"--model.beta 0.05".split(),
                *"--trainer.max_steps 50 --print_config".split(),
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["beta"] == 0.05 and printed["trainer"]["max_steps"] == 50
    assert printed["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")


def test_stage_flag_is_required_and_checked(capsys):
    assert split_stage(["--config", "x.yaml", "--stage=reward"]) == ("reward", ["--config", "x.yaml"])
    assert fails(capsys, []).startswith("--stage is required")
    assert fails(capsys, ["--stage", "rlhf"]).startswith("Unknown stage 'rlhf'")


def test_missing_checkpoint_is_one_sentence(workdir, capsys):
    message = fails(capsys, ["--stage", "dpo", "--model.policy", "nope.ckpt", *FAST])
    assert message == "No checkpoint file at 'nope.ckpt'; check the path or train the stage that writes it."


def test_reward_checkpoint_given_as_a_policy(workdir, capsys):
    main(["--stage", "reward", "--trainer.max_steps", "1", *FAST])
    message = fails(capsys, ["--stage", "dpo", "--model.policy", "checkpoints/reward-model.ckpt", *FAST])
    assert "is a reward-model checkpoint, not a policy" in message


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:
            raise RuntimeError("killed")


class FirstStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        if hasattr(pl_module, "kl_ctl"):
            self.state = (pl_module.rollouts, pl_module.kl_ctl.value)


def test_killed_run_resumes_from_last_at_the_right_step(workdir):
    args = ["--stage", "sft", "--trainer.max_steps", "12", "--checkpoint_every", "5", *FAST]
    stage, rest = split_stage(args)
    cli = build_cli(stage, rest)
    cli.trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.load("checkpoints/sft/last.ckpt", weights_only=True)["global_step"] == 5

    cli = build_cli(stage, [*rest, "--ckpt_path", "last"])
    first = FirstStep()
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resolve_ckpt_path("last", f"checkpoints/{stage}"))
    assert first.step == 5 and cli.trainer.global_step == 12


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_killed_online_run_resumes_with_its_rollout_count_and_kl_coefficient(workdir, random_policy):
    """PPO, two optimizer steps per rollout: killed after 3 rollouts, resumed from step 4."""
    options = "--model.num_ppo_epochs 1 --model.num_mini_batches 2 --model.adaptive_kl true --model.kl_horizon 10"
    steps = "--trainer.max_steps 8 --trainer.val_check_interval 4 --checkpoint_every 4"
    args = ["--stage", "ppo", *FAST, *ONLINE, "--model.policy", random_policy, *options.split(), *steps.split()]
    stage, rest = split_stage(args)
    cli = build_cli(stage, rest)
    cli.trainer.callbacks.append(CrashAt(6))
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = torch.load("checkpoints/ppo/last.ckpt", weights_only=True)
    state = stamped(saved)
    assert saved["global_step"] == 4 and state["rollouts"] == 2 and state["kl_coef"] != 0.05

    cli = build_cli(stage, [*rest, "--ckpt_path", "last"])
    first = FirstStep()
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resolve_ckpt_path("last", f"checkpoints/{stage}"))
    assert first.step == 4 and first.state == (2, state["kl_coef"])
    assert cli.trainer.global_step == 8 and cli.model.rollouts == 4


def test_a_run_writes_tensorboard_logs_and_checkpoints(workdir):
    main(["--stage", "sft", "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", *FAST])
    events = list(Path("logs/sft").rglob("events.out.tfevents*"))
    assert (
        events and Path("checkpoints/sft/last.ckpt").is_file() and Path("checkpoints/shraygpt-instruct.ckpt").is_file()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "moe/aux_loss", "moe/load_max", "moe/router_entropy"} <= set(tags)
    assert any(t.startswith("lr-") for t in tags)
    assert os.path.getsize(Path("checkpoints/shraygpt-instruct.ckpt")) > 0


def test_ppo_on_a_fresh_clone_names_the_command_that_makes_its_policy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    assert fails(capsys, ["--stage", "ppo"]) == (  # reads configs/ppo.yaml
        "No checkpoint file at 'checkpoints/demo/shraygpt-instruct.ckpt'; `python train.py --stage sft` writes it."
    )


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_runs_log_every_namespace_to_tensorboard(workdir, random_policy, stage):
    steps = "--trainer.max_steps 2 --trainer.log_every_n_steps 1 --trainer.val_check_interval 1"
    main(
        [
            "--stage",
            stage,
            *FAST,
            *ONLINE,
            "--model.policy",
            random_policy,
            "--model.log_samples_every",
            "1",
            *steps.split(),
        ]
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(f"logs/{stage}").rglob("events.out.tfevents*")).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    wanted = set(
        "reward/mean reward/std reward/task_verifier objective/entropy objective/rlhf_reward policy/clipfrac "
        "policy/approxkl policy/ratio_at_start policy/loss completions/mean_length completions/truncated_fraction "
        "moe/aux_loss moe/load_max perf/generation_tokens_per_s perf/update_tokens_per_s perf/generation_fraction "
        "val/success val/reward/mean".split()
    )
    if stage == "ppo":
        wanted |= {"objective/kl", "value/loss", "value/clipfrac", "value/explained_variance"}
    else:
        wanted |= {"reward/frac_reward_zero_std"}
    assert wanted <= tags, wanted - tags
    assert "samples" in " ".join(events.Tags()["tensors"])


# Documented options that build an object of their own (a DataModule, a reward model, adapters, a
# reward function, an environment): each goes through train.py as a user types it, because the
# CLI passes the objects it builds more than the Python API does (issue 33: LightningCLI put
# ``_instantiator`` into the DataModule's hyper-parameters, and PPO-ptx forwarded it on).
SUB_OBJECTS = {
    "ptx": ("ppo", "--model.ptx_coef 0.1 --data.ptx_source arithmetic --data.ptx_batch_size 4", "objective/ptx_loss"),
    "reward_model": ("ppo", "--model.reward_model checkpoints/reward-model.ckpt", "reward/learned_reward"),
    "rewards": ("grpo", "--model.rewards [{class_path: shraygpt_rl.rewards.KeywordReward}]", "reward/keyword_reward"),
    "environment": (
        "grpo",
        "--model.environment {class_path: shraygpt_rl.environments.Calculator} --model.max_turns 2",
        "rollout/tool_calls",
    ),
    "lora": ("ppo", "--model.lora {r: 4, alpha: 8}", "policy/trainable_fraction"),
}


@pytest.mark.parametrize("option", list(SUB_OBJECTS))
def test_documented_options_that_build_objects_run_through_train_py(workdir, random_policy, option):
    stage, flags, metric = SUB_OBJECTS[option]
    if option == "reward_model":
        main(["--stage", "reward", "--trainer.max_steps", "1", *FAST])
    words = [w for part in flags.split(" --") for w in _flag(part)]
    steps = "--trainer.max_steps 2 --trainer.log_every_n_steps 1 --trainer.val_check_interval 2"
    cli = main(["--stage", stage, *FAST, *ONLINE, "--model.policy", random_policy, *steps.split(), *words])
    assert cli.trainer.global_step >= 2  # PPO takes whole rollouts of several steps
    logged = set(cli.trainer.callback_metrics) | set(cli.trainer.logged_metrics)
    events = Path(cli.trainer.logger.log_dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert metric in logged, sorted(logged)


def _flag(part: str) -> list[str]:
    """``--name value with spaces`` as two argv words (a YAML value may hold spaces)."""
    name, _, value = part.removeprefix("--").partition(" ")
    return [f"--{name}", value]
