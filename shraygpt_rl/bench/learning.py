"""Does online RL work? SFT a tiny policy on noisy arithmetic, then PPO and GRPO against the verifier.

Runs ``train.py``'s stages with ``configs/sft.yaml``, ``configs/ppo.yaml`` and ``configs/grpo.yaml``
(tiny model, CPU), then samples one answer per held-out test prompt from each policy at the
training temperature (T = 1) and greedily, and prints the verifier's success rates side by side
with the wall time of each stage.
"""

from __future__ import annotations

import torch

from shraygpt_rl.bench import ROOT, demo_data, run_stage
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import verifier_success
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.runner import config_section


def bench_learning(stages: tuple[str, ...] = ("ppo", "grpo")) -> dict:
    """SFT, then each online stage from the SFT policy; print held-out success before and after."""
    seconds = {"sft": run_stage("sft")}
    for stage in stages:
        seconds[stage] = run_stage(stage)
    data = demo_data(PromptDataModule)
    results = {}
    for stage in seconds:
        policy = ShrayGPT.load_from_checkpoint(_export_path(stage))
        sampled = verifier_success(policy, data, temperature=1.0)
        greedy = verifier_success(policy, data, temperature=0.0)
        results[stage] = {
            "success": sampled["success"],
            "greedy": greedy["success"],
            "mean_reward": sampled["mean_reward"],
            "seconds": seconds[stage],
        }
    base = results["sft"]["success"]
    threads = torch.get_num_threads()
    print(f"\nheld-out arithmetic ({len(data.splits['test'])} test prompts), tiny model, {threads} threads:")
    print(f"  {'policy':<8} {'success T=1':>12} {'vs SFT':>8} {'greedy':>8} {'mean reward':>12} {'train time':>11}")
    for stage, r in results.items():
        gain = "" if stage == "sft" else f"{100 * (r['success'] - base):+.1f} pt"
        print(
            f"  {stage:<8} {r['success']:>12.3f} {gain:>8} {r['greedy']:>8.3f} {r['mean_reward']:>12.3f} "
            f"{r['seconds']:>9.0f} s"
        )
    return results


def _export_path(stage: str) -> str:
    """Where ``configs/<stage>.yaml`` writes its policy."""
    return config_section(ROOT / "configs" / f"{stage}.yaml", "model")["export_path"]
