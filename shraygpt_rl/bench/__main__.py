"""Benchmarks that print their figures side by side from a single run.

python -m shraygpt_rl.bench generation   # rollout engine against the course's decoding
python -m shraygpt_rl.bench moe          # sparse MoE dispatch against the dense formulation
python -m shraygpt_rl.bench stages       # SFT -> reward model -> DPO on the arithmetic task
python -m shraygpt_rl.bench grpo-step    # one GRPO step at the bench shape: completions/s, time split
python -m shraygpt_rl.bench learning     # SFT -> PPO and GRPO (--stages ... rloo) on arithmetic: held-out success
"""

from __future__ import annotations

import argparse

from shraygpt_rl.runtime import retain_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shraygpt_rl.bench", description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["generation", "moe", "speed", "stages", "grpo-step", "learning"])
    parser.add_argument("--prompts", type=int, default=16, help="generation: prompts")
    parser.add_argument("--new-tokens", type=int, default=64, help="generation: new tokens per prompt")
    parser.add_argument("--moe-tokens", type=int, default=1024, help="moe: tokens")
    parser.add_argument("--workdir", default=None, help="stages, learning: where checkpoints and logs go")
    parser.add_argument("--stages", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo", "rloo"],
                        help="learning: the online stages to run after SFT")  # fmt: skip
    parser.add_argument("--tokenizer-path", help="grpo-step: local r50k_base.tiktoken (default: ../shared's)")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as train.py does: see shraygpt_rl.runtime
    if args.which in ("generation", "speed"):
        from shraygpt_rl.bench.speed import bench_generation

        bench_generation(args.prompts, args.new_tokens)
    if args.which in ("moe", "speed"):
        from shraygpt_rl.bench.speed import bench_moe

        bench_moe(args.moe_tokens)
    if args.which == "grpo-step":
        from shraygpt_rl.bench.throughput import bench_grpo_step

        bench_grpo_step(tokenizer_path=args.tokenizer_path)
    if args.which == "stages":
        from shraygpt_rl.bench.stages import bench_stages

        bench_stages(args.workdir or "bench-runs/stages")
    if args.which == "learning":
        from shraygpt_rl.bench.learning import bench_learning

        bench_learning(args.workdir or "bench-runs/learning", tuple(args.stages))


if __name__ == "__main__":
    main()
