"""Seed 001's workflow at toy size: does PPO with a LoRA policy raise the animal-stories reward?

A tiny random GPT-Neo (``bench/tiny_hf.py``, byte-level BPE) first learns to write story
continuations by full SFT on made-up ones (" a cat and a dog played all day", half of them about
people instead of animals), standing in for TinyStories' pretraining. Then PPO with LoRA adapters
on q_proj, k_proj and v_proj, a critic on its own adapter and the seed's ``KeywordReward``
(``configs/tinystories-ppo.yaml``, shortened). Both policies then continue the held-out story
openings; the bench prints the mean keyword reward and the animal-word frequency of each, the
trainable fraction and the time.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from shraygpt_rl.bench import ROOT
from shraygpt_rl.bench.tiny_hf import tiny_hf_model
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.data.sources import STORY_OPENINGS
from shraygpt_rl.generation import sample_and_decode
from shraygpt_rl.lora import trainable_fraction
from shraygpt_rl.policy import load_policy
from shraygpt_rl.rewards import ANIMALS, HUMANS, KeywordReward, animal_frequency
from shraygpt_rl.runner import run_stage

LORA = "{r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj]}"


def story_demonstrations(path: Path, count: int = 2000, seed: int = 0) -> None:
    """Continuations of the story openings, half about animals and half about people."""
    rng = random.Random(seed)
    animals, humans = sorted(ANIMALS), sorted(HUMANS)
    rows = []
    for _ in range(count):
        who = animals if rng.random() < 0.5 else humans
        x, y = rng.choice(who), rng.choice(who)
        ending = rng.choice(["played all day", "went to the park", "ate some bread", "looked at the sky"])
        rows.append({"prompt": rng.choice(STORY_OPENINGS), "completion": f" a {x} and a {y} {ending}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def held_out_rewards(policy, samples_per_prompt: int, max_new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Mean keyword reward and animal frequency of ``policy``'s continuations of the test openings (T = 1)."""
    data = PromptDataModule(source="stories", tokenizer="hf", tokenizer_path=policy.source, system_prompt=None)
    data.setup()
    prompts = [p for p in data.splits["test"]["prompt"] for _ in range(samples_per_prompt)]
    batch = data.collate([{"prompt_ids": data.tokenizer.encode_ordinary(p), "prompt_text": p} for p in prompts])
    generator = torch.Generator().manual_seed(seed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, texts = sample_and_decode(policy, ids, mask, data.tokenizer, max_new_tokens, generator=generator)
    rewards = KeywordReward()(prompts, texts, [{}] * len(texts))
    return {"reward": float(rewards.mean()), "animal_frequency": animal_frequency(texts), "samples": len(texts)}


def bench_lora(
    sft_steps: int = 600, ppo_steps: int = 800, samples_per_prompt: int = 16, seed: int = 0, sft_lr: float = 3e-3
) -> dict:
    """SFT then PPO with LoRA at toy size; prints and returns the figures before and after.
    ``seed`` seeds the tiny model, the demonstrations, both runs and the held-out samples."""
    base = tiny_hf_model("gpt_neo", Path("tiny-gpt-neo"), seed=seed)
    story_demonstrations(Path("story-demos.jsonl"), seed=seed)
    small = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    small += ["--seed_everything", str(seed)]
    start = time.perf_counter()
    sft_args = ["--model.policy", str(base), "--data.source", "story-demos.jsonl", "--data.system_prompt", "null"]
    sft_args += ["--trainer.max_steps", str(sft_steps), "--trainer.limit_val_batches", "1", "--data.batch_size", "32"]
    sft_args += ["--model.optimizer", "adamw", "--model.lr", str(sft_lr), "--model.export_path", "checkpoints/tiny-sft"]
    run_stage("sft", [*sft_args, *small])
    sft_s = time.perf_counter() - start
    new_tokens = 32
    ppo_args = ["--config", str(ROOT / "configs" / "tinystories-ppo.yaml"), "--model.policy", "checkpoints/tiny-sft"]
    ppo_args += ["--model.lora", LORA, "--model.lr", "3e-3", "--model.max_new_tokens", str(new_tokens)]
    ppo_args += ["--trainer.max_steps", str(ppo_steps), "--model.export_path", "checkpoints/tiny-ppo"]
    ppo = run_stage("ppo", [*ppo_args, *small])
    ppo_s = time.perf_counter() - start - sft_s
    trainable, total = trainable_fraction(ppo.model.trainable())
    rows = {
        "SFT (before)": held_out_rewards(
            load_policy("checkpoints/tiny-sft").eval(), samples_per_prompt, new_tokens, seed
        ),
        "PPO + LoRA (after)": held_out_rewards(
            load_policy("checkpoints/tiny-ppo").eval(), samples_per_prompt, new_tokens, seed
        ),
    }
    samples = rows["SFT (before)"]["samples"]
    print(f"\nSeed 001 at toy size: tiny GPT-Neo, PPO with LoRA against KeywordReward ({samples} held-out samples)")
    print(f"{'policy':<22}{'mean keyword reward':>22}{'animal frequency':>19}")
    for name, row in rows.items():
        print(f"{name:<22}{row['reward']:>22.3f}{row['animal_frequency']:>19.3f}")
    share = f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    print(f"trainable parameters in PPO (actor and critic adapters, value head): {share}")
    print(f"time: SFT {sft_s:.0f} s ({sft_steps} steps), PPO {ppo_s:.0f} s ({ppo_steps} optimizer steps)")
    return {**rows, "trainable_fraction": trainable / total}
