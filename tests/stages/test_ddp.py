"""One two-process DDP run (Lightning's ``ddp`` strategy, gloo on CPU) covering every stage that
optimises by hand or gathers across ranks: PPO (a critic warm-up rollout, then one rank's
``target_kl`` stops its epochs early: the other must stop too), GRPO (``dapo``'s token count and
``scale_rewards: batch``'s rewards are collectives), TRPO (g, every Fisher product and the line
search's figures are averaged; the adaptive KL coefficient moves on every rank's KL), Online DPO
(each rank must run as many backward passes, ties or not, and normalise by the pairs of all
ranks: here one rank's prompts all tie) and KTO (z0 is gathered over ranks: its value before the
clamp is recorded, and must be the same on both). One launch, five fits: the processes and the
process group start once. Each rank records the rows it saw: the ranks must see different ones,
or equal weights at the end would prove nothing about gradient sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shraygpt_rl.model import ShrayGPT

pytestmark = pytest.mark.slow

DDP_SCRIPT = """
import json, os, sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from conftest import SpreadReward
from shraygpt_rl.data import KTODataModule, PromptDataModule
from shraygpt_rl.stages.grpo import GRPOStage
from shraygpt_rl.stages.kto import KTOStage
from shraygpt_rl.stages.online_dpo import OnlineDPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.trpo import TRPOStage

class RankTies(SpreadReward):  # every prompt of rank 1 ties: it has no pair, rank 0 has several
    def __call__(self, prompts, responses, metadata):
        spread = super().__call__(prompts, responses, metadata)
        return torch.full_like(spread, 0.5) if torch.distributed.get_rank() == 1 else spread

class Save(L.Callback):
    prompts, first_step_moved_policy = [], None

    def on_train_start(self, trainer, module):
        self.start = [p.detach().clone() for p in module.policy.parameters()]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):  # a row's index, else its prompt
        self.prompts += batch["index"].tolist() if "index" in batch else batch["prompt"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0:  # PPO's first rollout is its critic's warm-up
            moved = any(not torch.equal(a, p) for a, p in zip(self.start, module.policy.parameters()))
            self.first_step_moved_policy = moved

    def on_train_end(self, trainer, module):
        torch.save(module.state_dict(), f"{{module.kind}}-rank{{trainer.global_rank}}.pt")
        with open(f"{{module.kind}}-rank{{trainer.global_rank}}.json", "w") as f:
            json.dump({{"prompts": self.prompts, "skipped": module.nonfinite_skipped, "steps": trainer.global_step,
                       "first_step_moved_policy": self.first_step_moved_policy,
                       "kl_coef": getattr(getattr(module, "kl_ctl", None), "value", None),
                       "z0": getattr(module, "last_z0", None)}}, f)
        self.prompts = []

common = dict(policy={policy!r}, rewards=[SpreadReward()], max_new_tokens=6, optimizer="adamw", lr=1e-3,
              log_samples_every=0)
sizes = dict(source="arithmetic", digits=2, system_prompt=None, max_length=64, max_prompt_length=48, batch_size=4,
             train_size=32)
# PPO: a first rollout that trains the critic alone (the policy's gradients are dropped on both
# ranks), then one in which rank 1 stops its epochs at target_kl after the second update and
# rank 0 never would: they must stop together (each update's backward passes are all-reduces).
target_kl = 1e-6 if os.environ.get("LOCAL_RANK", "0") == "1" else 1e9
stages = [
    (PPOStage(**common, target_kl=target_kl, num_ppo_epochs=2, num_mini_batches=2, critic_warmup=1,
              export_path="ppo.ckpt"), PromptDataModule, 5),  # 4 warm-up steps, then 2 before the stop
    (GRPOStage(**common, num_generations=2, loss_type="dapo", scale_rewards="batch", num_mini_batches=2,
               export_path="grpo.ckpt"),
     PromptDataModule, 4),
    (TRPOStage(**common, export_path=None, vf_iters=2, max_kl=0.05, adaptive_kl=True, kl_coef=0.1, kl_target=0.005),
     PromptDataModule, 4),
    (OnlineDPOStage(**{{**common, "rewards": [RankTies()]}}, num_generations=2, micro_batch_size=2,
                    export_path="online-dpo.ckpt"), PromptDataModule, 4),
    (KTOStage(policy={policy!r}, optimizer="adamw", lr=1e-3, export_path="kto.ckpt"), KTODataModule, 4),
]
kto = stages[-1][0]
estimate = kto.kl_estimate

def recorded(batch, ref_mismatched):  # KTO's z0 before the clamp: gathered, the same on every rank
    z0 = estimate(batch, ref_mismatched)
    kto.last_z0 = float(z0)
    return z0

kto.kl_estimate = recorded
for stage, datamodule, max_steps in stages:
    data = datamodule(**sizes)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Save()])
    trainer.fit(stage, datamodule=data)
"""


def test_ddp_ranks_take_the_same_steps_in_every_manually_optimised_stage(random_policy, tmp_path):
    """The two ranks see different prompts, yet end each stage with the same weights (policy and
    critic), which moved from the start; rank 0 exports what it trained."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), policy=random_policy))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    start = ShrayGPT.load_from_checkpoint(random_policy).state_dict()
    for kind in ("ppo", "grpo", "trpo", "online_dpo", "kto"):
        seen = [json.loads((tmp_path / f"{kind}-rank{r}.json").read_text()) for r in (0, 1)]
        # Different data on each rank: otherwise equal weights would hold without any gradient sync.
        assert seen[0]["prompts"] and set(seen[0]["prompts"]).isdisjoint(seen[1]["prompts"]), kind
        assert seen[0]["skipped"] == seen[1]["skipped"] == 0, kind
        assert seen[0]["kl_coef"] == seen[1]["kl_coef"], kind  # adaptive (TRPO): moved on every rank's KL
        assert seen[0]["z0"] == seen[1]["z0"] and (seen[0]["z0"] is None) == (kind != "kto"), kind
        if kind == "trpo":
            assert seen[0]["kl_coef"] != 0.1
        if kind == "ppo":  # the warm-up left the policy alone on both ranks; both stopped after 2 updates
            assert [r["first_step_moved_policy"] for r in seen] == [False, False]
            assert [r["steps"] for r in seen] == [6, 6]
        ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), kind
        assert any(not torch.equal(ranks[0][f"policy.{k}"], v) for k, v in start.items()), kind
        if kind != "trpo":
            exported = ShrayGPT.load_from_checkpoint(tmp_path / f"{kind.replace('_', '-')}.ckpt").state_dict()
            assert all(torch.equal(exported[k], ranks[0][f"policy.{k}"]) for k in exported), kind
