"""TRPO (Schulman et al., 2015) for language models, on PPO's rollout, critic and rewards.

One step: sample one response per prompt and score it exactly as PPO does (``CriticStage``: the
per-token ``-kl_coef * KL`` reward against the reference, GAE, whitened advantages). Then, for
the policy, there is no optimizer:

1. ``g``, the gradient of the surrogate ``L(theta) = E[sum_t pi_theta / pi_old * A_t]`` (a sum
   over each response's tokens, a mean over the rollout's responses), is taken at the rollout
   policy, where the ratio is 1.
2. ``x ~ (H + damping I)^-1 g`` comes from ``cg_iters`` steps of conjugate gradient, where ``H``
   is the Hessian at the rollout policy of the mean response ``KL(pi_old || pi_theta)`` (each
   response's KL the sum of its states' exact KLs over the vocabulary): its Fisher matrix. Each
   product ``H v`` is a double backward pass (Pearlmutter, 1994).
3. The full step ``sqrt(2 delta / x^T H x) x`` is tried, then shrunk by ``backtrack_ratio`` up to
   ``max_backtracks`` times; the first size is kept at which the measured KL is at most delta
   (the mean response KL, or the largest state KL: ``kl_constraint``) and the surrogate improves
   by at least ``accept_ratio`` of what its linear model ``g . step`` expects (the paper's
   appendix C). If none is, the parameters are put back bit for bit and the failure is counted.
   delta is ``max_kl``, decaying linearly to ``max_kl_end`` over the run when that is set.

Why per response and not per token: a response here is about twelve tokens, ten of them
near-certain formatting. A token-mean bound of delta lets the step put about 12 delta nats on
the one or two uncertain answer tokens, which flips their most likely choice and breaks greedy
decoding. The paper's KL-bar averages over the unnormalised state visitation, which with
gamma = 1 is the sum over a response's states: the KL between response distributions.
``policy/argmax_flip_rate`` (the share of rollout states whose most likely token the step
changed) and ``trpo/max_state_kl`` show what a step does to the mode.

The critic is trained by its own optimizer, ``vf_iters`` minibatch steps per rollout (PPO's 4
epochs x 2 minibatches by default), on PPO's clipped value loss. Only trainable parameters take
part (with LoRA, the adapters).

Departures from the paper: the old log-probability tables of the rollout's response positions are
kept (tokens x vocabulary floats), and the Fisher products keep each micro-batch's graph for the
step's conjugate-gradient iterations. Under DDP, ``g``, every ``H v``, the line search's figures
and the critic's gradients are reduced across ranks by the strategy's ``reduce``, so every rank
takes the same step; nothing goes through DDP's own gradient hooks. ``trainer.max_steps`` counts
the critic's optimizer steps: one rollout is ``vf_iters`` of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from shraygpt_rl.errors import ConfigError, require
from shraygpt_rl.generation import response_logits
from shraygpt_rl.losses import conjugate_gradient, importance_ratio, masked_mean, masked_sum, token_kl, trpo_step
from shraygpt_rl.stages.online import Rollout, furthest_from_one
from shraygpt_rl.stages.ppo import CriticStage

KLConstraint = Literal["response", "max_state"]


class TRPOStage(CriticStage):
    """Trust-region policy optimisation with PPO's critic and rewards.

    Args:
        max_kl: The trust region delta: the most KL(pi_old || pi) a step may take, per response
            (``kl_constraint="response"``) or at any state (``"max_state"``).
        max_kl_end: When set, delta moves linearly from ``max_kl`` at the first rollout to this at
            the last (``trainer.max_steps / vf_iters`` rollouts): smaller late steps settle the
            policy, as a decaying learning rate does. None keeps ``max_kl``.
        kl_constraint: ``response``: the mean over responses of each response's KL (the sum of
            its tokens' KLs), the paper's average KL under the unnormalised state visitation with
            gamma = 1; ``max_state``: the largest KL at any response state (the paper's Theorem 1
            bound). The step's direction and first size come from the response KL's quadratic
            model either way; the line search checks the chosen one.
        accept_ratio: The line search keeps a step only if the surrogate's actual improvement is
            at least this share of the improvement its linear model expects (TRPO's appendix C).
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
        max_kl: float = 0.05,
        max_kl_end: float | None = None,
        kl_constraint: KLConstraint = "response",
        accept_ratio: float = 0.1,
        damping: float = 0.1,
        cg_iters: int = 10,
        backtrack_ratio: float = 0.8,
        max_backtracks: int = 10,
        vf_iters: int = 8,
        export_path: str | None = "checkpoints/shraygpt-trpo.ckpt",
        **kwargs,
    ):
        require(max_kl > 0, f"max_kl must be > 0, got {max_kl}.")
        require(max_kl_end is None or max_kl_end > 0, f"max_kl_end must be > 0 (or null), got {max_kl_end}.")
        require(
            kl_constraint in ("response", "max_state"),
            f"kl_constraint must be response or max_state, got {kl_constraint!r}.",
        )
        require(0 <= accept_ratio < 1, f"accept_ratio must be in [0, 1), got {accept_ratio}.")
        require(damping >= 0, f"damping must be >= 0, got {damping}.")
        require(cg_iters >= 1 and vf_iters >= 1, "cg_iters and vf_iters must be at least 1.")
        require(0 < backtrack_ratio < 1, f"backtrack_ratio must be in (0, 1), got {backtrack_ratio}.")
        require(max_backtracks >= 0, f"max_backtracks must be >= 0, got {max_backtracks}.")
        super().__init__(export_path=export_path, **kwargs)
        require(
            self.engine.exact,
            f"TRPO's surrogate and KL step assume the rollout policy's own samples, which rollout_engine "
            f"{self.engine.name} does not give; use auto, static or eager.",
        )
        if hasattr(self.policy, "twice_differentiable"):  # a Hugging Face model: eager attention
            self.policy.twice_differentiable()
        self.line_search_failures = 0

    def optimizer_steps_per_rollout(self) -> int:
        return self.hparams.vf_iters  # the critic's: the policy's natural-gradient step is by hand

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                "TRPO sets its critic's gradients by hand (averaged over ranks by its own all-reduce), which fp16's "
                "loss scaling cannot follow; use --trainer.precision bf16-mixed or 32."
            )

    def trainable(self) -> nn.Module:
        return self.critic  # the policy moves by the natural-gradient step, not by an optimizer

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def reduce(self, value: Tensor, op: str = "mean") -> Tensor:
        """``value`` reduced over DDP ranks by ``op`` (itself on one device)."""
        return self.trainer.strategy.reduce(value, reduce_op=op) if self._trainer else value

    def trust_region(self) -> float:
        """This rollout's delta: ``max_kl``, or on the line from it to ``max_kl_end``."""
        hp = self.hparams
        max_steps = self.trainer.max_steps if self._trainer else -1
        if hp.max_kl_end is None or max_steps is None or max_steps < 1:
            return hp.max_kl
        total = max(max_steps // hp.vf_iters - hp.critic_warmup, 1)  # rollouts that move the policy
        progress = min(max(self.rollouts - hp.critic_warmup - 1, 0) / max(total - 1, 1), 1.0)
        return hp.max_kl + (hp.max_kl_end - hp.max_kl) * progress

    # -- one step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rollout = self.rollout(batch)
        self.log_rollout(rollout)
        start = time.perf_counter()
        first, buffer = self.score(rollout)
        micros = [micro for mb in first for micro in self.micro_batches(mb)]
        metrics = {"moe/aux_loss": torch.zeros((), device=self.device)}
        if not self.warming_up:
            metrics = self.policy_step(rollout, micros, buffer)
        in_a_row = self.nonfinite_in_a_row
        metrics |= self.fit_critic(rollout, buffer)
        if metrics.get("trpo/step_skipped"):  # the critic's finite steps must not end a run of skipped policy steps
            self.nonfinite_in_a_row = max(self.nonfinite_in_a_row, in_a_row)
        self.end_of_rollout(rollout, buffer, metrics)
        self.log_step(metrics)
        self.log_update(time.perf_counter() - start, float(rollout.attention_mask.sum()))

    def policy_step(self, rollout: Rollout, micros: list[Tensor], buffer: dict[str, Tensor]) -> dict[str, Tensor]:
        """The natural-gradient step with its line search (the module docstring's 1-3)."""
        hp, delta = self.hparams, self.trust_region()
        at_old = self.linearise(rollout, micros, buffer)
        x, residual = conjugate_gradient(at_old.fisher, at_old.g, hp.cg_iters)
        step, _ = trpo_step(x, at_old.fisher(x), delta)
        at_old.kl_grads.clear()  # frees the graphs before the line search
        # g and every Fisher product are reduced over ranks, so every rank decides alike.
        if not bool(torch.isfinite(at_old.g).all() and torch.isfinite(step).all()):
            self.count_nonfinite()  # the guard's count (and its stop), as for an optimizer step
            zero = torch.zeros(())  # the policy is where it was: the line search's figures, as if it failed
            found = {
                "trpo/kl": zero,
                "trpo/max_state_kl": zero,
                "policy/argmax_flip_rate": zero,
                "trpo/step_fraction": zero,
                "trpo/surrogate_improvement": zero,
                "trpo/expected_improvement_ratio": zero,
                "trpo/line_search_failures": torch.tensor(float(self.line_search_failures)),
                "trpo/step_skipped": torch.ones(()),
            }
        else:
            surrogate_old = self.reduce(masked_sum(buffer["advantages"], rollout.response_mask) / len(rollout))  # r = 1
            expected = float(at_old.g @ step)
            found = self.line_search(rollout, micros, buffer, at_old.tables, step, expected, surrogate_old, delta)
            found["trpo/step_skipped"] = torch.zeros(())
        return found | {
            "trpo/cg_residual": torch.tensor(residual),
            "trpo/max_kl": torch.tensor(delta),
            "policy/ratio_at_start": at_old.ratio_furthest,
            "moe/aux_loss": at_old.aux_loss,
        }

    def linearise(self, rollout: Rollout, micros: list[Tensor], buffer: dict[str, Tensor]) -> Linearisation:
        """At the rollout policy: the surrogate's gradient ``g``, the graphs of the response
        KL's gradient (one per micro-batch) for Fisher-vector products, and the log-probability
        tables of pi_old. Gradients and products are averaged over ranks."""
        params = self.policy_parameters()
        g, kl_grads, tables, furthest, aux = 0.0, [], [], None, []
        for micro in micros:
            table, aux_loss = self.log_softmax(rollout, micro)  # (r, T, V) with grad; pi_old = pi here
            surrogate, kl, ratio = self.terms(rollout, micro, table, table.detach(), buffer)  # ratio == 1
            mask = rollout.response_mask[micro]
            g = g + flat_grad(surrogate, params, retain_graph=True)
            kl_grads.append(flat_grad(kl.sum() / len(rollout), params, create_graph=True))
            tables.append(table.detach())
            furthest = furthest_from_one(ratio, mask, furthest)
            aux.append(aux_loss.detach())
        return Linearisation(self.reduce(g), kl_grads, tables, furthest, torch.stack(aux).mean(), params, self)

    @torch.no_grad()
    def line_search(self, rollout, micros, buffer, old_tables, step: Tensor, expected: float, surrogate_old, delta):
        """Try ``backtrack_ratio^j`` of ``step`` for j = 0 .. ``max_backtracks``; keep the first
        within ``delta`` whose surrogate improves by at least ``accept_ratio`` of the linear
        model's expectation, else put the parameters back."""
        hp, params = self.hparams, self.policy_parameters()
        start = [p.detach().clone() for p in params]
        fraction = 0.0
        for j in range(hp.max_backtracks + 1):
            fraction = hp.backtrack_ratio**j
            add_to(params, start, fraction * step)
            found = self.evaluate(rollout, micros, buffer, old_tables)
            improvement = found["surrogate"] - surrogate_old
            measured = found["kl"] if hp.kl_constraint == "response" else found["max_state_kl"]
            if measured <= delta and improvement > 0 and improvement >= hp.accept_ratio * fraction * expected:
                break
        else:
            for p, saved in zip(params, start):
                p.copy_(saved)
            fraction = 0.0
            self.line_search_failures += 1
            zero = torch.zeros((), device=step.device)  # the policy is back where it was
            found |= {"kl": zero, "max_state_kl": zero, "flip_rate": zero}
        return {
            "trpo/kl": found["kl"],
            "trpo/max_state_kl": found["max_state_kl"],
            "policy/argmax_flip_rate": found["flip_rate"],
            "trpo/step_fraction": torch.tensor(fraction),
            "trpo/surrogate_improvement": improvement,
            "trpo/expected_improvement_ratio": improvement / max(expected * (fraction or 1.0), 1e-12),
            "trpo/line_search_failures": torch.tensor(float(self.line_search_failures)),
        }

    def evaluate(self, rollout, micros, buffer, old_tables) -> dict[str, Tensor]:
        """The current policy against the rollout's, on the rollout (reduced over ranks): the
        surrogate, the mean response KL(pi_old || pi), the largest KL at one state, and the
        share of response states whose most likely token changed."""
        surrogate, kl, max_state, flips = 0.0, 0.0, torch.zeros(()), 0.0
        states = rollout.response_mask.sum().clamp(min=1)
        for micro, old in zip(micros, old_tables):
            table = self.log_softmax(rollout, micro)[0]  # (r, T, V)
            part_surrogate, part_kl, _ = self.terms(rollout, micro, table, old, buffer)
            mask = rollout.response_mask[micro].bool()
            surrogate, kl = surrogate + part_surrogate, kl + part_kl.sum() / len(rollout)
            max_state = torch.maximum(max_state, part_kl.max())
            flips = flips + ((table.argmax(-1) != old.argmax(-1)) & mask).sum()
        return {
            "surrogate": self.reduce(surrogate),
            "kl": self.reduce(kl),
            "max_state_kl": self.reduce(max_state, "max"),
            "flip_rate": self.reduce(flips / states),
        }

    def terms(self, rollout, micro, table, old, buffer) -> tuple[Tensor, Tensor, Tensor]:
        """A micro-batch's share of the surrogate ``E[sum_t pi/pi_old A_t]`` (a sum over each
        response's tokens, a mean over the rollout's responses), its exact KL(pi_old || pi) at
        each response state (r, T; 0 off the mask), from its log-probability tables now
        (``table``) and at the rollout (``old``), each (r, T, V); and the token ratios (r, T)."""
        mask = rollout.response_mask[micro]
        labels = rollout.sequences[micro, rollout.prompt_length :]
        ratio = importance_ratio(table.gather(-1, labels[..., None]).squeeze(-1), buffer["logprobs"][micro], mask)
        surrogate = masked_sum(ratio * buffer["advantages"][micro], mask) / len(rollout)
        return surrogate, token_kl(old, table) * mask, ratio

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
            grads = self.reduce(flat_grad(loss, params))
            finite = bool(torch.isfinite(grads).all())
            for p, grad in zip(params, split_like(grads, params)):
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
        hv = sum(flat_grad(kg @ v, self.params, retain_graph=True) for kg in self.kl_grads)
        return self.stage.reduce(hv) + self.stage.hparams.damping * v


def flat_grad(output: Tensor, params: list[nn.Parameter], **kwargs) -> Tensor:
    """``d output / d params`` as one vector in ``parameters_to_vector``'s layout, zeros for
    parameters ``output`` does not reach; ``kwargs`` go to ``torch.autograd.grad``."""
    grads = torch.autograd.grad(output, params, materialize_grads=True, **kwargs)
    return parameters_to_vector(g.contiguous() for g in grads)  # a gradient may be a transposed view


def split_like(vector: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """A flat vector (``parameters_to_vector``'s layout) cut into views shaped like ``params``."""
    return [chunk.view_as(p) for chunk, p in zip(vector.split([p.numel() for p in params]), params)]


def add_to(params: list[nn.Parameter], start: list[Tensor], step: Tensor) -> None:
    """``params = start + step`` (``step`` flat), written in place.

    Not ``vector_to_parameters``: it rebinds each ``p.data`` to a slice of a new vector, which
    detaches the parameters from DDP's gradient buckets and can hand the decoder's weight cache
    (keyed on ``data_ptr`` and ``_version``) a recycled address that looks unchanged.
    """
    for p, saved, delta in zip(params, start, split_like(step, params)):
        p.copy_(saved + delta)
