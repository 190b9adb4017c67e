"""What every stage shares: where the policy comes from, the frozen reference, the optimizer and
its schedule, MoE monitoring, the non-finite-loss guard, checkpoint bookkeeping and the export;
and what the offline stages (DPO, KTO) share: reference log-probabilities, cached or not."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from shraygpt_rl.checkpoint import check_writable, stamp, stamped
from shraygpt_rl.errors import TrainingError, require
from shraygpt_rl.lora import AdaptersDisabled, LoRASpec, trainable_fraction
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.optim import OptimizerName, build_optimizer
from shraygpt_rl.policy import export_policy, load_policy, with_lora
from shraygpt_rl.policy import policy_config as describe_policy
from shraygpt_rl.runtime import retain_freed_memory
from shraygpt_rl.stages.checks import check_finite, check_folder_writable, check_lengths, check_tokenizer


class StageModule(L.LightningModule):
    """Base of the stage LightningModules.

    Args:
        policy: What to start from: the course's ``shraygpt-instruct.ckpt``, a policy this project
            exported, any stage's Lightning checkpoint, a Hugging Face causal LM (hub name such as
            ``roneneldan/TinyStories-33M``, or a ``save_pretrained`` folder), or an adapter folder
            an earlier LoRA stage exported (merged into its base). None: a fresh model built from
            ``model_config``.
        model_config: ``ShrayGPT`` arguments for a fresh model; None means the tiny CPU model
            (2 layers, 4 experts, vocabulary 320 for the byte tokenizer).
        optimizer: ``muon_adamw`` (the course's split) or ``adamw``.
        lr: AdamW learning rate (all parameters for ``adamw``; embeddings, heads, norms otherwise).
        muon_lr: Muon learning rate for the 2-D hidden matrices.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up.
        lr_schedule: ``constant`` after warm-up, or ``cosine`` decay to 10% over the run.
        aux_loss_weight: Weight of the MoE load-balancing loss; None takes the checkpoint's.
        export_path: Where the trained model is written at the end of training, in a format the
            next stage reads by path; None to skip. A model with non-finite weights or outputs is
            never exported: the run stops with one sentence instead.
        max_nonfinite: Stop the run once this many updates in a row had a non-finite loss (each is
            skipped, counted in ``train/nonfinite_skipped``, and still counts towards ``max_steps``).
        lora: LoRA adapters instead of full fine-tuning, e.g. ``{r: 16, alpha: 32, dropout: 0.05,
            target_modules: [q_proj, v_proj]}`` (``lora.LoRASpec``); null: full fine-tuning. The base
            is frozen; the reference is the same model with its adapters off.
        export_merged: With LoRA and a Hugging Face policy, also export the merged model (in
            ``<export_path>/merged``). A ShrayGPT export is always merged (the course's format).
    """

    kind = "stage"

    def __init__(
        self,
        policy: str | None = None,
        model_config: dict[str, Any] | None = None,
        optimizer: OptimizerName = "muon_adamw",
        lr: float = 3e-4,
        muon_lr: float = 1.5e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        aux_loss_weight: float | None = None,
        export_path: str | None = None,
        max_nonfinite: int = 10,
        lora: dict[str, Any] | None = None,
        export_merged: bool = False,
    ):
        super().__init__()
        LoRASpec.parse(lora)  # a bad spec fails here, in one sentence
        require(lr >= 0 and muon_lr >= 0, f"Learning rates must be >= 0, got lr={lr} and muon_lr={muon_lr}.")
        require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}.")
        require(warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}.")
        require(
            aux_loss_weight is None or aux_loss_weight >= 0, f"aux_loss_weight must be >= 0, got {aux_loss_weight}."
        )
        require(max_nonfinite >= 1, f"max_nonfinite must be at least 1, got {max_nonfinite}.")
        # Also collects the subclass's __init__ arguments; reward-function objects stay out of the
        # checkpoint (it must load with weights_only=True) and come back from the config.
        self.save_hyperparameters(ignore=["rewards", "environment"])
        self.nonfinite_skipped = 0  # updates skipped for a non-finite loss or gradient, over the whole run
        self.nonfinite_in_a_row = 0
        self.reference: nn.Module | None = None

    # -- building ------------------------------------------------------------------------------
    def build_policy(self) -> nn.Module:
        """The starting policy (either backend, ``shraygpt_rl.policy``): from ``policy`` if given,
        else a fresh ShrayGPT from ``model_config``; with adapters when ``lora`` is set."""
        hp = self.hparams
        model = load_policy(hp.policy) if hp.policy else ShrayGPT(**(hp.model_config or tiny_config()))
        spec = LoRASpec.parse(hp.lora)
        return with_lora(model, spec) if spec else model

    def frozen_reference(self, model: nn.Module | None) -> None:
        """Keep the starting ``model`` as ``self.reference`` (None: no reference).

        With LoRA adapters the reference is ``model`` itself with its adapters off (no copy);
        otherwise a frozen copy. Either stays outside the module tree: it is not trained and not
        checkpointed (a resumed run rebuilds it from ``policy``), and ``reference_model`` moves it
        to the stage's device.
        """
        if model is None:
            frozen = None
        elif getattr(model, "lora", None):
            frozen = AdaptersDisabled(model)
        else:
            frozen = copy.deepcopy(model).requires_grad_(False).eval()
        object.__setattr__(self, "reference", frozen)  # plain attribute: not a submodule

    def reference_model(self) -> nn.Module:
        """The frozen reference on the stage's device (a no-op after the first call)."""
        return self.reference.to(self.device)

    def aux_weight(self, model: nn.Module) -> float:
        weight = self.hparams.aux_loss_weight
        return model.aux_loss_weight if weight is None else weight

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates."""
        return self

    # -- checks before training ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check, before any training, that the data fits the model and that every file the run
        will write can be written (``stages/checks.py``)."""
        if self._trainer and self.trainer.strategy.root_device.type == "cpu":
            retain_freed_memory()  # big logits tensors: reuse freed memory instead of page-faulting
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if getattr(datamodule, "tokenizer", None) is not None:
            config, data = self.policy_config(), datamodule.hparams
            check_tokenizer(datamodule.tokenizer, config["vocab_size"])
            check_lengths(config["block_size"], data.max_length, data.max_prompt_length, self.new_tokens())
            self.check_data(datamodule)
        if stage == "fit" and self._trainer:
            if self.hparams.export_path:
                check_writable(self.export_target())
                check_folder_writable(self.export_target().parent, "export")
            for callback in self.trainer.checkpoint_callbacks:
                if getattr(callback, "dirpath", None):
                    check_folder_writable(callback.dirpath, "checkpoints")

    def new_tokens(self) -> int | None:
        """Tokens the stage generates after each prompt (the online stages); None: it generates none."""
        return None

    def check_data(self, datamodule) -> None:
        """Stage-specific checks of the data (the online stages check their rewards against it)."""

    def trained_policy(self) -> nn.Module:
        """The policy this stage trains (the reward stage: its reward model's trunk)."""
        return self.policy

    def policy_config(self) -> dict[str, Any]:
        return describe_policy(self.trained_policy())

    def policy_tokenizer(self) -> tuple[str, str] | None:
        """``("hf", name_or_folder)`` when the policy comes with its own tokenizer (a Hugging Face
        model): the DataModule's default tokenizer is then that one (``runner.run_stage`` sets it)."""
        source = self.trained_policy().tokenizer_source
        return ("hf", source) if source else None

    def on_train_start(self) -> None:
        """Say, and log, how many parameters train: with LoRA, the adapters and heads only."""
        trainable, total = trainable_fraction(self.trainable())
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        if self.logger is not None:
            self.logger.log_metrics({"policy/trainable_fraction": trainable / max(total, 1)}, step=0)

    # -- optimization --------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(
            self.trainable(), hp.optimizer, lr=hp.lr, muon_lr=hp.muon_lr, weight_decay=hp.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer else 1
        offset = self.schedule_offset()

        def factor(step: int) -> float:  # full lr for the first `offset` steps, then the schedule
            return 1.0 if step < offset else lr_factor(step - offset, hp, max(total - offset, 1))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def schedule_offset(self) -> int:
        """Optimizer steps taken at the full ``lr`` before the schedule (warm-up, cosine) starts."""
        return 0

    def finite_or_skip(self, loss: Tensor) -> Tensor | None:
        """``loss``, or None when it is not finite: Lightning then runs the step without gradients,
        so the parameters stay as they were and the step still counts towards ``max_steps``.

        Skipped updates are counted in ``train/nonfinite_skipped``. A finite loss can still give
        a non-finite gradient: ``on_before_optimizer_step`` drops those updates the same way.
        Under DDP every rank must skip together (the gradients, all-reduced, agree; a loss on one
        rank does not); with one bad rank, prefer ``--trainer.detect_anomaly`` to find the cause.
        """
        if torch.isfinite(loss):
            return loss
        self.count_nonfinite()
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        """The guard's second half: an update whose gradients are not all finite (with a finite
        loss: ORPO's at a certain answer, an overflow in the backward) is dropped like a
        non-finite loss's: its gradients are cleared, so the optimizer leaves every parameter
        (and its moments) as it was, and the skip is counted. One host sync per update. Under
        ``16-mixed`` the GradScaler owns this: an overflow there is how it finds its scale.

        An update with gradients to apply ends a run of skips; one without any (every part of it
        dropped for its loss, already counted) does not. Under ``accumulate_grad_batches`` a
        dropped micro-batch leaves the others' gradients, which still make an update."""
        grads = [p.grad for p in self.trainable().parameters() if p.grad is not None]
        if not grads:
            return
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # fp16's GradScaler
        if not scaled and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            optimizer.zero_grad(set_to_none=True)
            self.count_nonfinite()
        else:
            self.nonfinite_in_a_row = 0

    def count_nonfinite(self) -> None:
        """Count one skipped update; stop the run after ``max_nonfinite`` of them in a row."""
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient (NaN or inf), so "
                "training stopped; lower the learning rate (--model.lr, --model.muon_lr) or check the starting model."
            )

    # -- monitoring ----------------------------------------------------------------------------
    def log_moe(self, model: nn.Module, aux_loss: Tensor, prefix: str = "") -> None:
        """``moe/aux_loss``, ``moe/load_max`` (busiest expert's share over the uniform share, 1 =
        balanced) and ``moe/router_entropy`` of the last forward (a dense model logs none)."""
        stats = model.moe_stats()
        if not stats:
            return
        experts = stats["load"].size(-1)
        on_step = not prefix
        self.log(f"{prefix}moe/aux_loss", aux_loss.detach(), on_step=on_step, on_epoch=not on_step)
        self.log(f"{prefix}moe/load_max", stats["load"].max() * experts, on_step=on_step, on_epoch=not on_step)
        self.log(f"{prefix}moe/router_entropy", stats["router_entropy"].mean(), on_step=on_step, on_epoch=not on_step)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp(checkpoint, kind=self.kind, policy_config=self.policy_config(), nonfinite_skipped=self.nonfinite_skipped)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = stamped(checkpoint).get("nonfinite_skipped", 0)

    # -- export --------------------------------------------------------------------------------
    def exported_model(self) -> nn.Module:
        """What ``export_path`` receives at the end of training: the policy, unless overridden."""
        return self.policy

    def export_target(self) -> Path:
        """``export_path``; for a Hugging Face policy, a folder (without the ``.ckpt`` suffix)."""
        path = Path(self.hparams.export_path)
        if self.exported_model() is self.trained_policy() and self.policy_tokenizer() and path.suffix == ".ckpt":
            return path.with_suffix("")
        return path

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            model, path = self.exported_model(), self.export_target()
            check_finite(model, str(path))
            if model is self.trained_policy():
                export_policy(model, path, self.kind, self.hparams.export_merged, started_from=self.hparams.policy)
            else:
                model.save_checkpoint(str(path), stage=self.kind)


class CachedReferenceStage(StageModule):
    """A stage whose loss compares the policy with its reference on fixed data (DPO, KTO).

    The reference's log-probabilities come from the kept reference model (``frozen_reference``)
    batch by batch, or, when none is kept, from one pass of the untrained policy over each split
    before training: ``ref_logps[split]`` (rows, K), saved with the checkpoint so that a resumed
    run never recomputes them from a trained policy. A subclass sets ``self.ref_logps = {}`` and
    defines ``reference_columns``; batches carry each row's ``index`` in its split.
    """

    ref_logps: dict[str, Tensor]

    def reference_columns(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """The (B, K) log-probabilities the loss needs from the reference, under ``model``."""
        raise NotImplementedError

    def needs_reference_pass(self) -> bool:
        """Whether ``on_fit_start`` must precompute: no reference model is kept."""
        return self.reference is None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.needs_reference_pass() and not self.ref_logps:
            self.ref_logps = {split: self._precompute(split) for split in ("train", "val", "test")}

    @torch.no_grad()
    def _precompute(self, split: str) -> Tensor:
        """One pass of the (still untrained) policy over a split, in eval mode: (rows, K).

        It runs in the precision plugin's forward context, the one the training step runs in
        (``bf16-mixed``: autocast), so that at step 0 the policy's log-probabilities equal these
        exactly; outside it, ``on_fit_start`` would compute them in float32."""
        datamodule = self.trainer.datamodule
        datamodule.setup("fit")
        out = None
        was_training = self.policy.training
        self.policy.eval()
        precision = self.trainer.precision_plugin
        for batch in datamodule.plain_dataloader(split, desc=f"Reference logprobs ({split})"):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            with precision.forward_context():
                columns = self.reference_columns(self.policy, batch).float().cpu()  # (B, K)
            if out is None:
                out = torch.zeros(len(datamodule.splits[split]), columns.size(1))
            out[batch["index"].cpu()] = columns
        self.policy.train(was_training)
        return out

    def cached_reference(self, batch: dict[str, Any], split: str) -> Tensor:
        """``reference_columns`` of the reference for ``batch`` (B, K): computed, or looked up."""
        if self.reference is not None:
            with torch.no_grad():
                return self.reference_columns(self.reference_model(), batch)
        return self.ref_logps[split][batch["index"].cpu()].to(self.device)

    def keep_reference(self, keep: bool) -> None:
        """Keep the starting policy as the reference when ``keep`` or with LoRA (the adapters-off
        policy costs no memory and no pass); otherwise none, and ``on_fit_start`` precomputes."""
        free = getattr(self.policy, "lora", None) is not None
        self.frozen_reference(self.policy if keep or free else None)

    def step(self, batch: dict[str, Any], split: str) -> Tensor:
        """The loss of ``batch`` (logging its metrics under ``split``)."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        return self.finite_or_skip(self.step(batch, "train"))

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        stamp(checkpoint, ref_logps=self.ref_logps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ref_logps = stamped(checkpoint).get("ref_logps", {})  # never recompute after training


def lr_factor(step: int, hp, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then constant or cosine down to 10%."""
    if step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    if hp.lr_schedule == "constant":
        return 1.0
    progress = min((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch dropout off (as TRL does in RL and DPO): the log-probabilities that score a rollout,
    or a reference, must come from the same function as those of the first update, so that the
    ratio starts at 1 and DPO's implicit rewards at 0. Hugging Face models start in train mode,
    and OPT's dropout is 0.1.

    Besides every ``nn.Dropout``, modules keep dropout as plain float attributes that their
    forward reads in train mode: OPT's ``dropout``, Llama/Qwen/Mistral/Gemma's
    ``attention_dropout``, BART-style ``activation_dropout``, and OPT's ``layerdrop`` (whole
    layers skipped at random). Every float attribute whose name ends in ``dropout`` or is
    ``layerdrop`` is set to 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and (name.endswith("dropout") or name == "layerdrop"):
                setattr(module, name, 0.0)
    return model
