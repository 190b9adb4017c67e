"""TRPO (Schulman et al., 2015) for language models, on PPO's rollout, critic and rewards.

One step: sample one response per prompt and score it exactly as PPO does (``CriticStage``: the
per-token ``-kl_coef * KL`` reward against the reference, GAE, whitened advantages). Then, for
the policy, there is no optimizer:

1. ``g``, the gradient of the surrogate ``L(theta) = E[pi_theta / pi_old * A]`` (a mean over the
   rollout's response tokens), is taken at the rollout policy, where the ratio is 1.
2. ``x ~ (H + damping I)^-1 g`` comes from ``cg_iters`` steps of conjugate gradient, where ``H``
   is the Hessian of the mean token ``KL(pi_old || pi_theta)`` at the rollout policy (its Fisher
   matrix) and each product ``H v`` is a double backward pass (Pearlmutter, 1994).
3. The full step ``sqrt(2 max_kl / x^T H x) x`` is tried, then shrunk by ``backtrack_ratio`` up
   to ``max_backtracks`` times; the first size at which the surrogate improves and the exact KL
   measured on the rollout is at most ``max_kl`` is kept. If none is, the parameters are put back
   bit for bit and the failure is counted.

The critic is trained by its own optimizer, ``vf_iters`` minibatch steps per rollout, on PPO's
clipped value loss. Only trainable parameters take part (with LoRA, the adapters).

Departures from the paper, as in Spinning Up's TRPO: the KL of the constraint and of the line
search is the exact KL over the vocabulary per response token, averaged over tokens (the paper's
``KL-bar``), so the old log-probability tables of the rollout's response positions are kept
(tokens x vocabulary floats); the Fisher products keep each micro-batch's graph for the step's
conjugate-gradient iterations. Under DDP, ``g``, every ``H v``, the line search's figures and the
critic's gradients are averaged across ranks by the strategy's ``reduce``, so every rank takes
the same step; nothing goes through DDP's own gradient hooks. ``trainer.max_steps`` counts the
critic's optimizer steps: one rollout is ``vf_iters`` of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shraygpt_rl.errors import require
from shraygpt_rl.generation import response_logits
from shraygpt_rl.losses import conjugate_gradient, masked_mean, masked_sum, token_kl, trpo_step
from shraygpt_rl.stages.online import Rollout, furthest_from_one
from shraygpt_rl.stages.ppo import CriticStage


class TRPOStage(CriticStage):
    """Trust-region policy optimisation with PPO's critic and rewards.

    Args:
        max_kl: The trust region: the most mean token KL(pi_old || pi) a step may take (delta).
        damping: Added to the Fisher matrix's diagonal (``H + damping I``), for conditioning.
        cg_iters: Conjugate-gradient steps towards ``H^-1 g``.
        backtrack_ratio: Factor by which the line search shrinks a rejected step.
        max_backtracks: Most shrinkings after the full step before the step is given up.
        vf_iters: The critic's optimizer steps per rollout (minibatches of ``num_mini_batches``).
        export_path: Where the trained policy is written at the end.
        **kwargs: ``CriticStage``'s arguments (the critic's learning rate is ``lr``).
    """

    kind = "trpo"

    def __init__(
        self,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iters: int = 10,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 10,
        vf_iters: int = 4,
        export_path: str | None = "checkpoints/shraygpt-trpo.ckpt",
        **kwargs,
    ):
        require(max_kl > 0, f"max_kl must be > 0, got {max_kl}.")
        require(damping >= 0, f"damping must be >= 0, got {damping}.")
        require(cg_iters >= 1 and vf_iters >= 1, "cg_iters and vf_iters must be at least 1.")
        require(0 < backtrack_ratio < 1, f"backtrack_ratio must be in (0, 1), got {backtrack_ratio}.")
        require(max_backtracks >= 0, f"max_backtracks must be >= 0, got {max_backtracks}.")
        super().__init__(export_path=export_path, **kwargs)
        self.line_search_failures = 0

    def trainable(self) -> nn.Module:
        return self.critic  # the policy moves by the natural-gradient step, not by an optimizer

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def reduce(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over DDP ranks (itself on one device)."""
        return self.trainer.strategy.reduce(value, reduce_op="mean") if self._trainer else value

    # -- one step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rollout = self.rollout(batch)
        self.log_rollout(rollout)
        start = time.perf_counter()
        first, buffer = self.score(rollout)
        micros = [micro for mb in first for micro in self.micro_batches(mb)]
        metrics = self.policy_step(rollout, micros, buffer)
        metrics |= self.fit_critic(rollout, buffer)
        self.end_of_rollout(rollout, buffer, metrics)
        self.log_step(metrics)
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask.sum()))

    def policy_step(self, rollout: Rollout, micros: list[Tensor], buffer: dict[str, Tensor]) -> dict[str, Tensor]:
        """The natural-gradient step with its line search (the module docstring's 1-3)."""
        hp = self.hparams
        at_old = self.linearise(rollout, micros, buffer)
        x, residual = conjugate_gradient(at_old.fisher, at_old.g, hp.cg_iters)
        step, _ = trpo_step(x, at_old.fisher(x), hp.max_kl)
        at_old.kl_grads.clear()  # frees the graphs before the line search
        surrogate_old = self.reduce(masked_mean(buffer["advantages"], rollout.response_mask))  # the ratio is 1
        found = self.line_search(rollout, micros, buffer, at_old.tables, step, float(at_old.g @ step), surrogate_old)
        return found | {
            "trpo/cg_residual": torch.tensor(residual),
            "policy/ratio_at_start": at_old.ratio_furthest,
            "moe/aux_loss": at_old.aux_loss,
        }

    def linearise(self, rollout: Rollout, micros: list[Tensor], buffer: dict[str, Tensor]) -> Linearisation:
        """At the rollout policy: the surrogate's gradient ``g``, the graphs of the mean token
        KL's gradient (one per micro-batch) for Fisher-vector products, and the log-probability
        tables of pi_old. Gradients and products are averaged over ranks."""
        params, n_tokens = self.policy_parameters(), rollout.response_mask.sum().clamp(min=1)
        g, kl_grads, tables, furthest, aux = 0.0, [], [], None, []
        for micro in micros:
            table, aux_loss = self.log_softmax(rollout, micro)  # (r, T, V) with grad; pi_old = pi here
            surrogate, kl, ratio = self.terms(rollout, micro, table, table.detach(), buffer, n_tokens)  # ratio == 1
            mask = rollout.response_mask[micro]
            g = g + flat(torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True), params)
            kl_grads.append(flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params))
            tables.append(table.detach())
            furthest = furthest_from_one(ratio, mask, furthest)
            aux.append(aux_loss.detach())
        return Linearisation(self.reduce(g), kl_grads, tables, furthest, torch.stack(aux).mean(), params, self)

    @torch.no_grad()
    def line_search(self, rollout, micros, buffer, old_tables, step: Tensor, expected: float, surrogate_old):
        """Try ``backtrack_ratio^j`` of ``step`` for j = 0 .. ``max_backtracks``; keep the first
        that improves the surrogate within ``max_kl``, else put the parameters back."""
        hp, params = self.hparams, self.policy_parameters()
        start = [p.detach().clone() for p in params]
        fraction = 0.0
        for j in range(hp.max_backtracks + 1):
            fraction = hp.backtrack_ratio**j
            set_flat(params, start, fraction * step)
            surrogate, kl = self.evaluate(rollout, micros, buffer, old_tables)
            improvement = surrogate - surrogate_old
            if improvement > 0 and kl <= hp.max_kl:
                break
        else:
            for p, saved in zip(params, start):
                p.copy_(saved)
            fraction = 0.0
            self.line_search_failures += 1
        return {
            "trpo/kl": kl,
            "trpo/step_fraction": torch.tensor(fraction),
            "trpo/surrogate_improvement": improvement,
            "trpo/expected_improvement_ratio": improvement / max(expected * (fraction or 1.0), 1e-12),
            "trpo/line_search_failures": torch.tensor(float(self.line_search_failures)),
        }

    def evaluate(self, rollout, micros, buffer, old_tables) -> tuple[Tensor, Tensor]:
        """The surrogate and the mean token KL(pi_old || pi) of the current policy on the rollout
        (averaged over ranks)."""
        n_tokens = rollout.response_mask.sum().clamp(min=1)
        surrogate, kl = 0.0, 0.0
        for micro, old in zip(micros, old_tables):
            part_surrogate, part_kl, _ = self.terms(
                rollout, micro, self.log_softmax(rollout, micro)[0], old, buffer, n_tokens
            )
            surrogate, kl = surrogate + part_surrogate, kl + part_kl
        return self.reduce(surrogate), self.reduce(kl)

    def terms(self, rollout, micro, table, old, buffer, n_tokens) -> tuple[Tensor, Tensor, Tensor]:
        """A micro-batch's share of the surrogate ``E[pi/pi_old A]`` and of the mean token
        KL(pi_old || pi), from its log-probability tables now (``table``) and at the rollout
        (``old``), each (r, T, V); and the token ratios (r, T)."""
        mask = rollout.response_mask[micro]
        labels = rollout.sequences[micro, rollout.prompt_length :]
        ratio = torch.exp(table.gather(-1, labels[..., None]).squeeze(-1) - buffer["logprobs"][micro])
        surrogate = masked_sum(ratio * buffer["advantages"][micro], mask) / n_tokens
        return surrogate, masked_sum(token_kl(old, table), mask) / n_tokens, ratio

    def log_softmax(self, rollout: Rollout, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The policy's log-probability table (r, T, V) at the response positions of ``rows``,
        and the forward's MoE aux loss (logged, not optimised: TRPO's objective is the surrogate)."""
        seqs, mask = rollout.sequences[rows], rollout.attention_mask[rows]
        logits, aux_loss = response_logits(self.policy, seqs, mask, rollout.prompt_length, self.hparams.temperature)
        return torch.log_softmax(logits, dim=-1), aux_loss

    # -- the critic ----------------------------------------------------------------------------
    def fit_critic(self, rollout: Rollout, buffer: dict[str, Tensor]) -> dict[str, Tensor]:
        """``vf_iters`` optimizer steps of the critic on PPO's clipped value loss, minibatch by
        minibatch (reshuffled after each pass), its gradients averaged over ranks by hand."""
        hp = self.hparams
        params = [p for p in self.critic.parameters() if p.requires_grad]
        losses, clipped, minibatches = [], [], []
        for _ in range(hp.vf_iters):
            if not minibatches:
                minibatches = self.minibatches(len(rollout), hp.num_mini_batches, shuffle=True)
            rows = minibatches.pop(0)
            vf_losses, vf_clipped, aux = self.value_loss(rollout, rows, buffer)
            mask = rollout.response_mask[rows]
            loss = masked_mean(vf_losses, mask) + self.aux_weight(self.critic.trunk) * aux
            grads = self.reduce(flat(torch.autograd.grad(loss, params, allow_unused=True), params))
            finite = bool(torch.isfinite(grads).all())
            for p, grad in zip(params, unflat(grads, params)):
                p.grad = grad
            self.optimizer_step(finite)  # clips, steps (or skips and counts), steps the schedule
            losses.append(masked_mean(vf_losses.detach(), mask))
            clipped.append(masked_mean(vf_clipped, mask))
        return {"value/loss": torch.stack(losses).mean(), "value/clipfrac": torch.stack(clipped).mean()}


@dataclass
class Linearisation:
    """What TRPO's step needs from the rollout policy (``TRPOStage.linearise``)."""

    g: Tensor  # (P,) gradient of the surrogate
    kl_grads: list[Tensor]  # per micro-batch, the KL's gradient with its graph: H v by one more backward
    tables: list[Tensor]  # per micro-batch, pi_old's log-probabilities (r, T, V)
    ratio_furthest: Tensor  # the importance ratio furthest from 1 (it is 1 on-policy)
    aux_loss: Tensor  # the forward's MoE aux loss, for the log
    params: list[nn.Parameter]
    stage: TRPOStage

    def fisher(self, v: Tensor) -> Tensor:
        """``(H + damping I) v``, H the Hessian of the mean token KL at the rollout policy."""
        hv = sum(
            flat(torch.autograd.grad(kg @ v, self.params, retain_graph=True, allow_unused=True), self.params)
            for kg in self.kl_grads
        )
        return self.stage.reduce(hv) + self.stage.hparams.damping * v


def flat(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
    """Gradients as one flat vector, zeros for parameters the loss did not reach."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def unflat(vector: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """A flat vector cut back into tensors shaped like ``params``."""
    return [chunk.view_as(p) for chunk, p in zip(vector.split([p.numel() for p in params]), params)]


def set_flat(params: list[nn.Parameter], start: list[Tensor], step: Tensor) -> None:
    """``params = start + step`` (``step`` flat), in place."""
    for p, saved, delta in zip(params, start, unflat(step, params)):
        p.copy_(saved + delta)
