"""SFT -> reward model -> DPO on the built-in arithmetic task, and a reward model on HH-RLHF.

Runs ``train.py``'s stages with the configs in ``configs/`` (tiny model, CPU), then measures on
held-out (test-split) data, with the stages' own loss and log-probability methods: SFT loss and
success rates, the reward model's pairwise accuracy, and DPO's preference accuracy and success
rates.
"""

from __future__ import annotations

import torch

from shraygpt_rl.bench import HH_SAMPLE, R50K, demo_data, run_stage
from shraygpt_rl.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.evaluate import reward_model_accuracy, verifier_success
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.reward_model import RewardModel
from shraygpt_rl.stages.dpo import DPOStage
from shraygpt_rl.stages.sft import SFTStage


@torch.no_grad()
def held_out_loss(stage: SFTStage, data: SFTDataModule) -> float:
    """``SFTStage.loss`` (next-token NLL on assistant tokens) over the clean test demonstrations,
    averaged over batches."""
    stage.eval()
    return torch.stack([stage.loss(batch)[0] for batch in data.plain_dataloader("test")]).mean().item()


@torch.no_grad()
def pair_accuracy(data: PreferenceDataModule, stage: DPOStage, reference: ShrayGPT | None = None) -> float:
    """Held-out share of pairs that ``DPOStage.logps`` ranks right: by the stage's policy's
    log-probabilities, or by DPO's implicit reward ``log pi - log pi_ref`` against ``reference``
    (``evaluate.reward_model_accuracy`` does it for a reward model)."""
    stage.eval()
    hits = []
    for batch in data.plain_dataloader("test"):
        chosen, rejected, _ = stage.logps(stage.policy, batch)
        if reference is not None:
            ref_chosen, ref_rejected, _ = stage.logps(reference.eval(), batch)
            chosen, rejected = chosen - ref_chosen, rejected - ref_rejected
        hits.append((chosen > rejected).float())
    return torch.cat(hits).mean().item()


def bench_stages() -> dict[str, float]:
    seconds = {stage: run_stage(stage) for stage in ("sft", "reward", "dpo")}
    prompts, pairs, demos = demo_data(PromptDataModule), demo_data(PreferenceDataModule), demo_data(SFTDataModule)
    torch.manual_seed(0)
    fresh = SFTStage(model_config=tiny_config(), export_path=None)
    trained = SFTStage(policy="checkpoints/demo/shraygpt-instruct.ckpt", export_path=None)
    start = DPOStage(policy="checkpoints/demo/shraygpt-instruct.ckpt", export_path=None)  # DPO before training
    aligned = DPOStage(policy="checkpoints/demo/shraygpt-dpo.ckpt", export_path=None)
    sft, dpo = start.policy, aligned.policy
    rm = RewardModel.load_from_checkpoint("checkpoints/demo/reward-model.ckpt")
    rows = {
        "SFT held-out loss (random init -> SFT)": (held_out_loss(fresh, demos), held_out_loss(trained, demos)),
        "reward model held-out pairwise accuracy": (None, reward_model_accuracy(rm, pairs)),
        "DPO held-out preference accuracy (implicit reward)": (0.0, pair_accuracy(pairs, aligned, reference=sft)),
        "policy prefers chosen (log p), SFT -> DPO": (pair_accuracy(pairs, start), pair_accuracy(pairs, aligned)),
    }
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        before = verifier_success(sft, prompts, temperature=temperature)["success"]
        after = verifier_success(dpo, prompts, temperature=temperature)["success"]
        rows[f"verifier success, {name}, SFT -> DPO"] = (before, after)
    if HH_SAMPLE.is_file() and R50K.is_file():
        seconds["reward (HH-RLHF)"], accuracy = bench_hh_reward()
        rows["HH-RLHF reward model held-out accuracy (tiny, from scratch)"] = (None, accuracy)
    print("\nstages on held-out test data (tiny model, 2 CPU cores):")
    for name, (before, after) in rows.items():
        print(f"  {name:<58} {'' if before is None else f'{before:.3f} -> '}{after:.3f}")
    print("  wall time: " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items()))
    return {name: after for name, (_, after) in rows.items()}


def bench_hh_reward() -> tuple[float, float]:
    """A tiny reward model from scratch on the shared HH-RLHF sample: wall seconds, held-out accuracy."""
    data = dict(
        source=str(HH_SAMPLE), tokenizer="r50k_base", tokenizer_path=str(R50K), max_length=256, max_prompt_length=192
    )
    flags = [f"--data.{key}={value}" for key, value in data.items()]
    model = str(tiny_config(vocab_size=50257, block_size=256)).replace("'", '"')
    seconds = run_stage(
        "reward",
        *flags,
        "--data.batch_size=16",
        "--data.system_prompt=You are ShrayGPT, a helpful and concise AI assistant.",
        "--model.policy=null",
        f"--model.model_config={model}",
        "--model.export_path=checkpoints/demo/reward-model-hh.ckpt",
        "--trainer.max_steps=300",
    )
    scorer = RewardModel.load_from_checkpoint("checkpoints/demo/reward-model-hh.ckpt")
    return seconds, reward_model_accuracy(scorer, PreferenceDataModule(**data, batch_size=16))
