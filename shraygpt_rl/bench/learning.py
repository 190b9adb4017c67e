"""Does RL work, and for every seed? SFT a tiny policy on noisy arithmetic, then each stage from
it; held-out success of each policy, per seed and as min / mean / max over seeds.

Runs ``train.py``'s stages with configs from ``configs/`` (tiny model, CPU): ``sft`` first, then
each name of ``stages``, a config name: ``ppo``, ``grpo`` (or its newer objectives ``grpo-gspo``,
``grpo-cispo`` and ``grpo-sapo``), ``rloo``, ``trpo``, ``online-dpo``; the offline ``dpo``,
``dpo-simpo``, ``dpo-orpo`` and ``kto``; or ``reward`` then ``ppo-rm`` for PPO against the
reward model, as the pipeline does. Each runs with ``--seed_everything`` set to the seed. Then it
samples one answer per held-out test prompt from each policy at the training temperature (T = 1)
and greedily, and prints the verifier's success rates, the share of 200 held-out preference pairs
whose chosen answer the policy finds likelier (``pref. acc.``, ``evaluate.preference_accuracy``)
and each stage's time.
"""

from __future__ import annotations

import statistics

import torch

from shraygpt_rl.bench import ROOT, demo_data, run_stage
from shraygpt_rl.data import PreferenceDataModule, PromptDataModule
from shraygpt_rl.evaluate import preference_accuracy, verifier_success
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.runner import config_section, stage_of

COLUMNS = {
    "success": "success T=1",
    "greedy": "greedy",
    "mean_reward": "mean reward",
    "prefers_chosen": "pref. acc.",
    "seconds": "train s",
}


def bench_learning(stages: tuple[str, ...] = ("ppo", "grpo"), seeds: tuple[int, ...] = (0,)) -> dict:
    """For each seed: SFT, then each of ``stages``; held-out figures of every policy they export."""
    data, pairs = demo_data(PromptDataModule), demo_data(PreferenceDataModule)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in seeds:
        for name in ("sft", *stages):
            seconds = run_stage(stage_of(name), f"--seed_everything={seed}", config=name)
            export = config_section(ROOT / "configs" / f"{name}.yaml", "model")["export_path"]
            if name.startswith("reward"):
                continue  # a reward model, not a policy
            policy = ShrayGPT.load_from_checkpoint(export)
            sampled = verifier_success(policy, data, temperature=1.0)
            greedy = verifier_success(policy, data, temperature=0.0)
            prefers = preference_accuracy(policy, pairs)
            figures = dict(sampled, greedy=greedy["success"], prefers_chosen=prefers, seconds=seconds)
            results.setdefault(name, {})[seed] = figures
            print(f"\n[seed {seed}] {name}: held-out success {figures['success']:.3f}", flush=True)
    report(results, len(data.splits["test"]))
    return results


def report(results: dict[str, dict[int, dict[str, float]]], prompts: int) -> None:
    """One row per stage and seed, then min / mean / max over the seeds of held-out success
    sampled at T = 1 and greedy, and every seed on which an RL policy's greedy success fell
    below its SFT policy's."""
    seeds = sorted({seed for by_seed in results.values() for seed in by_seed})
    w = max(8, *map(len, results))  # the policy column fits the longest config name
    print(f"\nheld-out arithmetic ({prompts} test prompts), tiny model, {torch.get_num_threads()} threads:")
    print(f"  {'policy':<{w}} {'seed':>6} " + " ".join(f"{title:>12}" for title in COLUMNS.values()))
    for name, by_seed in results.items():
        for seed in seeds:
            row = by_seed[seed]
            print(f"  {name:<{w}} {seed:>6} " + " ".join(f"{row[key]:>12.3f}" for key in COLUMNS))
    if len(seeds) > 1:
        print(f"\nover seeds {', '.join(map(str, seeds))}: min / mean / max of held-out success")
        print(f"  {'policy':<{w}} {'sampled at T = 1':>22} {'greedy':>22}")
        for name, by_seed in results.items():
            cells = [spread([row[key] for row in by_seed.values()]) for key in ("success", "greedy")]
            print(f"  {name:<{w}} {cells[0]:>22} {cells[1]:>22}")
    sft = results.get("sft", {})
    falls = [
        f"{name} seed {seed} ({row['greedy']:.3f} < {sft[seed]['greedy']:.3f})"
        for name, by_seed in results.items()
        if name != "sft"
        for seed, row in by_seed.items()
        if seed in sft and row["greedy"] < sft[seed]["greedy"]
    ]
    print("\ngreedy success below SFT's: " + (", ".join(falls) if falls else "none"))


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.mean(values):.3f} / {max(values):.3f}"
