"""DPO stage: the cached reference equals a frozen copy, the cache survives a resume, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARITH, tiny_trainer
from lightning.pytorch.plugins.precision import Precision

from shraygpt_rl.data import PreferenceDataModule
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.stages.dpo import DPOStage

METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


@pytest.fixture
def policy_path(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "policy.ckpt"
    ShrayGPT(**tiny_config()).save_checkpoint(path)
    return str(path)


def _first_loss(policy_path, precompute, precision="32-true"):
    stage = DPOStage(
        policy=policy_path,
        precompute_ref_logprobs=precompute,
        export_path=None,
        optimizer="adamw",
        lr=0.0,
        loss_type="sigmoid",
        beta=0.5,
    )
    data = PreferenceDataModule(train_size=64, **{**ARITH, "batch_size": 64})
    trainer = tiny_trainer(1, limit_val_batches=0, precision=precision)
    trainer.fit(stage, datamodule=data)
    return stage, trainer.callback_metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_reference_equals_a_frozen_copy(policy_path, loss_type):
    stage = DPOStage(policy=policy_path, precompute_ref_logprobs=False, loss_type=loss_type, export_path=None)
    data = PreferenceDataModule(train_size=64, **ARITH)
    data.setup()
    batch = next(iter(data.plain_dataloader("val")))
    frozen = stage.reference_logps(batch, "val")
    cached = DPOStage(policy=policy_path, loss_type=loss_type, export_path=None)
    cached._trainer = type("T", (), {"datamodule": data, "precision_plugin": Precision()})()  # what _precompute reads
    cached.ref_logps = {"val": cached._precompute("val")}
    chosen, rejected = cached.reference_logps(batch, "val")
    assert torch.allclose(chosen, frozen[0], atol=1e-5) and torch.allclose(rejected, frozen[1], atol=1e-5)
    assert cached.reference is None  # no second model in memory


def test_at_the_start_the_policy_is_its_reference(policy_path):
    for precompute in (True, False):
        stage, metrics = _first_loss(policy_path, precompute)
        assert metrics["train/loss"].item() == pytest.approx(0.6931, abs=1e-3)  # log 2: h = 0
        assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)
        assert set(METRICS) <= set(metrics)


def test_under_bf16_autocast_the_precomputed_reference_is_the_policy_at_step_0(policy_path):
    """The reference pass runs before training (``on_fit_start``), outside the training step:
    it must run in the same autocast as the step, or bf16 rounding alone moves the implicit
    rewards off 0 (issue 33)."""
    stage, metrics = _first_loss(policy_path, precompute=True, precision="bf16-mixed")
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/rejected"].item() == 0.0
    assert metrics["train/loss"].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(("kind", "precompute"), [("opt", True), ("opt", False), ("llama", True)])
def test_dropout_is_off_so_a_hugging_face_policy_starts_at_its_reference(tiny_hf, kind, precompute):
    """Tiny OPT has dropout 0.1 (``nn.Dropout`` and float attributes), tiny Llama an
    ``attention_dropout`` of 0.1 (a float its attention reads in train mode), and Hugging Face
    models start in train mode: with dropout on, the policy's log-probabilities at step 0 would
    differ from the reference's (eval mode), the implicit rewards would not be 0 and the loss not
    log 2."""
    folder = str(tiny_hf(kind))
    policy = DPOStage(policy=folder, export_path=None).policy
    assert policy.training
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train_mode = policy(ids)[0]
        assert torch.equal(train_mode, policy.eval()(ids)[0])  # dropout off: train mode is eval mode
    stage = DPOStage(policy=folder, precompute_ref_logprobs=precompute, export_path=None, lr=0.0, beta=0.5)
    data = PreferenceDataModule(train_size=64, tokenizer="hf", tokenizer_path=folder, **{**ARITH, "batch_size": 64})
    trainer = tiny_trainer(1, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(0.6931, abs=1e-4)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-5)


def test_with_lora_the_reference_is_the_policy_with_adapters_off_batch_by_batch(tiny_hf):
    """No pass over the data before step 1 and no second model: the reference log-probabilities
    come from the adapters-off policy per batch, and at step 0 they are the policy's."""
    from shraygpt_rl.lora import AdaptersDisabled

    folder = str(tiny_hf("opt"))
    lora = {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    stage = DPOStage(policy=folder, lora=lora, export_path=None, lr=0.0, beta=0.5)
    assert isinstance(stage.reference, AdaptersDisabled) and stage.reference.policy is stage.policy
    data = PreferenceDataModule(train_size=64, tokenizer="hf", tokenizer_path=folder, **{**ARITH, "batch_size": 64})
    trainer = tiny_trainer(1, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    assert stage.ref_logps == {}  # nothing precomputed
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(0.6931, abs=1e-4)


def test_reference_cache_survives_a_checkpoint(policy_path, tmp_path):
    stage = DPOStage(policy=policy_path, export_path=None, optimizer="adamw", lr=1e-3)
    data = PreferenceDataModule(train_size=64, **ARITH)
    trainer = tiny_trainer(3, limit_val_batches=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(stage, datamodule=data)
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    restored = DPOStage.load_from_checkpoint(tmp_path / "dpo.ckpt")
    assert set(restored.ref_logps) == {"train", "val", "test"}
    assert torch.equal(restored.ref_logps["train"], stage.ref_logps["train"])
    assert not torch.equal(restored.policy.head.weight, ShrayGPT.load_from_checkpoint(policy_path).head.weight)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
@pytest.mark.parametrize("backend", ["shraygpt", "opt-lora"])
def test_reference_free_losses_keep_no_reference_and_widen_the_margin(policy_path, tiny_hf, backend, loss_type):
    """SimPO and ORPO: no reference model, nothing precomputed; the first step's loss is the pure
    function's on the batch, and a few steps on one batch widen the chosen-over-rejected margin."""
    from shraygpt_rl.losses import orpo_loss, simpo_loss

    folder = str(tiny_hf("opt"))
    hf = {"tokenizer": "hf", "tokenizer_path": folder} if backend == "opt-lora" else {}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    stage = DPOStage(
        policy=folder if hf else policy_path,
        lora=lora if hf else None,
        loss_type=loss_type,
        beta=2.0 if loss_type == "simpo" else 5.0,  # ORPO lambda: at 0.1 its SFT term lifts both answers alike
        export_path=None,
        optimizer="adamw",
        lr=1e-2,
    )
    assert stage.reference is None
    data = PreferenceDataModule(train_size=16, **{**ARITH, "batch_size": 16, **hf})
    data.setup()
    batch = next(iter(data.plain_dataloader("train")))
    with torch.no_grad():
        chosen, rejected, _ = stage.logps(stage.policy.eval(), batch)  # length-averaged
    pure = simpo_loss(chosen, rejected, 2.0, 1.0)[0] if loss_type == "simpo" else orpo_loss(chosen, rejected, 5.0)[0]
    trainer = tiny_trainer(1, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(pure.mean().item(), rel=1e-4)
    if loss_type == "orpo":
        log_odds = orpo_loss(chosen, rejected)[1].mean().item()
        assert trainer.callback_metrics["objective/log_odds_ratio"].item() == pytest.approx(log_odds, rel=1e-4)
    trainer = tiny_trainer(15, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    assert stage.ref_logps == {} and stage.reference is None
    with torch.no_grad():
        trained_chosen, trained_rejected, _ = stage.logps(stage.policy.eval(), batch)
    gain = (trained_chosen - trained_rejected).mean() - (chosen - rejected).mean()
    # Gains at 1 and 2 threads (seed 0): ShrayGPT 1.21 (SimPO), 0.61 (ORPO); OPT + LoRA 0.056 and
    # 0.016 (LoRA's small steps, and the answers share most tokens): the least, divided by 3.
    assert gain > 0.005


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy(policy_path):
    stage = DPOStage(policy=policy_path, beta=0.5, export_path=None, lr=1e-3, muon_lr=1e-2)
    sorting = {"source": "sorting", "digits": 1, "train_size": 960, "val_size": 128, "test_size": 128}
    data = PreferenceDataModule(**{**ARITH, **sorting})  # 960 pairs: two epochs, a quick reference pass
    trainer = tiny_trainer(60, limit_val_batches=0, limit_test_batches=4)
    trainer.fit(stage, datamodule=data)
    metrics = trainer.test(stage, datamodule=data, verbose=False)[0]
    assert metrics["test/rewards/accuracies"] >= 0.8  # 0 at the start: the policy is its reference
    assert metrics["test/rewards/margins"] > 0
