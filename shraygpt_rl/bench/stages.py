"""SFT -> reward model -> DPO on the built-in arithmetic task, and a reward model on HH-RLHF.

Runs ``train.py``'s stages with the configs in ``configs/`` (tiny model, CPU), then measures on
held-out (test-split) data: SFT loss and success rates, the reward model's pairwise accuracy,
and DPO's preference accuracy and success rates.
"""

from __future__ import annotations

import os

import torch

from shraygpt_rl.bench import ROOT, TASK, run_stage
from shraygpt_rl.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.evaluate import reward_model_accuracy, verifier_success
from shraygpt_rl.losses import masked_mean, sequence_logprobs
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.stages.reward import RewardModel, stack_pairs

HH_SAMPLE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
R50K = ROOT.parent / "shared" / "tokenizers" / "r50k_base.tiktoken"


@torch.no_grad()
def held_out_loss(policy: ShrayGPT, data: SFTDataModule) -> float:
    """Mean next-token NLL on the assistant tokens of the clean test demonstrations."""
    policy.eval()
    losses = []
    for batch in data.plain_dataloader("test"):
        logits, _, _ = policy(batch["input_ids"], attention_mask=batch["attention_mask"])
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                                reduction="none")  # fmt: skip
        losses.append(masked_mean(nll, batch["loss_mask"][:, 1:].float()))
    return torch.stack(losses).mean().item()


@torch.no_grad()
def pair_accuracy(data: PreferenceDataModule, policy: ShrayGPT, reference: ShrayGPT | None = None) -> float:
    """Held-out share of pairs ranked right by the policy's log-probabilities, or by DPO's implicit
    reward ``log pi - log pi_ref`` (``evaluate.reward_model_accuracy`` does it for a reward model)."""
    hits = []
    for batch in data.plain_dataloader("test"):
        B = batch["chosen_input_ids"].size(0)
        ids, attention, response = stack_pairs(batch)
        scores = sequence_logprobs(policy.eval()(ids, attention_mask=attention)[0], ids, response)
        if reference is not None:
            scores = scores - sequence_logprobs(reference.eval()(ids, attention_mask=attention)[0], ids, response)
        hits.append((scores[:B] > scores[B:]).float())
    return torch.cat(hits).mean().item()


def bench_stages(workdir: str = "bench-runs/stages") -> dict[str, float]:
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    seconds = {stage: run_stage(stage) for stage in ("sft", "reward", "dpo")}
    prompts, pairs, demos = PromptDataModule(**TASK), PreferenceDataModule(**TASK), SFTDataModule(**TASK)
    torch.manual_seed(0)
    fresh = ShrayGPT(**tiny_config())
    sft = ShrayGPT.load_from_checkpoint("checkpoints/shraygpt-instruct.ckpt")
    dpo = ShrayGPT.load_from_checkpoint("checkpoints/shraygpt-dpo.ckpt")
    rm = RewardModel.load_from_checkpoint("checkpoints/reward-model.ckpt")
    rows = {
        "SFT held-out loss (random init -> SFT)": (held_out_loss(fresh, demos), held_out_loss(sft, demos)),
        "reward model held-out pairwise accuracy": (None, reward_model_accuracy(rm, pairs)),
        "DPO held-out preference accuracy (implicit reward)": (0.0, pair_accuracy(pairs, policy=dpo, reference=sft)),
        "policy prefers chosen (log p), SFT -> DPO": (
            pair_accuracy(pairs, policy=sft),
            pair_accuracy(pairs, policy=dpo),
        ),
    }
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        before = verifier_success(sft, prompts, temperature=temperature)["success"]
        after = verifier_success(dpo, prompts, temperature=temperature)["success"]
        rows[f"verifier success, {name}, SFT -> DPO"] = (before, after)
    if HH_SAMPLE.is_file() and R50K.is_file():
        seconds["reward (HH-RLHF)"] = run_stage(
            "reward", "--data.source", str(HH_SAMPLE), "--data.tokenizer", "r50k_base", "--data.tokenizer_path",
            str(R50K), "--data.max_length", "256", "--data.max_prompt_length", "192", "--data.batch_size", "16",
            "--data.system_prompt", "You are ShrayGPT, a helpful and concise AI assistant.", "--model.policy", "null",
            "--model.model_config", str(tiny_config(vocab_size=50257, block_size=256)).replace("'", '"'),
            "--model.export_path", "checkpoints/reward-model-hh.ckpt", "--trainer.max_steps", "300",
        )  # fmt: skip
        hh = PreferenceDataModule(source=str(HH_SAMPLE), tokenizer="r50k_base", tokenizer_path=str(R50K),
                                  max_length=256, max_prompt_length=192, batch_size=16)  # fmt: skip
        rows["HH-RLHF reward model held-out accuracy (tiny, from scratch)"] = (
            None, reward_model_accuracy(RewardModel.load_from_checkpoint("checkpoints/reward-model-hh.ckpt"), hh)
        )  # fmt: skip
    print("\nstages on held-out test data (tiny model, 2 CPU cores):")
    for name, (before, after) in rows.items():
        print(f"  {name:<58} {'' if before is None else f'{before:.3f} -> '}{after:.3f}")
    print("  wall time: " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items()))
    return {name: after for name, (_, after) in rows.items()}
