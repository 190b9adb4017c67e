"""One two-process DDP run (Lightning's ``ddp`` strategy, gloo on CPU) covering every stage that
optimises by hand: PPO, GRPO (``dapo``'s token count is a collective) and TRPO (g, every Fisher
product and the line search's figures are averaged). One launch, three fits: the processes and
the process group start once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shraygpt_rl.model import ShrayGPT

pytestmark = pytest.mark.slow

DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from conftest import SpreadReward
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.stages.grpo import GRPOStage
from shraygpt_rl.stages.ppo import PPOStage
from shraygpt_rl.stages.trpo import TRPOStage

class Save(L.Callback):
    def on_train_end(self, trainer, module):
        torch.save(module.state_dict(), f"{{module.kind}}-rank{{trainer.global_rank}}.pt")

common = dict(policy={policy!r}, rewards=[SpreadReward()], max_new_tokens=6, optimizer="adamw", lr=1e-3,
              log_samples_every=0)
stages = [
    PPOStage(**common, export_path="ppo.ckpt"),
    GRPOStage(**common, num_generations=2, loss_type="dapo", num_mini_batches=2, export_path="grpo.ckpt"),
    TRPOStage(**common, export_path=None, vf_iters=2, max_kl=0.05),
]
for stage in stages:
    data = PromptDataModule(source="arithmetic", digits=2, system_prompt=None, max_length=64, max_prompt_length=48,
                            batch_size=4, train_size=32)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
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
    for kind in ("ppo", "grpo", "trpo"):
        ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), kind
        assert any(not torch.equal(ranks[0][f"policy.{k}"], v) for k, v in start.items()), kind
        if kind != "trpo":
            exported = ShrayGPT.load_from_checkpoint(tmp_path / f"{kind}.ckpt").state_dict()
            assert all(torch.equal(exported[k], ranks[0][f"policy.{k}"]) for k in exported), kind
