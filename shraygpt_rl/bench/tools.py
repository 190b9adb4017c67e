"""Can a tiny policy learn to use a calculator, and what do tools cost in generation?

``python -m shraygpt_rl.bench learning --stages tools`` runs, per seed: SFT on noisy tool
demonstrations (``configs/sft-tools.yaml``: 40% call the tool with a wrong operand), then GRPO with
the calculator answering in the rollouts (``configs/grpo-tools.yaml``). It samples one answer per
held-out 3-digit multiplication (200 test prompts) at T = 1 and greedily, and prints the
verifier's success rates of the SFT policy without the tool (its calls go unanswered and it must
guess the product), the SFT policy with the tool, and the GRPO policy with the tool.

Then the cost of tools: multi-turn generation of the GRPO policy's rollouts (16 prompts x 8, the
calculator answering, rows ending at EOS) against single-turn generation of the same number of
rows and columns (no environment, no EOS: every row decodes to the multi-turn rollout's width),
for the static decoder and the eager loop. Same steps, same batch; the ratio is what answering
tools in the loop costs.
"""

from __future__ import annotations

import statistics
import time

import torch

from shraygpt_rl.bench import ROOT, demo_data, run_stage
from shraygpt_rl.bench.learning import spread
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.environments import Calculator
from shraygpt_rl.evaluate import verifier_success
from shraygpt_rl.generation import generate
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.runner import config_section, stage_of
from shraygpt_rl.tokenizer import stop_tokens
from shraygpt_rl.turns import Turns

SFT, GRPO = "sft-tools", "grpo-tools"
REPEATS = 5  # timed generations per loop in the cost of tools, after one warm-up (the tests take 1)
PROMPTS, SAMPLES = 16, 8  # the cost of tools' rows: a GRPO rollout of the demo config (the tests take fewer)


def _export(config: str) -> str:
    return config_section(ROOT / "configs" / f"{config}.yaml", "model")["export_path"]


def bench_tools(seeds: tuple[int, ...] = (0,)) -> dict:
    """For each seed: SFT then GRPO with the calculator; held-out success with and without the
    tool; then the cost of tools in generation."""
    data = demo_data(PromptDataModule, config=SFT)
    tokens = config_section(ROOT / "configs" / f"{GRPO}.yaml", "model")["max_new_tokens"]
    rows = {"SFT, no tool": (SFT, False), "SFT, tool": (SFT, True), "GRPO, tool": (GRPO, True)}
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in rows}
    for seed in seeds:
        seconds = {
            config: run_stage(stage_of(config), f"--seed_everything={seed}", config=config) for config in (SFT, GRPO)
        }
        for name, (config, tool) in rows.items():
            policy = ShrayGPT.load_from_checkpoint(_export(config))
            figures = {
                key: verifier_success(
                    policy, data, temperature=t, max_new_tokens=tokens, environment=Calculator() if tool else None
                )
                for key, t in (("sampled", 1.0), ("greedy", 0.0))
            }
            results[name][seed] = dict(
                success=figures["sampled"]["success"], greedy=figures["greedy"]["success"], seconds=seconds[config]
            )
        print(
            f"\n[seed {seed}] GRPO with the tool: held-out success {results['GRPO, tool'][seed]['success']:.3f}",
            flush=True,
        )
    report(results, len(data.splits["test"]))
    bench_tool_cost(ShrayGPT.load_from_checkpoint(_export(GRPO)), data, tokens)
    return results


def report(results: dict[str, dict[int, dict[str, float]]], prompts: int) -> None:
    seeds = sorted(next(iter(results.values())))
    print(f"\nheld-out 3-digit multiplication ({prompts} test prompts), tiny model, {torch.get_num_threads()} threads:")
    print(f"  {'policy':<14} {'seed':>6} {'success T=1':>12} {'greedy':>12} {'train s':>12}")
    for name, by_seed in results.items():
        for seed in seeds:
            row = by_seed[seed]
            print(f"  {name:<14} {seed:>6} {row['success']:>12.3f} {row['greedy']:>12.3f} {row['seconds']:>12.0f}")
    if len(seeds) > 1:
        print(f"\nover seeds {', '.join(map(str, seeds))}: min / mean / max of held-out success")
        for name, by_seed in results.items():
            cells = [spread([row[key] for row in by_seed.values()]) for key in ("success", "greedy")]
            print(f"  {name:<14} {cells[0]:>22} {cells[1]:>22}")


@torch.no_grad()
def bench_tool_cost(
    policy: ShrayGPT, data: PromptDataModule, tokens: int, repeats: int | None = None
) -> dict[str, float]:
    """Median seconds of multi-turn generation (the calculator answering) and of single-turn
    generation of as many rows and columns, per loop (``REPEATS`` times each unless ``repeats``
    says), after a warm-up; prints them and their ratio."""
    repeats = REPEATS if repeats is None else repeats
    batch = next(iter(data.plain_dataloader("test")))
    ids = batch["input_ids"][:PROMPTS].repeat_interleave(
        SAMPLES, dim=0
    )  # (PROMPTS x SAMPLES, P): a GRPO rollout's rows
    mask = batch["attention_mask"][:PROMPTS].repeat_interleave(SAMPLES, dim=0)
    prompts = [p for p in batch["prompt"][:PROMPTS] for _ in range(SAMPLES)]
    metadata = [m for m in batch["metadata"][:PROMPTS] for _ in range(SAMPLES)]
    enc, policy = data.tokenizer, policy.eval()
    figures = {}
    print(f"\ngeneration with tools, {len(ids)} rows ({PROMPTS} prompts x {SAMPLES}), median of {repeats}:")
    for loop in ("static", "eager"):
        times, width = {"tools": [], "plain": []}, 0
        for i in range(repeats + 1):  # the first of each is a warm-up
            turns = Turns(Calculator(), enc, prompts, metadata, max_turns=3, capacity=tokens)
            start = time.perf_counter()
            out = generate(
                policy, ids, tokens, eos_token_id=stop_tokens(enc), attention_mask=mask, engine=loop, turns=turns
            )
            multi = time.perf_counter() - start
            width = out.responses.size(1)
            start = time.perf_counter()
            generate(policy, ids, width, attention_mask=mask, engine=loop)
            if i:
                times["tools"].append(multi), times["plain"].append(time.perf_counter() - start)
        tools, plain = statistics.median(times["tools"]), statistics.median(times["plain"])
        calls = float(out.turns["tool_calls"].float().mean())
        print(
            f"  {loop:<7} with tools {tools * 1e3:7.1f} ms, single-turn {plain * 1e3:7.1f} ms, "
            f"ratio {tools / plain:.2f}x ({width} columns, {calls:.2f} tool calls per row)"
        )
        figures[loop] = tools / plain
    return figures
