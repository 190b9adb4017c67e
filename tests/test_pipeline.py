"""train.py --stage eval and --stage pipeline: figures by hand, reports on disk, the README's
commands at a small scale, and what a fresh clone says without a policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ARITH

from shraygpt_rl.cli import main
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import evaluate_policy, response_logprobs, sample_responses
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.report import _smooth, latest_run, table
from shraygpt_rl.reward_model import RewardModel

ROOT = Path(__file__).resolve().parents[1]


class LengthScorer:
    """A stand-in reward model: longer responses score higher."""

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


@pytest.fixture
def prompts():
    return PromptDataModule(**{**ARITH, "test_size": 24, "batch_size": 10})


def test_kl_and_win_rate_by_hand(prompts):
    torch.manual_seed(0)
    policy, reference = ShrayGPT(**tiny_config()), ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=reference, reward_model=LengthScorer(), max_new_tokens=6)
    ours = sample_responses(policy, prompts, max_new_tokens=6, seed=0)
    theirs = sample_responses(reference, prompts, max_new_tokens=6, seed=1)
    # KL: the mean over the policy's samples of log pi(y) - log pi_ref(y); log pi(y) is also what
    # generation recorded while sampling
    sampled = torch.cat([b.logprobs.sum(1) for b in ours.batches])
    assert torch.allclose(response_logprobs(policy, ours), sampled, atol=1e-4)
    expected_kl = (sampled - response_logprobs(reference, ours)).mean().item()
    assert report["kl_to_reference"] == pytest.approx(expected_kl, abs=1e-4)
    mine, other = torch.tensor([len(t) for t in ours.texts]), torch.tensor([len(t) for t in theirs.texts])
    wins = ((mine > other).float() + 0.5 * (mine == other).float()).mean().item()
    assert report["win_rate"] == pytest.approx(wins)
    assert report["success"] == 0.0 and report["mean_reward"] == -1.0  # a random model never answers
    assert report["prompts"] == 24 and len(report["samples"]) == 4
    assert report["samples"][0]["reference_response"] == theirs.texts[0]


def test_a_policy_against_itself_has_no_kl(prompts):
    torch.manual_seed(0)
    policy = ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=policy, max_new_tokens=6)
    assert report["kl_to_reference"] == 0.0 and report["win_rate"] is None


def test_report_helpers_by_hand(tmp_path):
    assert _smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    (tmp_path / "version_2").mkdir()
    (tmp_path / "version_10").mkdir()
    assert latest_run(tmp_path).name == "version_10"
    text = table({"SFT": {"success": 0.5, "win_rate": None}}, ("success", "win_rate"))
    assert text.splitlines()[2].split() == ["SFT", "0.500", "-"]


def _small_configs(workdir: Path) -> None:
    """configs/ as in the repository, with a few steps and small splits."""
    shutil.copytree(ROOT / "configs", workdir / "configs")
    for path in (workdir / "configs").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        if "trainer" not in config:
            continue
        online = path.stem.split("-")[0] in ("ppo", "grpo", "rloo")
        config["trainer"].update(
            max_steps=8 if online else 4,
            val_check_interval=2 if online else 4,
            limit_val_batches=1,
            enable_progress_bar=False,
        )
        config["data"].update(train_size=64, val_size=16, test_size=16, **({"batch_size": 4} if online else {}))
        path.write_text(yaml.safe_dump(config))


def test_the_pipeline_runs_every_stage_and_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _small_configs(tmp_path)
    report = main(["--stage", "pipeline", "--num_prompts", "16"])
    assert list(report["results"]) == ["SFT", "PPO", "GRPO", "DPO"]
    for name in ("shraygpt-instruct", "reward-model", "shraygpt-ppo", "shraygpt-grpo", "shraygpt-dpo"):
        assert Path(f"checkpoints/{name}.ckpt").is_file()
    saved = json.loads(Path("reports/pipeline.json").read_text())
    assert 0 <= saved["reward_model_accuracy"] <= 1 and saved["results"]["SFT"]["kl_to_reference"] == 0.0
    for policy in ("PPO", "GRPO", "DPO"):
        row = saved["results"][policy]
        assert row["kl_to_reference"] is not None and 0 <= row["win_rate"] <= 1 and row["prompts"] == 16
    assert Path("reports/pipeline.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "[5/5] DPO" in printed and "reward model pairwise accuracy" in printed

    # The README's evaluation command on what the pipeline made.
    main(
        [
            "--stage",
            "eval",
            "--policy",
            "checkpoints/shraygpt-ppo.ckpt",
            "--reference",
            "checkpoints/shraygpt-instruct.ckpt",
            "--reward_model",
            "checkpoints/reward-model.ckpt",
            "--logs",
            "[logs/ppo]",
            "--num_prompts",
            "16",
            "--out",
            "reports/ppo",
        ]
    )
    saved = json.loads(Path("reports/ppo.json").read_text())
    assert set(saved["results"]) == {"reference", "policy"} and saved["results"]["policy"]["win_rate"] is not None
    assert Path("reports/ppo.png").is_file()


def test_ppo_on_a_fresh_clone_names_the_command_that_makes_its_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    with pytest.raises(SystemExit) as err:
        main(["--stage", "ppo"])  # reads configs/ppo.yaml
    assert str(err.value) == (
        "error: No checkpoint file at 'checkpoints/shraygpt-instruct.ckpt'; `python train.py --stage sft` writes it."
    )


def test_course_user_commands_on_hh_rlhf(tmp_path, monkeypatch, hh_sample, r50k_file):
    """configs/reward-hh.yaml, ppo-hh.yaml and dpo-hh.yaml, offline, with a small r50k model
    standing in for the course checkpoint, a few steps each, in bf16 autocast as on a GPU."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    Path("checkpoints").mkdir()
    ShrayGPT(**tiny_config(vocab_size=50257, block_size=256)).save_checkpoint("checkpoints/shraygpt-instruct.ckpt")
    offline = [
        "--data.source",
        str(hh_sample),
        "--data.tokenizer_path",
        str(r50k_file),
        "--data.max_length",
        "160",
        "--data.max_prompt_length",
        "128",
        "--data.train_size",
        "32",
        "--data.val_size",
        "8",
        "--data.test_size",
        "8",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.precision",
        "bf16-mixed",
        "--data.batch_size",
        "4",
        "--trainer.enable_progress_bar",
        "false",
    ]
    offline_pairs = [
        *offline,
        "--trainer.max_steps",
        "2",
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.val_check_interval",
        "2",
    ]
    main(["--stage", "reward", "--config", str(ROOT / "configs/reward-hh.yaml"), *offline_pairs])
    main(
        [
            "--stage",
            "ppo",
            "--config",
            str(ROOT / "configs/ppo-hh.yaml"),
            *offline,
            "--model.max_new_tokens",
            "16",
            "--model.micro_batch_size",
            "2",
            "--model.num_mini_batches",
            "2",
            "--trainer.max_steps",
            "8",
            "--trainer.val_check_interval",
            "1",
        ]
    )
    main(["--stage", "dpo", "--config", str(ROOT / "configs/dpo-hh.yaml"), *offline_pairs])
    for name in ("shraygpt-ppo", "shraygpt-dpo"):
        assert ShrayGPT.load_from_checkpoint(f"checkpoints/{name}.ckpt").vocab_size == 50257
    assert RewardModel.load_from_checkpoint("checkpoints/reward-model.ckpt").tokenizer == "r50k_base"
