"""Kahneman-Tversky optimisation (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization") on unpaired examples: each response is labelled desirable or not.

With the implicit reward ``r(x, y) = log pi(y|x) - log pi_ref(y|x)`` and the reference point
``z0 = KL(pi(y'|x) || pi_ref(y'|x))``, the paper's loss (eq. 8) is
``L = E_(x,y)~D [lambda_y - v(x, y)]``, where ``v = lambda_D s(beta (r - z0))`` for a desirable
``y`` and ``lambda_U s(beta (z0 - r))`` for an undesirable one (``s`` the sigmoid;
``losses.kto_loss``). ``z0`` is estimated per batch (§4.1) from mismatched pairs: each prompt
``x_i`` with another example's completion ``y'``, ``z0 = max(0, mean_i [log pi(y'|x_i) -
log pi_ref(y'|x_i)])``, detached (no gradient flows through it), averaged over devices under DDP
(``all_gather``, as TRL does).

Choices and departures:

* Log-probabilities are summed over each completion's tokens, as in the paper and TRL.
* The mismatched completion is a fixed partner per example (``KTODataModule``), not the next row
  of the batch (TRL): with precomputed reference log-probabilities, the mismatched pairs' must be
  known before training, and a partner that depended on the shuffled batch would not be. Over a
  shuffled batch, fixed random partners are as mismatched as shifted rows.
* ``objective/kl`` logs the estimate before the clamp at 0 (``z0`` is it, clamped).
* ``lambda_D`` and ``lambda_U`` are ``desirable_weight`` and ``undesirable_weight``. The paper and
  TRL recommend ``desirable_weight * n_D / (undesirable_weight * n_U)`` in ``[1, 4/3]`` for
  ``n_D`` desirable and ``n_U`` undesirable examples; a training split outside it gets a warning.
  Pairs split in two give ``n_D = n_U``: the default weights, 1 and 1, are in range.

The reference is as in DPO (``CachedReferenceStage``): precomputed in one pass before training
(both the matched and the mismatched pairs' log-probabilities, kept in the checkpoint), a frozen
copy with ``precompute_ref_logprobs: false``, or, with LoRA, the policy with its adapters off.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from shraygpt_rl.errors import require
from shraygpt_rl.generation import sequence_logprobs
from shraygpt_rl.losses import kto_loss
from shraygpt_rl.stages.base import CachedReferenceStage, disable_dropout


class KTOStage(CachedReferenceStage):
    """KTO on unpaired examples (``KTODataModule`` batches).

    Args:
        beta: Scale of the implicit reward inside the sigmoid; larger keeps closer to the reference.
        desirable_weight: lambda_D, the weight of desirable examples' losses.
        undesirable_weight: lambda_U, the weight of undesirable examples' losses.
        precompute_ref_logprobs: Compute the reference log-probabilities (matched and mismatched
            pairs) once before training instead of keeping a frozen reference model; with LoRA the
            adapters-off reference is used batch by batch instead (it costs no memory).
        export_path: Where the aligned policy is written at the end of training.
        **kwargs: ``StageModule``'s arguments (``policy`` is the SFT checkpoint to start from).
    """

    kind = "kto"

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        precompute_ref_logprobs: bool = True,
        export_path: str | None = "checkpoints/shraygpt-kto.ckpt",
        **kwargs,
    ):
        require(beta > 0, f"beta must be > 0, got {beta}.")
        require(
            min(desirable_weight, undesirable_weight) >= 0 and desirable_weight + undesirable_weight > 0,
            "desirable_weight and undesirable_weight must be >= 0 and not both 0, "
            f"got {desirable_weight} and {undesirable_weight}.",
        )
        super().__init__(export_path=export_path, **kwargs)
        self.policy = disable_dropout(self.build_policy())
        self.keep_reference(not precompute_ref_logprobs)
        self.ref_logps: dict[str, Tensor] = {}  # split -> (rows, 2): matched, mismatched

    def trainable(self):
        return self.policy

    def check_data(self, datamodule) -> None:
        """Warn when the weighted desirable-to-undesirable ratio is outside the recommended [1, 4/3]."""
        train = getattr(datamodule, "splits", {}).get("train")
        if train is None or "label" not in train.column_names:
            return
        desirable = sum(list(train["label"]))
        undesirable = len(train) - desirable
        hp = self.hparams
        if desirable and undesirable and hp.undesirable_weight:
            ratio = hp.desirable_weight * desirable / (hp.undesirable_weight * undesirable)
            if not 1 <= ratio <= 4 / 3:
                rank_zero_warn(
                    f"desirable_weight * {desirable} desirable / (undesirable_weight * {undesirable} undesirable) "
                    f"is {ratio:.2f}; KTO's authors recommend weights that put it in [1, 4/3]."
                )

    # -- log-probabilities ---------------------------------------------------------------------
    def logps(self, model, batch: dict[str, Any], prefix: str = "") -> tuple[Tensor, Tensor]:
        """Summed completion log-probabilities (B,) under ``model`` and the aux loss; ``prefix``
        ``kl_`` scores the mismatched pairs."""
        ids, attention = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]  # (B, T)
        return sequence_logprobs(model, ids, attention, batch[f"{prefix}response_mask"])

    def reference_columns(self, model, batch) -> Tensor:
        matched, mismatched = self.logps(model, batch)[0], self.logps(model, batch, "kl_")[0]
        return torch.stack([matched, mismatched], dim=1)  # (B, 2)

    def kl_estimate(self, batch, ref_mismatched: Tensor) -> Tensor:
        """The batch's mean of ``log pi - log pi_ref`` over the mismatched pairs, averaged over
        devices (a no-op on one): z0 before the clamp. No gradient: kto_loss detaches it anyway."""
        with torch.no_grad():
            mismatched, _ = self.logps(self.policy, batch, "kl_")  # (B,)
        return self.all_gather((mismatched - ref_mismatched).mean()).mean()

    # -- steps ---------------------------------------------------------------------------------
    def step(self, batch, split: str) -> Tensor:
        reference = self.cached_reference(batch, split)  # (B, 2)
        kl = self.kl_estimate(batch, reference[:, 1])
        logps, aux_loss = self.logps(self.policy, batch)  # last forward: the one log_moe reports
        hp = self.hparams
        losses, rewards = kto_loss(
            logps, reference[:, 0], batch["label"], kl, hp.beta, hp.desirable_weight, hp.undesirable_weight
        )
        self.log_metrics(split, losses, rewards, logps.detach(), batch["label"], kl)
        self.log_moe(self.policy, aux_loss, prefix="" if split == "train" else f"{split}/")
        return losses.mean() + self.aux_weight(self.policy) * aux_loss

    def log_metrics(self, split: str, losses: Tensor, rewards: Tensor, logps: Tensor, desirable: Tensor, kl: Tensor):
        """The loss, z0's estimate, and each group's mean reward and log-probability. A group
        absent from the batch logs nothing (its mean would be NaN); each group's epoch mean is
        weighted by its size, so it is the mean over all of that group's examples."""
        train = split == "train"
        prefix = "" if train else f"{split}/"
        options = dict(on_step=train, on_epoch=not train)
        self.log(f"{split}/loss", losses.mean(), batch_size=losses.numel(), **options)
        self.log(f"{prefix}objective/kl", kl, batch_size=losses.numel(), **options)
        means = {}
        for name, mask in (("chosen", desirable), ("rejected", ~desirable)):  # (B,) bool
            count = int(mask.sum())
            if count:
                means[name] = rewards[mask].mean()
                metrics = {f"{prefix}rewards/{name}": means[name], f"{prefix}logps/{name}": logps[mask].mean()}
                self.log_dict(metrics, batch_size=count, **options)
        if len(means) == 2:
            self.log(
                f"{prefix}rewards/margins", means["chosen"] - means["rejected"], batch_size=losses.numel(), **options
            )
