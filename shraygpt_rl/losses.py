"""The maths of every stage, as pure tensor functions (no modules, no state).

Conventions: ``logits`` (B, T, V) predict ``input_ids[:, 1:]``; masks are 1 on the tokens that
count; ``response_mask`` is aligned with ``input_ids`` (1 on response tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------
def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    values = values * mask
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where the mask is empty."""
    return masked_sum(values, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------
def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p(labels)`` under ``logits`` (B, T, V) -> (B, T), in float32.

    Cross-entropy's fused log-softmax and gather, whose backward is one pass over the logits;
    on CPU at a 50k vocabulary it is faster than a gather minus a logsumexp.
    """
    V = logits.size(-1)
    nll = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), reduction="none")
    return -nll.view(labels.shape)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) of the response tokens' log-probabilities: (B, T, V) logits -> (B,).

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so the first token cannot be scored.
    """
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    mask = response_mask[:, 1:].to(logprobs.dtype)
    return masked_mean(logprobs, mask, dim=1) if average else masked_sum(logprobs, mask, dim=1)


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected - margin)`` averaged over pairs (InstructGPT eq. 1;
    the margin as in Llama 2 §3.2.2)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def reward_centering_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``mean((r_chosen + r_rejected)^2)``: pulls rewards towards zero mean (Eisenstein et al., 2023)."""
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards ``beta * (log pi - log pi_ref)`` of chosen and rejected.

    With ``h = (log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r)``:

    * ``sigmoid``: ``-(1-e) log s(beta h) - e log s(-beta h)`` (Rafailov et al., 2023, eq. 7);
      ``e = label_smoothing > 0`` is conservative DPO (cDPO, Mitchell 2023).
    * ``robust``: ``((1-e)(-log s(beta h)) - e(-log s(-beta h))) / (1 - 2e)``, unbiased under
      label noise of rate e (Chowdhury et al., 2024, eq. 9).
    * ``ipo``: ``(h - 1/(2 beta))^2`` (Azar et al., 2023, eq. 17); pass length-averaged logps.
    * ``hinge``: ``max(0, 1 - beta h)`` (SLiC-HF, Zhao et al., 2023).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - e) * -F.logsigmoid(beta * h) - e * -F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"Unknown DPO loss_type '{loss_type}'; choose sigmoid, ipo, hinge or robust.")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float = 2.0, gamma: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO's per-pair loss ``-log s(beta avg_c - beta avg_r - gamma)`` and its rewards ``beta avg``
    (Meng et al., 2024, eq. 6): length-averaged log-probabilities and a target margin ``gamma``,
    no reference model."""
    chosen, rejected = beta * chosen_avg_logps, beta * rejected_avg_logps
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler, 2012), with a finite
    gradient everywhere.

    ``torch.where`` differentiates both branches, so each gets an input inside its own domain:
    otherwise the unused ``log1p(-exp(x))`` at ``x`` near 0 (where ``exp(x)`` rounds to 1) has an
    infinite gradient, which ``where`` turns into NaN. ``x`` is clamped to at most ``-tiny`` (the
    smallest normal number of its dtype): at 0 the value is ``log(tiny)``, not ``-inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    small = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, small, large)


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, lam: float = 0.1) -> tuple[Tensor, Tensor]:
    """ORPO's per-pair loss ``L_SFT + lam L_OR`` and the log odds ratio (Hong et al., 2024, eqs. 6-7).

    With ``P = exp(average log-probability)`` of a response (eq. 4), ``odds = P / (1 - P)``,
    ``L_OR = -log s(log odds_c - log odds_r)`` and ``L_SFT`` the chosen response's mean negative
    log-likelihood; no reference model.
    """
    log_odds_ratio = (chosen_avg_logps - log1mexp(chosen_avg_logps)) - (
        rejected_avg_logps - log1mexp(rejected_avg_logps)
    )
    return -chosen_avg_logps - lam * F.logsigmoid(log_odds_ratio), log_odds_ratio.detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO's per-example loss ``lambda_y - v(x, y)`` and its rewards (Ethayarajh et al., 2024, eq. 8).

    ``r = log pi(y|x) - log pi_ref(y|x)`` of unpaired responses, ``desirable`` (B,) bool; the
    reference point ``z0 = max(0, kl)`` is the batch's KL estimate, detached as in the paper.
    ``v = lambda_D s(beta (r - z0))`` for desirable responses, ``lambda_U s(beta (z0 - r))`` else.
    """
    rewards = logps - ref_logps  # (B,)
    z0 = kl.detach().clamp(min=0)
    value = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(beta * (rewards - z0)),
        undesirable_weight * torch.sigmoid(beta * (z0 - rewards)),
    )
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(value.dtype)
    return weight - value, beta * rewards.detach()


# --------------------------------------------------------------------------------------------
# Online RL: statistics, KL estimators, advantages
# --------------------------------------------------------------------------------------------
KLEstimator = Literal["k1", "k2", "k3", "abs"]
GRPOLossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "group_token_mean"]
ScaleRewards = Literal["group", "batch", "none"]


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` where ``mask`` is 1 (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked elements; with
    ``shift_mean=False`` the mean is kept (as PPO does for rewards)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimator = "k1", mask: Tensor | None = None) -> Tensor:
    """Per-token estimates of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020): ``k1 = log r``, ``k2 = (log r)^2 / 2``, ``k3 = (1/r - 1) + log r`` with
    ``r = pi / pi_ref``; k1 is unbiased, k3 unbiased and always >= 0, k2 biased but low-variance;
    ``abs = |log r|`` (seed 004's fourth penalty) is >= 0 and biased upwards, like k2.

    Seed notebook 000 writes k3 as ``(r - 1) - log r``, evaluated on samples of pi: that is
    Schulman's k3 for KL(pi_ref || pi), which needs samples of pi_ref. On samples of pi its
    expectation is ``E_pi[r] - 1 - KL(pi || pi_ref)``, not the KL. Here k3 is the form that is
    unbiased for KL(pi || pi_ref) on samples of pi: ``(pi_ref/pi - 1) - log(pi_ref/pi)``, that is
    ``expm1(-log r) + log r``.

    With ``mask``, the estimate is exactly 0 off it: padding's log-probabilities are nobody's, and
    k3's ``expm1`` of a large gap there would be inf, which a later ``* mask`` turns into NaN.
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, 0.0)  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator '{kind}'; choose k1, k2, k3 or abs.")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over (B, T) tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with
    ``V`` and ``A`` zero after the last real token. Returns ``(advantages, returns = A + V)``.

    "Next" is the next token where ``mask`` is 1: tokens masked out in the middle of a row (a
    tool's observation in a multi-turn rollout: not the policy's actions) are skipped, as if the
    row were the policy's tokens alone, and get advantage 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):  # (B,) at a time: T steps, no per-sample Python
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        acted = mask[:, t].bool()  # a masked token passes the next action's value and advantage on
        next_value = torch.where(acted, values[:, t], next_value)
        next_advantage = torch.where(acted, advantages[:, t], next_advantage)
    return advantages, advantages + values


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: ScaleRewards = "group",
    eps: float = 1e-4,
    batch_rewards: Tensor | None = None,
) -> Tensor:
    """GRPO's outcome advantages: rewards minus their group's mean (DeepSeekMath, eq. 3), divided
    by the group's std (``group``), the whole batch's std (``batch``: of ``batch_rewards``, every
    rank's under DDP, else of ``rewards``), or nothing (``none``: Dr. GRPO, Liu et al., 2025).
    ``rewards`` (B * G,) hold each prompt's G samples in a row."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards if batch_rewards is None else batch_rewards).std() + eps)
    elif scale != "none":
        raise ValueError(f"Unknown scale_rewards '{scale}'; choose group, batch or none.")
    return centred.flatten()


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: each sample's reward minus the mean of the other G - 1 samples
    of its prompt (Kool et al., 2019; Ahmadian et al., 2024, eq. 4)."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).flatten()


# --------------------------------------------------------------------------------------------
# Online RL: losses
# --------------------------------------------------------------------------------------------
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO-clip loss ``-min(r A, clip(r, 1 - e_low, 1 + e_high) A)`` (Schulman et al.,
    2017, eq. 7), with DAPO's clip-higher when ``clip_high`` differs (Yu et al., 2025).

    ``advantages`` broadcast against (B, T). Returns ``(losses, ratio, clipped)``, each (B, T);
    ``clipped`` marks tokens where the clipped branch was taken (``policy_loss``'s ``clip``). Off
    ``mask`` (when given) the ratio is 1, so that padding cannot make the loss non-finite.
    """
    mask = torch.ones_like(logprobs) if mask is None else mask
    return policy_loss(logprobs, old_logprobs, advantages, mask, "clip", "token", clip_low, clip_high)


ImportanceSamplingLevel = Literal["token", "sequence"]
PolicyLoss = Literal["clip", "cispo", "sapo"]


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token"):
    """Importance ratios (B, T). ``token``: ``pi / pi_old`` per token. ``sequence`` (GSPO, Zheng
    et al. 2025, eq. 7): ``(pi(y|x) / pi_old(y|x)) ** (1 / |y|)``, the geometric mean of the
    row's token ratios over the tokens of ``mask`` only (a multi-turn row's observations are not
    the policy's), the same for every token of the row. Off the mask, the ratio is 1."""
    if level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance sampling level '{level}'; choose token or sequence.")
    # Off the mask the ratio is 1: a non-finite value there must reach neither the sum nor, as an
    # inf times a zero weight, the loss.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)  # (B, T)
    if level == "token":
        return log_ratio.exp()
    if log_ratio.dtype not in (torch.float32, torch.float64):  # bf16's spacing (0.008 at 1) is wider than GSPO's band
        raise ValueError(f"A sequence-level ratio needs float32 log-probabilities, got {log_ratio.dtype}.")
    mean = log_ratio.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    return mean.exp()[:, None].expand_as(log_ratio)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    kind: PolicyLoss = "clip",
    level: ImportanceSamplingLevel = "token",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token policy losses (B, T) of the GRPO family, with the ratios and which tokens were
    clipped or gated, each (B, T); aggregate with ``aggregate_loss``.

    * ``clip``: PPO's ``-min(r A, clip(r, 1 - e_low, 1 + e_high) A)`` on the ratio of ``level``:
      token (GRPO, DAPO) or sequence (GSPO, whose objective is this per sequence, averaged over
      sequences: ``aggregate_loss``'s ``grpo``).
    * ``cispo`` (MiniMax-M1, 2025, eq. 4): ``-sg(min(r, 1 + e_high)) A log pi``: the importance
      weight is clipped and detached, not the update, so every token keeps its gradient. The paper
      sets no lower bound (its ``e_low`` is large); neither does this. ``clipped``: ``r > 1 + e_high``
      (tokens with ``A != 0``).
    * ``sapo`` (Gao et al. 2025, "Soft Adaptive Policy Optimization"): ``-(4 / tau) sigmoid(tau
      (r - 1)) A``, a smooth gate in place of the clip, with ``tau`` the first of
      ``sapo_temperatures`` for positive advantages and the second for the others. Its gradient
      weight ``4 s (1 - s)`` (``s`` the sigmoid) is 1 at ``r = 1`` and decays away from it;
      ``clipped`` marks the tokens (with ``A != 0``) it has more than halved: ``r`` above about 2.7,
      never below 1 (the weight at ``r = 0`` is still 0.79 at ``tau = 1``, 0.77 at 1.05).

    At ``r = 1`` (the on-policy step) every kind's gradient is the policy gradient ``-A grad log pi``.
    """
    ratio = importance_ratio(logprobs, old_logprobs, mask, level)
    clip_high = clip_low if clip_high is None else clip_high
    if kind == "clip":
        unclipped = -advantages * ratio
        clipped_loss = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        return torch.maximum(unclipped, clipped_loss), ratio, (clipped_loss > unclipped).float()
    moving = advantages != 0  # CISPO and SAPO flag only tokens with an update to cut, as PPO's clip does
    if kind == "cispo":
        weight = ratio.detach().clamp(max=1 + clip_high)
        own = torch.where(mask.bool(), logprobs, 0.0)  # padding's log pi may be -inf: not a loss term
        return -weight * advantages * own, ratio, ((ratio.detach() > 1 + clip_high) & moving).float()
    if kind == "sapo":
        positive, negative = sapo_temperatures
        tau = torch.where(advantages > 0, positive, negative) * torch.ones_like(ratio)  # (B, T)
        gate = torch.sigmoid(tau * (ratio - 1))
        weight = 4 * gate.detach() * (1 - gate.detach())  # d(loss) / d(-A r)
        return -(4 / tau) * gate * advantages, ratio, ((weight < 0.5) & moving).float()
    raise ValueError(f"Unknown policy loss '{kind}'; choose clip, cispo or sapo.")


def truncated_importance_weights(logprobs: Tensor, rollout_logprobs: Tensor, cap: float = 2.0) -> Tensor:
    """Per-token weights ``min(pi_train / pi_rollout, cap)``, detached: the truncated importance
    sampling (TIS) of Yao et al. (2025, "Your efficient RL framework secretly brings you
    off-policy RL training"), for tokens sampled by an engine whose log-probabilities
    ``rollout_logprobs`` differ from the training forward's ``logprobs`` (vLLM's kernels). The
    policy-gradient loss of each token is multiplied by its weight. (B, T)."""
    return torch.exp(logprobs.detach() - rollout_logprobs).clamp(max=cap)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float = 0.2):
    """Per-token clipped value loss ``0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)`` (the
    PPO2 baselines and InstructGPT recipe). Returns ``(losses, clipped)``, each (B, T)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate_loss(
    losses: Tensor,
    mask: Tensor,
    loss_type: GRPOLossType | Literal["token_mean"] = "token_mean",
    max_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Reduce per-token losses (B, T) to a scalar, in a way that is additive over micro-batches.

    * ``grpo``: mean over each sequence's tokens, then over sequences (DeepSeekMath, eq. 3).
    * ``bnpo``, ``dapo``, ``token_mean``: the sum over all tokens divided by ``num_tokens``, by
      default the batch's token count: one mean over all tokens of the batch (DAPO, eq. 8).
    * ``dr_grpo``: sum over tokens divided by ``sequences * max_length``, a constant (Dr. GRPO).
    * ``group_token_mean``: mean over all tokens of each group (the ``group_size`` completions of
      one prompt, consecutive rows, as ``group_advantages`` has them), then over groups (seed
      notebook 000's aggregation). A batch must hold whole groups.

    ``num_sequences`` and ``num_tokens`` are the counts of the whole minibatch when ``losses``
    is one of its micro-batches: then the micro-batch losses add up to the minibatch's loss.
    """
    mask = mask.to(losses.dtype)
    sequences = num_sequences or losses.size(0)
    if loss_type == "grpo":
        return (masked_sum(losses, mask, dim=1) / mask.sum(1).clamp(min=1)).sum() / sequences
    if loss_type in ("bnpo", "dapo", "token_mean"):
        tokens = mask.sum() if num_tokens is None else num_tokens
        return masked_sum(losses, mask) / max(float(tokens), 1.0)
    if loss_type == "dr_grpo":
        return masked_sum(losses, mask) / (sequences * (max_length or losses.size(1)))
    if loss_type == "group_token_mean":
        if not group_size or losses.size(0) % group_size or sequences % group_size:
            raise ValueError(f"group_token_mean needs whole groups of group_size={group_size} rows in every batch.")
        group_sums = masked_sum(losses, mask, dim=1).view(-1, group_size).sum(1)  # (groups,)
        group_tokens = mask.sum(1).view(-1, group_size).sum(1)  # (groups,)
        return (group_sums / group_tokens.clamp(min=1)).sum() / (sequences // group_size)
    raise ValueError(f"Unknown loss_type '{loss_type}'; choose grpo, dr_grpo, dapo, bnpo or group_token_mean.")


def next_token_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """SFT's loss: mean next-token NLL over the tokens where ``loss_mask`` (B, T) is 1, with
    ``logits`` (B, T, V) predicting ``input_ids[:, 1:]``; the first token cannot be scored."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    return masked_mean(nll, loss_mask[:, 1:].flatten().float())


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax of (…, V) logits -> (…), in float32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 is a perfect critic, 0 a constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class AdaptiveKLController:
    """Ziegler et al. (2019, §2.2): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``,
    which keeps the KL to the reference near ``target`` over about ``horizon`` samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------------------------
# TRPO (Schulman et al., 2015)
# --------------------------------------------------------------------------------------------
def token_kl(old_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """Exact per-token ``KL(pi_old || pi) = sum_v p_old(v) (log p_old(v) - log p(v))`` from full
    (…, V) log-probability tables -> (…): TRPO's constraint, not a sampled estimate."""
    return (old_logprobs.exp() * (old_logprobs - logprobs)).sum(-1)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> tuple[Tensor, float]:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given only ``matvec(v) = A v``
    (Hestenes and Stiefel, 1952; TRPO's appendix C). Starts at x = 0 and stops after ``iters``
    steps or once ``|r|^2 < residual_tol``. Returns ``(x, |b - A x|)``, the residual recursed."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr < residual_tol:
            break
        Ap = matvec(p)
        alpha = rr / p.dot(Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_next = r.dot(r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x, float(rr.sqrt())


def trpo_step(x: Tensor, hx: Tensor, max_kl: float) -> tuple[Tensor, float]:
    """The full TRPO step along ``x ~ H^-1 g`` given ``hx = H x``: ``sqrt(2 max_kl / x^T H x) x``, the step on which
    the quadratic model of the KL equals ``max_kl`` (TRPO eq. 14 and appendix C), and that scale."""
    scale = float(torch.sqrt(2 * max_kl / x.dot(hx).clamp(min=1e-12)))
    return scale * x, scale
