"""KTO stage: the loss is ``losses.kto_loss`` of the policy and reference log-probabilities, with
z0 from the mismatched pairs; the cached reference equals a frozen copy; with LoRA the reference
is the adapters-off policy; empty groups log no NaN; a few steps separate the two labels."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import ARITH, LEARNING_SEED, tiny_trainer
from lightning.pytorch.plugins.precision import Precision

from shraygpt_rl.data import KTODataModule
from shraygpt_rl.generation import sequence_logprobs
from shraygpt_rl.losses import kto_loss
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages.kto import KTOStage

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
METRICS = ["train/loss", "objective/kl", "rewards/chosen", "rewards/rejected", "rewards/margins"]
METRICS += ["logps/chosen", "logps/rejected"]
# 8 pairs, so one batch of 16 holds the whole training split whatever the shuffle.
DATA = {**ARITH, "train_size": 8, "val_size": 8, "test_size": 8, "batch_size": 16}


def _data(backend: str, folder: str, **overrides) -> KTODataModule:
    hf = {"tokenizer": "hf", "tokenizer_path": folder} if backend == "opt-lora" else {}
    return KTODataModule(**{**DATA, **hf, **overrides})


def _stage(backend: str, policy_path: str, folder: str, **options) -> KTOStage:
    hf = backend == "opt-lora"
    options = {"export_path": None, "optimizer": "adamw", "lr": 0.0, **options}
    return KTOStage(policy=folder if hf else policy_path, lora=LORA if hf else None, **options)


def _scores(model, batch, prefix: str = "") -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(
            model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}response_mask"]
        )[0]


def _by_hand(policy, reference, batch, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO's loss and rewards from ``sequence_logprobs`` of both models, row by row of the batch."""
    kl = (_scores(policy, batch, "kl_") - _scores(reference, batch, "kl_")).mean()
    logps, ref = _scores(policy, batch), _scores(reference, batch)
    losses, rewards = kto_loss(logps, ref, batch["label"], kl, beta, desirable_weight, undesirable_weight)
    return losses.mean(), rewards, kl


@pytest.mark.parametrize("backend", ["shraygpt", "opt-lora"])
def test_the_first_loss_is_kto_loss_of_policy_and_reference(random_policy, tiny_hf, perturb_adapters, backend):
    """The policy is moved away from its reference first (weights, or adapters), so that rewards
    and z0 are not 0: the logged loss, KL and rewards are then the pure function's on the batch."""
    folder = str(tiny_hf("opt"))
    stage = _stage(backend, random_policy, folder, precompute_ref_logprobs=False, beta=0.5, desirable_weight=1.3)
    if backend == "opt-lora":
        from shraygpt_rl.lora import AdaptersDisabled

        assert isinstance(stage.reference, AdaptersDisabled) and stage.reference.policy is stage.policy
        perturb_adapters(stage.policy, scale=0.05)
        reference = stage.reference
    else:
        reference = ShrayGPT.load_from_checkpoint(random_policy).eval()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in stage.policy.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    data = _data(backend, folder)
    data.setup()
    batch = next(iter(data.plain_dataloader("train")))
    loss, rewards, kl = _by_hand(stage.policy.eval(), reference, batch, 0.5, desirable_weight=1.3)
    trainer = tiny_trainer(1, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    metrics = trainer.callback_metrics
    assert stage.ref_logps == {}  # a kept reference (copy or adapters off): nothing precomputed
    assert abs(kl.item()) > 1e-3 and metrics["objective/kl"].item() == pytest.approx(kl.item(), rel=1e-3, abs=1e-4)
    assert metrics["train/loss"].item() == pytest.approx(loss.item(), rel=1e-4)
    chosen, rejected = rewards[batch["label"]].mean(), rewards[~batch["label"]].mean()
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen.item(), rel=1e-3, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(rejected.item(), rel=1e-3, abs=1e-5)


def test_precomputed_reference_equals_a_frozen_copy_and_survives_a_checkpoint(random_policy):
    frozen = KTOStage(policy=random_policy, precompute_ref_logprobs=False, export_path=None)
    data = KTODataModule(**DATA)
    data.setup()
    batch = next(iter(data.plain_dataloader("val")))
    expected = frozen.cached_reference(batch, "val")  # (B, 2): matched, mismatched
    cached = KTOStage(policy=random_policy, export_path=None)
    assert cached.reference is None  # no second model in memory
    cached._trainer = type("T", (), {"datamodule": data, "precision_plugin": Precision()})()  # what _precompute reads
    cached.ref_logps = {"val": cached._precompute("val")}
    assert cached.ref_logps["val"].shape == (len(data.splits["val"]), 2)
    assert torch.allclose(cached.cached_reference(batch, "val"), expected, atol=1e-5)
    checkpoint: dict = {}
    cached.on_save_checkpoint(checkpoint)
    restored = KTOStage(policy=random_policy, export_path=None)
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(restored.ref_logps["val"], cached.ref_logps["val"])


@pytest.mark.parametrize("precompute", [True, False])
def test_at_the_start_the_policy_is_its_reference(random_policy, precompute):
    """Rewards and z0 are 0, so each example's loss is half its weight."""
    options = dict(precompute_ref_logprobs=precompute, export_path=None, lr=0.0, desirable_weight=1.2)
    stage = KTOStage(policy=random_policy, **options)
    trainer = tiny_trainer(1, limit_val_batches=1)
    trainer.fit(stage, datamodule=KTODataModule(**DATA))
    metrics = trainer.callback_metrics
    assert set(METRICS) <= set(metrics) and {"val/loss", "val/rewards/margins", "val/objective/kl"} <= set(metrics)
    assert metrics["train/loss"].item() == pytest.approx((1.2 + 1.0) / 4, abs=1e-5)  # half chosen, half rejected
    assert metrics["objective/kl"].item() == pytest.approx(0.0, abs=1e-4)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)
    assert set(stage.ref_logps) == ({"train", "val", "test"} if precompute else set())


def test_under_bf16_autocast_the_precomputed_reference_is_the_policy_at_step_0(random_policy):
    """The reference pass (``on_fit_start``, outside the step) runs in the step's autocast: at
    step 0 every reward and z0 are exactly 0 (issue 33)."""
    stage = KTOStage(policy=random_policy, export_path=None, lr=0.0)
    trainer = tiny_trainer(1, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(stage, datamodule=KTODataModule(**DATA))
    metrics = trainer.callback_metrics
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/rejected"].item() == 0.0
    assert metrics["objective/kl"].item() == 0.0
    assert metrics["train/loss"].item() == pytest.approx(1.0 / 2, abs=1e-6)  # sigmoid(0) = 1/2 of each weight


def test_a_batch_without_undesirable_examples_logs_no_nan(random_policy, tmp_path):
    rows = [
        {"prompt": f"User: What is {i} + 1?\n\nAssistant:", "completion": f"Answer: {i + 1}", "label": True}
        for i in range(12)
    ]
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = KTOStage(policy=random_policy, export_path=None, optimizer="adamw", lr=1e-3)
    data = KTODataModule(**{**DATA, "source": str(path), "val_size": 2, "test_size": 2})
    trainer = tiny_trainer(2, limit_val_batches=1)
    trainer.fit(stage, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "rewards/chosen" in metrics and "rewards/rejected" not in metrics and "rewards/margins" not in metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_weights_outside_the_recommended_ratio_are_warned_about(random_policy):
    data = KTODataModule(**DATA)
    data.setup()
    KTOStage(policy=random_policy, export_path=None).check_data(data)  # 1 * 8 / (1 * 8): in range
    with pytest.warns(UserWarning, match=r"is 3.00; KTO's authors recommend weights that put it in \[1, 4/3\]"):
        KTOStage(policy=random_policy, export_path=None, desirable_weight=3.0).check_data(data)


@pytest.mark.parametrize("backend", ["shraygpt", "opt-lora"])
def test_a_few_steps_put_desirable_rewards_above_undesirable_ones(random_policy, tiny_hf, backend):
    """On the arithmetic pairs, unpaired: from 0 at the start (the policy is its reference), 20
    steps on the training split (one batch) open a margin between the desirable and the
    undesirable examples' implicit rewards. The held-out margin is printed, not asserted: a random
    policy's moves from 8 pairs do not reliably carry over to new problems."""
    folder = str(tiny_hf("opt"))
    lr = 1e-2 if backend == "opt-lora" else 3e-3
    L.seed_everything(LEARNING_SEED)  # the shuffle, and LoRA's initial A
    stage = _stage(backend, random_policy, folder, lr=lr, beta=0.5)
    data = _data(backend, folder)  # one batch: the whole training split
    trainer = tiny_trainer(20, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    margins = {}
    for split in ("train", "val"):  # every example of the split
        rewards, labels = [], []
        for batch in data.plain_dataloader(split):
            rewards.append(_scores(stage.policy.eval(), batch) - stage.cached_reference(batch, split)[:, 0])
            labels.append(batch["label"])
        rewards, labels = torch.cat(rewards), torch.cat(labels)  # (N,)
        margins[split] = (rewards[labels].mean() - rewards[~labels].mean()).item()
    print(f"\nKTO margins {backend} seed={LEARNING_SEED} threads={torch.get_num_threads()}: {margins}")
    # Training margins over seeds 0-2 at 1 and 2 threads: ShrayGPT 12.73 to 14.39, OPT + LoRA 0.617
    # to 0.625 (held out: ShrayGPT -0.80 to 1.44, OPT 0.12 to 0.15); the least, halved.
    assert margins["train"] > (6.0 if backend == "shraygpt" else 0.3), margins
