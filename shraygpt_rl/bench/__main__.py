"""Benchmarks that print their figures side by side from a single run.

python -m shraygpt_rl.bench generation   # rollout engine against the course's decoding (greedy, and top-k 50)
python -m shraygpt_rl.bench moe          # sparse MoE dispatch against the dense formulation
python -m shraygpt_rl.bench grpo-step    # one GRPO step at the bench shape: completions/s, time split
python -m shraygpt_rl.bench grpo-step --hf tinystories   # a random-init HF shape (or opt-350m): engines and TRL
python -m shraygpt_rl.bench stages       # SFT -> reward model -> DPO on the arithmetic task
python -m shraygpt_rl.bench learning     # SFT -> PPO, GRPO, … (--stages, --seeds) on arithmetic: held-out success
python -m shraygpt_rl.bench learning --stages tools   # SFT -> GRPO with a calculator on 3-digit multiplication
python -m shraygpt_rl.bench lora         # seed 001 at toy size: PPO with LoRA on a tiny GPT-Neo, keyword reward
python -m shraygpt_rl.bench gpu --tokenizer-path r50k_base.tiktoken   # course size on a GPU: decode, GRPO, TRL
python -m shraygpt_rl.bench label        # the labelling page: 20 pairs x 3 labellers by keyboard in headless Chromium

``stages``, ``learning`` and ``lora`` train with ``configs/`` and write ``checkpoints/`` and ``logs/`` in the
current directory, as ``train.py`` does: run them in a scratch folder.
"""

from __future__ import annotations

import argparse
import sys

from shraygpt_rl.bench import R50K
from shraygpt_rl.errors import UserError
from shraygpt_rl.runtime import retain_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shraygpt_rl.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "which", choices=["generation", "moe", "grpo-step", "stages", "learning", "lora", "gpu", "label"]
    )
    parser.add_argument("--prompts", type=int, help="generation, grpo-step: prompts (default 16, 8)")
    parser.add_argument("--new-tokens", type=int, help="generation, grpo-step: new tokens per response (64, 48)")
    parser.add_argument("--top-k", type=int, help="generation: 1 (greedy) or k; default both (16x64, 8x48 top-k 50)")
    parser.add_argument("--generations", type=int, help="grpo-step, gpu: completions per prompt (4, 8)")
    parser.add_argument("--steps", type=int, default=3, help="grpo-step: timed steps, after one warm-up step")
    parser.add_argument(
        "--hf",
        choices=["tinystories", "opt-350m"],
        help="grpo-step: the HF model shape to bench instead of ShrayGPT's bench shape (random init; each rollout "
        "engine, and TRL's GRPOTrainer when trl is importable)",
    )
    parser.add_argument("--moe-tokens", type=int, default=1024, help="moe: tokens")
    parser.add_argument("--pairs", type=int, default=20, help="label: pairs judged")
    parser.add_argument(
        "--judgements-per-pair", type=int, default=3, help="label: labellers per pair, one browser each"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["ppo", "grpo"],
        choices=[
            "ppo",
            "grpo",
            "grpo-gspo",
            "grpo-cispo",
            "grpo-sapo",
            "rloo",
            "trpo",
            "online-dpo",
            "dpo",
            "dpo-simpo",
            "dpo-orpo",
            "kto",
            "reward",
            "ppo-rm",
            "tools",
        ],
        help="learning: the configs to run after SFT, in order (ppo-rm needs reward before it); tools: "
        "SFT and GRPO with a calculator on multiplication (bench/tools.py)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="learning: training seeds")
    parser.add_argument("--sft-steps", type=int, default=600, help="lora: SFT steps of the tiny GPT-Neo")
    parser.add_argument("--ppo-steps", type=int, default=800, help="lora: PPO optimizer steps (4 per rollout)")
    parser.add_argument("--tokenizer-path", help="grpo-step, gpu: local r50k_base.tiktoken (default: ../shared's)")
    parser.add_argument(
        "--shape",
        choices=["course", "tiny"],
        default="course",
        help="gpu, grpo-step --hf: the model's size (tiny: 2 layers of width 64 and a byte vocabulary, a smoke run)",
    )
    parser.add_argument("--device", default="cuda", help="gpu: where to run (cpu with --shape tiny, for a smoke run)")
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128], help="gpu: decode batch sizes")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="gpu: rows per forward/backward")
    parser.add_argument("--logprob-chunk-rows", type=int, help="grpo-step, gpu: the update's head in chunks of rows")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as train.py does: see shraygpt_rl.runtime
    if args.which == "generation":
        from shraygpt_rl.bench.speed import bench_generation

        if args.top_k is None or args.top_k == 1:
            bench_generation(args.prompts or 16, args.new_tokens or 64, top_k=1)
        if args.top_k is None or args.top_k != 1:
            bench_generation(args.prompts or 8, args.new_tokens or 48, top_k=args.top_k or 50)
    if args.which == "moe":
        from shraygpt_rl.bench.speed import bench_moe

        bench_moe(args.moe_tokens)
    if args.which == "grpo-step":
        from shraygpt_rl.bench.throughput import bench_grpo_step

        sizes = dict(prompts=args.prompts or 8, generations=args.generations or 4, new_tokens=args.new_tokens or 48)
        if args.hf:
            from shraygpt_rl.bench.hf_step import TINY, bench_hf_grpo_step

            tiny = dict(overrides=TINY[args.hf], vocabulary="byte") if args.shape == "tiny" else {}
            bench_hf_grpo_step(args.hf, **sizes, steps=args.steps, tokenizer_path=args.tokenizer_path, **tiny)
        else:
            bench_grpo_step(
                **sizes,
                steps=args.steps,
                tokenizer_path=args.tokenizer_path,
                logprob_chunk_rows=args.logprob_chunk_rows,
            )
    if args.which == "gpu":
        from shraygpt_rl.bench.gpu import bench_gpu

        sizes = dict(prompts=args.prompts or 16, generations=args.generations or 8, new_tokens=args.new_tokens or 128)
        bench_gpu(
            args.shape,
            args.device,
            tuple(args.batches),
            **sizes,
            micro_batch_size=args.micro_batch_size,
            steps=args.steps,
            tokenizer_path=args.tokenizer_path or (str(R50K) if R50K.is_file() else None),
            logprob_chunk_rows=args.logprob_chunk_rows,
        )
    if args.which == "stages":
        from shraygpt_rl.bench.stages import bench_stages

        bench_stages()
    if args.which == "learning":
        from shraygpt_rl.bench.learning import bench_learning

        stages = tuple(s for s in args.stages if s != "tools")
        if stages:
            bench_learning(stages, tuple(args.seeds))
        if "tools" in args.stages:
            from shraygpt_rl.bench.tools import bench_tools

            bench_tools(tuple(args.seeds))
    if args.which == "lora":
        from shraygpt_rl.bench.lora import bench_lora

        bench_lora(args.sft_steps, args.ppo_steps)
    if args.which == "label":
        from shraygpt_rl.bench.label import bench_label

        bench_label(args.pairs, args.judgements_per_pair)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # as train.py: one sentence and exit code 2, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
