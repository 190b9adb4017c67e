"""Every stage through the runner on tiny Hugging Face models, with and without LoRA: seed 004's
chain on OPT (sft -> reward -> ppo, grpo, rloo, dpo) and seed 001's PPO on GPT-Neo."""

from __future__ import annotations

import json

import pytest
import torch

from shraygpt_rl.hf import HFCausalLM
from shraygpt_rl.lora import AdaptersDisabled, adapters_disabled
from shraygpt_rl.policy import load_policy
from shraygpt_rl.reward_model import RewardModel
from shraygpt_rl.runner import run_stage

pytestmark = pytest.mark.slow
LORA = "{r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, v_proj]}"
SMALL = (
    "--trainer.max_steps 4 --trainer.val_check_interval 2 --trainer.limit_val_batches 1 "
    "--trainer.enable_progress_bar false --trainer.enable_model_summary false --data.batch_size 4 "
    "--data.system_prompt null --data.max_length 96 --data.max_prompt_length 64 --model.optimizer adamw "
    "--data.val_size 4 --data.test_size 4 --checkpoint_every 0"
).split()
ONLINE = ["--model.max_new_tokens", "8"]


def dolly(path, count: int = 24):
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "context": "Be brief." if i % 2 else "", "response": str(2 * i + 1)}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(stage: str, *args: str):
    return run_stage(stage, [*SMALL, *args])


def base_and_adapters_changed(policy, start: dict[str, torch.Tensor]) -> tuple[bool, bool]:
    """Whether any base weight differs from ``start`` (the base model's state dict; an adapted
    layer keeps its weight under ``base_layer``), and whether any adapter left zero."""
    state = policy.state_dict()

    def now(key: str) -> torch.Tensor:
        module, _, name = key.rpartition(".")
        return state[key] if key in state else state[f"{module}.base_layer.{name}"]

    base = any(not torch.equal(now(k), v) for k, v in start.items())
    return base, any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_seed_004_chain_on_opt(tiny_hf, tmp_path, monkeypatch, lora):
    monkeypatch.chdir(tmp_path)
    base = str(tiny_hf("opt"))
    adapter = ["--model.lora", LORA] if lora else []
    data = dolly(tmp_path / "dolly.jsonl")

    sft = run("sft", "--model.policy", base, *adapter, "--data.source", data, "--model.export_path", "out/sft")
    assert sft.datamodule.hparams.tokenizer == "hf" and sft.datamodule.hparams.tokenizer_path == base
    exported = {p.name for p in (tmp_path / "out" / "sft").iterdir()}
    assert ("adapter_model.safetensors" in exported) == lora and ("model.safetensors" in exported) != lora
    start = {k: v.clone() for k, v in load_policy(base).state_dict().items()}
    changed_base, changed_adapters = base_and_adapters_changed(sft.model.policy, start)
    assert changed_base != lora and changed_adapters == lora  # with LoRA, only adapters train

    reward = run(
        "reward",
        "--model.policy",
        "out/sft",
        *adapter,
        "--data.source",
        "arithmetic",
        "--data.train_size",
        "32",
        "--model.export_path",
        "out/rm.ckpt",
    )
    rm = RewardModel.load_from_checkpoint(tmp_path / "out" / "rm.ckpt")
    assert isinstance(rm.trunk, HFCausalLM) and (getattr(rm.trunk, "lora", None) is not None) == lora
    prompts, texts = ["User: hi\n\nAssistant:", "User: 2+2?\n\nAssistant:"], ["hello", "Answer: 4"]
    with torch.no_grad():  # the export scores as the trained stage does, and tells texts apart
        scores = rm.eval().score(prompts, texts)
        assert torch.allclose(scores, reward.model.model.eval().score(prompts, texts), atol=1e-5)
    assert scores[0] != scores[1]
    del reward

    ppo = run(
        "ppo",
        "--model.policy",
        "out/sft",
        *adapter,
        "--model.reward_model",
        "out/rm.ckpt",
        *ONLINE,
        "--data.source",
        data,
        "--model.export_path",
        "out/ppo",
    )
    metrics = ppo.trainer.callback_metrics
    assert abs(float(metrics["policy/ratio_at_start"]) - 1) < 1e-6
    names = {id(p): n for n, p in ppo.model.named_parameters()}
    optimized = [names[id(p)] for group in ppo.trainer.optimizers[0].param_groups for p in group["params"]]
    if lora:  # only adapters and the critic's value head reach the optimizer
        assert optimized and all("lora_" in n or n.startswith("critic.value_head") for n in optimized)
    else:
        assert len(optimized) == sum(p.requires_grad for p in ppo.model.parameters())
    if lora:  # the reference is the policy with its adapters off: no second copy
        assert isinstance(ppo.model.reference, AdaptersDisabled) and ppo.model.reference.policy is ppo.model.policy
        restarted = load_policy("out/sft").eval()
        ids = torch.randint(0, 256, (2, 8))
        with torch.no_grad(), adapters_disabled(ppo.model.policy):
            assert torch.allclose(ppo.model.policy(ids)[0], restarted(ids)[0], atol=1e-5)
    assert torch.allclose(
        load_policy("out/ppo").eval()(torch.arange(6)[None])[0],
        ppo.model.policy.eval()(torch.arange(6)[None])[0],
        atol=1e-5,
    )

    for stage in ("grpo", "rloo"):
        out = run(
            stage,
            "--model.policy",
            "out/sft",
            *adapter,
            *ONLINE,
            "--model.num_generations",
            "2",
            "--model.num_mini_batches",
            "2",
            "--model.reward_model",
            "out/rm.ckpt",
            "--data.source",
            data,
            "--model.export_path",
            f"out/{stage}",
        )
        metrics = out.trainer.callback_metrics  # two updates per rollout: the second is off-policy
        assert abs(float(metrics["policy/ratio_at_start"]) - 1) < 1e-6 and metrics["policy/approxkl"] > 0
    dpo = run(
        "dpo",
        "--model.policy",
        "out/sft",
        *adapter,
        "--data.source",
        "arithmetic",
        "--data.train_size",
        "32",
        "--model.export_path",
        "out/dpo",
    )
    assert torch.isfinite(dpo.trainer.callback_metrics["train/loss"])
    # The precomputed reference is the SFT policy (with LoRA, the policy with its adapters off),
    # so the first step's loss was log 2; and training moved the policy away from it.
    batch = next(iter(dpo.datamodule.plain_dataloader("train")))
    sft_policy = load_policy("out/sft").eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.model.reference_logps(batch, "train")
        chosen, rejected, _ = dpo.model.logps(sft_policy, batch)
        trained, _, _ = dpo.model.logps(dpo.model.policy.eval(), batch)
    assert torch.allclose(ref_chosen, chosen, atol=1e-4) and torch.allclose(ref_rejected, rejected, atol=1e-4)
    assert not torch.allclose(trained, chosen, atol=1e-4)
    for stage in ("ppo", "grpo", "rloo", "dpo"):
        assert (tmp_path / "out" / stage / "shraygpt_rl.json").is_file()


def test_seed_001_ppo_on_gpt_neo_logs_the_animal_frequency(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_stage(  # the config first: what follows it overrides it (its 400 steps took 30 s)
        "ppo",
        [
            "--config",
            str(_config("tinystories-ppo.yaml")),
            *SMALL,
            "--trainer.val_check_interval",  # one rollout (four PPO epochs), then validation
            "1",
            "--model.policy",
            str(tiny_hf("gpt_neo")),
            "--model.lora",
            "{r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj]}",
            *ONLINE,
            "--model.export_path",
            "out/tinystories-ppo",
        ],
    )
    metrics = out.trainer.callback_metrics
    assert out.trainer.global_step == 4
    assert {"val/reward/animal_frequency", "val/reward/animal_frequency_reference"} <= set(metrics)
    assert abs(float(metrics["policy/ratio_at_start"]) - 1) < 1e-6
    critic, policy = out.model.critic.trunk, out.model.policy
    shared = {p.data_ptr() for p in policy.parameters() if not p.requires_grad}
    assert shared == {p.data_ptr() for p in critic.parameters() if not p.requires_grad}  # one base in memory
    assert (tmp_path / "out" / "tinystories-ppo" / "adapter_config.json").is_file()


def _config(name: str):
    from shraygpt_rl.bench import ROOT

    return ROOT / "configs" / name


# The LoRA learning test's threshold: the keyword reward's gain on 48 held-out continuations with the
# benchmark's defaults (600 SFT steps, 800 PPO steps), seeds 0-2 (SHRAYGPT_LEARNING_SEED) at 1 / 2
# torch threads: seed 0 +4.79 / +6.44, seed 1 +2.82 / +0.69, seed 2 +7.53 / +6.78. The least, halved.
# The animal-word frequency rose in all six runs, the least from 0.083 to 0.286 (seed 1, one thread).
# (1,500 SFT steps gave +3.78 on seed 0; 800 SFT steps +0.53 with 400 PPO steps, +3.18 with 800.)
LORA_GAIN = 0.34


@pytest.mark.slow
@pytest.mark.timeout(600)  # 1-2 minutes at one thread: 600 SFT steps, then 800 PPO steps (200 rollouts)
def test_ppo_with_a_lora_policy_raises_the_keyword_reward(tmp_path, monkeypatch):
    """Seed 001 at toy size (``bench lora`` with its defaults): a tiny GPT-Neo taught to write
    stories, then PPO with LoRA actor and critic against the seed's animal-stories reward, on
    held-out openings."""
    from conftest import LEARNING_SEED, learned

    from shraygpt_rl.bench.lora import bench_lora

    monkeypatch.chdir(tmp_path)
    figures = bench_lora(samples_per_prompt=8, seed=LEARNING_SEED)
    before, after = figures["SFT (before)"], figures["PPO + LoRA (after)"]
    learned("ppo-lora", before["reward"], after["reward"])
    assert after["reward"] >= before["reward"] + LORA_GAIN, (before, after)
    assert after["animal_frequency"] > before["animal_frequency"]
    assert 0 < figures["trainable_fraction"] < 0.1
