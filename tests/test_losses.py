"""Pure loss functions against hand-computed numbers and naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shraygpt_rl.losses import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    importance_ratio,
    kto_loss,
    log1mexp,
    masked_mean,
    masked_sum,
    orpo_loss,
    policy_loss,
    reward_centering_loss,
    sequence_logprobs,
    simpo_loss,
    token_logprobs,
    truncated_importance_weights,
)


def test_masked_reductions_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_sum(values, mask).item() == 4.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, dim=1).tolist() == [2.0, 0.0]  # an empty row gives 0, not NaN


def test_token_logprobs_equal_log_softmax():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    expected = F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels), expected, atol=1e-6)


def test_sequence_logprobs_match_a_naive_loop():
    logits = torch.randn(2, 6, 7)
    ids = torch.randint(0, 7, (2, 6))
    response = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    expected = []
    for b in range(2):
        total, count = 0.0, 0
        for t in range(1, 6):
            if response[b, t]:
                total += F.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
                count += 1
        expected.append((total, total / count))
    assert sequence_logprobs(logits, ids, response).tolist() == pytest.approx([e[0] for e in expected], abs=1e-5)
    averaged = sequence_logprobs(logits, ids, response, average=True)
    assert averaged.tolist() == pytest.approx([e[1] for e in expected], abs=1e-5)


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    with_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(with_margin)
    assert reward_centering_loss(chosen, rejected).item() == pytest.approx((9 + 1) / 2)


# Policy and reference log-probabilities for one pair: h = (-1 - -2) - (-3 - -2) = 2.
PAIR = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]


@pytest.mark.parametrize(
    "loss_type,smoothing,expected",
    [
        ("sigmoid", 0.0, math.log(1 + math.exp(-0.2))),
        ("sigmoid", 0.1, 0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2))),
        ("robust", 0.1, (0.9 * math.log(1 + math.exp(-0.2)) - 0.1 * math.log(1 + math.exp(0.2))) / 0.8),
        ("ipo", 0.0, (2 - 1 / 0.2) ** 2),
        ("hinge", 0.0, 1 - 0.2),
    ],
)
def test_dpo_family_by_hand(loss_type, smoothing, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*PAIR, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    assert losses.item() == pytest.approx(expected, rel=1e-5)
    assert chosen_rewards.item() == pytest.approx(0.1) and rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]))
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_dpo_refuses_bad_options():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="Unknown DPO loss_type"):
        dpo_loss(*PAIR, loss_type="kto")


# --------------------------------------------------------------------------------------------
# Online RL
# --------------------------------------------------------------------------------------------
from shraygpt_rl.losses import (  # noqa: E402
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    conjugate_gradient,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    masked_var,
    next_token_loss,
    rloo_advantages,
    token_kl,
    trpo_step,
    whiten,
)


def test_gae_matches_a_naive_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            expected = sum(
                (gamma * lam) ** (k - t)
                * (rewards[b, k] + gamma * (values[b, k + 1] if k + 1 < n else 0.0) - values[b, k])
                for k in range(t, n)
            )
            assert advantages[b, t].item() == pytest.approx(float(expected), abs=1e-5)
        assert (advantages[b, n:] == 0).all()
    assert torch.allclose(returns, advantages + values * mask)


def test_gae_skips_masked_tokens_between_actions():
    """Observations (mask 0 in the middle of a row) are skipped: each row's advantages equal
    GAE over its policy tokens alone, compacted, and are 0 on the observations."""
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 9), torch.randn(4, 9)
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 1, 0, 1, 0, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    rewards = rewards * mask  # rewards live on actions
    advantages, returns = gae(rewards, values, mask, 0.95, 0.9)
    for b in range(4):
        acted = mask[b].bool()
        alone, alone_returns = gae(
            rewards[b, acted][None], values[b, acted][None], torch.ones(1, int(acted.sum())), 0.95, 0.9
        )
        assert torch.allclose(advantages[b, acted], alone[0], atol=1e-6)
        assert torch.allclose(returns[b, acted], alone_returns[0], atol=1e-6)
        assert (advantages[b, ~acted] == 0).all()


def test_gae_by_hand_with_gamma_one():
    # One sequence, V = (1, 2), r = (0, 3), gamma = lam = 1: A_1 = 3 - 2 = 1, A_0 = 0 + 2 - 1 + 1 = 2.
    advantages, returns = gae(torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), 1.0, 1.0)
    assert advantages.tolist() == [[2.0, 1.0]] and returns.tolist() == [[3.0, 3.0]]


def test_whiten_and_masked_var():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # var of (1, 2, 3), unbiased
    white = whiten(values, mask)
    assert white[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert whiten(values, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    log_r = math.log(2.0)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(log_r)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * log_r**2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + log_r)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_k3_is_unbiased_for_the_kl():
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    samples = torch.multinomial(p, 200_000, replacement=True)
    true_kl = (p * (p / q).log()).sum().item()
    for kind in ("k1", "k3"):
        estimate = kl_estimate(p.log()[samples], q.log()[samples], kind).mean().item()
        assert estimate == pytest.approx(true_kl, abs=5e-3)


def test_seed_000s_k3_is_not_the_kl_on_samples_of_the_policy():
    """Seed notebook 000 writes k3 as ``(r - 1) - log r`` with r = pi / pi_ref on samples of pi:
    Schulman's k3 for KL(pi_ref || pi). Its mean tends to E_pi[r] - 1 - KL(pi || pi_ref)
    (here 1.525 - 1 - 0.277 = 0.248), not the KL (0.277), which kl_estimate's k3 reaches."""
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    samples = torch.multinomial(p, 200_000, replacement=True)
    true_kl = (p * (p / q).log()).sum().item()
    log_r = (p.log() - q.log())[samples]  # log pi/pi_ref on samples of pi
    notebook = (torch.expm1(log_r) - log_r).mean().item()
    assert notebook == pytest.approx((p * p / q).sum().item() - 1 - true_kl, abs=5e-3)
    assert abs(notebook - true_kl) > 0.02
    assert kl_estimate(p.log()[samples], q.log()[samples], "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_group_and_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two prompts of three samples
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    grouped = group_advantages(rewards, 3, "group").tolist()
    assert grouped == pytest.approx([2 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), 0, 0, 0])
    batch = group_advantages(rewards, 3, "batch").tolist()
    assert batch[0] == pytest.approx(2 / 3 / (rewards.std().item() + 1e-4))
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, 0, 0, 0])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    losses, ratio, clipped = clipped_policy_loss(new, old, torch.tensor([[1.0, -1.0, 1.0]]), clip_low=0.2)
    # A > 0 with r = 1.5 is clipped to 1.2; A < 0 with r = 0.5 is clipped to 0.8; r = 1.1 is inside.
    assert losses[0].tolist() == pytest.approx([-1.2, 0.8, -1.1])
    assert clipped.tolist() == [[1.0, 1.0, 0.0]] and ratio[0].tolist() == pytest.approx([1.5, 0.5, 1.1])
    higher, _, _ = clipped_policy_loss(new, old, torch.ones(1, 3), clip_low=0.2, clip_high=0.28)
    assert higher[0, 0].item() == pytest.approx(-1.28)


def test_clipped_value_loss_by_hand():
    losses, clipped = clipped_value_loss(
        torch.tensor([[2.0, 0.5]]), torch.tensor([[1.0, 0.2]]), torch.tensor([[0.0, 0.5]]), cliprange_value=0.2
    )
    # First token: unclipped (2 - 0)^2 = 4, clipped (1.2 - 0)^2 = 1.44 -> max 4. Second: 0 vs 0.01.
    assert losses[0].tolist() == pytest.approx([2.0, 0.005]) and clipped.tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_aggregate_loss_by_hand_and_over_micro_batches(loss_type):
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {"grpo": (2.0 + 4.0) / 2, "dr_grpo": 10.0 / (2 * 5), "dapo": 10.0 / 4, "bnpo": 10.0 / 4}[loss_type]
    assert aggregate_loss(losses, mask, loss_type, max_length=5).item() == pytest.approx(expected)
    parts = [
        aggregate_loss(losses[i : i + 1], mask[i : i + 1], loss_type, max_length=5, num_sequences=2, num_tokens=4)
        for i in range(2)
    ]
    assert sum(parts).item() == pytest.approx(expected)


def test_group_token_mean_by_hand():
    # Two groups of two rows: (1 + 2 + 3 + 4) / 4 tokens = 2.5, and (2 + 2) / 2 tokens = 2 (the
    # last row has no tokens); the mean over groups is 2.25 (grpo: 2, dapo: 14 / 6).
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [2.0, 2.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert aggregate_loss(losses, mask, "group_token_mean", group_size=2).item() == pytest.approx(2.25)
    kwargs = dict(loss_type="group_token_mean", num_sequences=4, group_size=2)
    parts = [aggregate_loss(losses[i : i + 2], mask[i : i + 2], **kwargs) for i in (0, 2)]
    assert parts[0].item() == pytest.approx(2.5 / 2) and parts[1].item() == pytest.approx(2.0 / 2)
    with pytest.raises(ValueError, match="whole groups"):  # a micro-batch that splits a group
        aggregate_loss(losses[:1], mask[:1], "group_token_mean", num_sequences=4, group_size=2)
    with pytest.raises(ValueError, match="whole groups"):
        aggregate_loss(losses, mask, "group_token_mean")


@pytest.mark.parametrize(("groups", "group_size", "length"), [(1, 2, 1), (3, 4, 7), (4, 3, 5), (6, 2, 9)])
def test_group_token_mean_matches_a_naive_loop_and_adds_over_micro_batches(groups, group_size, length):
    g = torch.Generator().manual_seed(100 * groups + 10 * group_size + length)
    losses = torch.randn(groups * group_size, length, generator=g)
    mask = (torch.rand(groups * group_size, length, generator=g) < 0.6).float()  # (R, T)
    if groups > 2:
        mask[-group_size:] = 0  # a group without tokens counts as 0
    expected = 0.0
    for k in range(groups):
        total, count = 0.0, 0
        for i in range(k * group_size, (k + 1) * group_size):
            for t in range(length):
                if mask[i, t]:
                    total, count = total + losses[i, t].item(), count + 1
        expected += (total / count if count else 0.0) / groups
    whole = aggregate_loss(losses, mask, "group_token_mean", group_size=group_size)
    assert whole.item() == pytest.approx(expected, abs=1e-6)
    for per_micro in range(1, groups + 1):  # micro-batches of whole groups, the last one maybe smaller
        rows = per_micro * group_size
        parts = [
            aggregate_loss(part, m, "group_token_mean", num_sequences=len(losses), group_size=group_size)
            for part, m in zip(losses.split(rows), mask.split(rows))
        ]
        assert sum(parts).item() == pytest.approx(expected, abs=1e-6)


def test_dapo_over_ranks_is_one_token_mean():
    """Each DDP rank divides its token sum by global tokens / world size; the ranks' mean (what DDP
    does to gradients) is then the token mean over the whole minibatch, while bnpo's, each rank
    divided by its own count, is not."""
    g = torch.Generator().manual_seed(0)
    losses = [torch.randn(4, 6, generator=g) for _ in range(2)]
    masks = [torch.ones(4, 6), (torch.arange(6) < 2).float().expand(4, 6)]  # 24 and 8 tokens
    global_tokens = sum(m.sum() for m in masks)
    dapo = [aggregate_loss(x, m, "dapo", num_tokens=global_tokens / 2) for x, m in zip(losses, masks)]
    pooled = aggregate_loss(torch.cat(losses), torch.cat(masks), "dapo")
    assert (sum(dapo) / 2).item() == pytest.approx(pooled.item(), abs=1e-6)
    bnpo = [aggregate_loss(x, m, "bnpo") for x, m in zip(losses, masks)]
    assert (sum(bnpo) / 2).item() != pytest.approx(pooled.item(), abs=1e-3)


def test_entropy_and_explained_variance():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert controller.update(current_kl=12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert controller.update(current_kl=3.0, n_steps=100) == pytest.approx(
        0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 100 / 10000)
    )


def test_abs_kl_estimator_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert kl_estimate(logp, ref, "abs").tolist() == pytest.approx([0.5, 1.0, 0.0])


def test_next_token_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]]))  # (1, 3, 2)
    ids, mask = torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]])  # position 0 predicts 1: 0.5; 1 predicts 0: 0.2
    assert next_token_loss(logits, ids, mask).item() == pytest.approx((-math.log(0.5) - math.log(0.2)) / 2)
    assert next_token_loss(logits, ids, torch.tensor([[0, 0, 1]])).item() == pytest.approx(-math.log(0.2))


def test_token_kl_is_the_exact_kl_over_the_vocabulary():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.25, 0.25])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert token_kl(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    assert token_kl(p.log(), p.log()).item() == 0.0


@pytest.mark.parametrize("n", [5, 40])
def test_conjugate_gradient_solves_a_random_spd_system(n):
    g = torch.Generator().manual_seed(n)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x, residual = conjugate_gradient(lambda v: A @ v, b, iters=4 * n)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-5)
    assert residual < 1e-4
    few, early = conjugate_gradient(lambda v: A @ v, b, iters=2)  # stops after 2 steps
    assert early > residual and not torch.allclose(few, x, atol=1e-5)


def test_trpo_step_meets_the_kl_bound_of_the_quadratic_model():
    H = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    x = torch.tensor([0.3, -0.7])
    step, scale = trpo_step(x, H @ x, max_kl=0.01)
    assert 0.5 * step @ H @ step == pytest.approx(0.01, rel=1e-5)
    assert torch.allclose(step, scale * x)


def test_simpo_loss_by_hand():
    losses, chosen, rejected = simpo_loss(torch.tensor([-0.5, -1.0]), torch.tensor([-1.0, -0.5]), beta=2.0, gamma=1.0)
    # margins: 2(-0.5) - 2(-1) - 1 = 0 and 2(-1) - 2(-0.5) - 1 = -2
    assert torch.allclose(losses, torch.tensor([math.log(2), math.log(1 + math.exp(2))]))
    assert torch.equal(chosen, torch.tensor([-1.0, -2.0])) and torch.equal(rejected, torch.tensor([-2.0, -1.0]))
    losses, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-0.5]), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(1.5)))


def test_log1mexp_is_accurate_at_both_ends():
    x = -torch.logspace(-12, 2, 200, dtype=torch.float64)
    naive = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), naive, rtol=1e-12)
    assert log1mexp(torch.tensor(-1e-10)).item() == pytest.approx(math.log(1e-10), rel=1e-6)  # float32


def test_orpo_gradient_is_finite_where_an_answer_is_certain():
    """An average log-probability of 0, or within float32's rounding of it, gave a finite loss
    with a NaN gradient (issue 33); the values elsewhere are unchanged (float64 reference)."""
    near = [0.0, -1e-45, -1e-30, -1e-9, -1e-8, -6e-8, -1e-7, -1e-3, -0.69, -0.7, -5.0]
    chosen = torch.tensor([c for c in near for _ in near], requires_grad=True)
    rejected = torch.tensor([r for _ in near for r in near], requires_grad=True)
    losses, log_odds_ratio = orpo_loss(chosen, rejected, lam=0.5)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds_ratio).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    x = torch.tensor(near)
    assert torch.isfinite(torch.autograd.functional.jacobian(log1mexp, x)).all()
    away = -torch.rand(200, dtype=torch.float64) * 10 - 1e-6
    c, r = away[:100].float().requires_grad_(), away[100:].float().requires_grad_()
    expected = orpo_loss(away[:100], away[100:], lam=0.5)[0]
    assert torch.allclose(orpo_loss(c, r, lam=0.5)[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_orpo_loss_by_hand():
    # P_c = 0.5 (odds 1), P_r = 0.2 (odds 0.25): log odds ratio log 4, L_OR = log 1.25
    losses, log_odds_ratio = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lam=0.1)
    assert log_odds_ratio.item() == pytest.approx(math.log(4))
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25))
    chosen, rejected = -torch.rand(50, dtype=torch.float64) * 5, -torch.rand(50, dtype=torch.float64) * 5
    odds = [(math.exp(c) / (1 - math.exp(c))) / (math.exp(r) / (1 - math.exp(r))) for c, r in zip(chosen, rejected)]
    naive = [-c - 0.3 * math.log(o / (1 + o)) for c, o in zip(chosen.tolist(), odds)]  # -log s(log o) = -log(o/(1+o))
    assert torch.allclose(orpo_loss(chosen, rejected, lam=0.3)[0], torch.tensor(naive, dtype=torch.float64))


def test_kto_loss_by_hand():
    logps, ref = torch.tensor([-2.0, -3.0], requires_grad=True), torch.tensor([-4.0, -1.0])  # rewards 2, -2
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.5, requires_grad=True)
    losses, rewards = kto_loss(logps, ref, desirable, kl, beta=0.1)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert torch.allclose(losses, torch.tensor([1 - sigmoid(0.15), 1 - sigmoid(0.25)]))
    assert torch.allclose(rewards, torch.tensor([0.2, -0.2]))
    losses.sum().backward()
    assert kl.grad is None and logps.grad[0] < 0 < logps.grad[1]  # z0 detached; desirable up, undesirable down
    losses, _ = kto_loss(logps.detach(), ref, desirable, torch.tensor(-1.0), beta=0.1, desirable_weight=2.0)
    assert losses[0].item() == pytest.approx(2 * (1 - sigmoid(0.2)))  # a negative KL estimate clamps to 0


def test_kto_loss_against_a_loop():
    logps, ref = torch.randn(40, dtype=torch.float64) * 3, torch.randn(40, dtype=torch.float64) * 3
    desirable, kl = torch.rand(40) < 0.5, torch.tensor(0.7, dtype=torch.float64)
    losses, _ = kto_loss(logps, ref, desirable, kl, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    for i in range(40):
        r = (logps[i] - ref[i]).item()
        if desirable[i]:
            want = 1.0 - 1 / (1 + math.exp(-0.3 * (r - 0.7)))
        else:
            want = 1.5 - 1.5 / (1 + math.exp(-0.3 * (0.7 - r)))
        assert losses[i].item() == pytest.approx(want, abs=1e-12)


def test_truncated_importance_weights_by_hand():
    """min(pi_train / pi_rollout, cap), detached: exp(0.5) = 1.6487, exp(-1) = 0.3679, and
    exp(2) = 7.39 cut to the cap of 2."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, -2.5]])
    weights = truncated_importance_weights(logprobs, rollout, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.6487213, 0.3678794, 2.0]]))
    assert not weights.requires_grad
    assert torch.equal(truncated_importance_weights(rollout, rollout), torch.ones_like(rollout))  # on-policy: 1


# --------------------------------------------------------------------------------------------
# GSPO, CISPO and SAPO
# --------------------------------------------------------------------------------------------
def _family_inputs(seed: int, rows: int = 4, tokens: int = 6):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(rows, tokens, generator=g) * 3).requires_grad_()
    old = logprobs.detach() + torch.randn(rows, tokens, generator=g) * 0.3
    advantages = torch.randn(rows, 1, generator=g)
    mask = (torch.rand(rows, tokens, generator=g) > 0.25).float()
    mask[:, 0] = 1  # every row has a token
    return logprobs, old, advantages, mask


def test_gspo_sequence_ratio_and_loss_by_hand():
    """One row of two tokens: log ratios 0.2 and -0.4 give s = exp(-0.1) = 0.904837 for both.
    With epsilon 0.05, A = 1 takes min(sA, 0.95A) = s, unclipped; A = -1 takes the clipped
    -0.95 (a loss of 0.95 on each token)."""
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    old = torch.tensor([[-1.2, -1.6, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is an observation: out of the ratio
    losses, ratio, clipped = policy_loss(logprobs, old, torch.tensor([[1.0]]), mask, "clip", "sequence", 0.05)
    assert torch.allclose(ratio, torch.full((1, 3), math.exp(-0.1)))
    assert torch.allclose(losses[0, :2], torch.full((2,), -math.exp(-0.1))) and not clipped.any()
    losses, _, clipped = policy_loss(logprobs, old, torch.tensor([[-1.0]]), mask, "clip", "sequence", 0.05)
    assert torch.allclose(losses[0, :2], torch.full((2,), 0.95)) and clipped[0, :2].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("seed", range(20))
def test_gspo_equals_the_papers_objective_in_a_loop(seed):
    """GSPO eq. 5 and 7, one sequence at a time: s_i = (prod_t r_t) ** (1 / |y_i|) over the row's
    own tokens, J = mean_i min(s_i A_i, clip(s_i) A_i); value and gradient match the batched loss
    aggregated per sequence (``grpo``)."""
    logprobs, old, advantages, mask = _family_inputs(seed)
    losses, _, _ = policy_loss(logprobs, old, advantages, mask, "clip", "sequence", 0.1, 0.15)
    batched = aggregate_loss(losses, mask, "grpo")
    (grad,) = torch.autograd.grad(batched, logprobs)
    naive = 0.0
    for i in range(len(logprobs)):
        tokens = mask[i].bool()
        s = torch.prod((logprobs[i][tokens] - old[i][tokens]).exp()) ** (1 / int(tokens.sum()))
        a = advantages[i, 0]
        naive = naive - torch.minimum(s * a, s.clamp(0.9, 1.15) * a)
    naive = naive / len(logprobs)
    (naive_grad,) = torch.autograd.grad(naive, logprobs)
    assert torch.allclose(batched, naive, atol=1e-6)
    assert torch.allclose(grad, naive_grad, atol=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_cispo_equals_minimax_m1s_objective_in_a_loop(seed):
    """MiniMax-M1 eq. 4 token by token: -sg(min(r, 1 + e)) A log pi, summed over all tokens and
    divided by their count (``dapo``); every token keeps a gradient, clipped or not."""
    logprobs, old, advantages, mask = _family_inputs(seed)
    losses, _, clipped = policy_loss(logprobs, old, advantages, mask, "cispo", clip_high=0.1)
    batched = aggregate_loss(losses, mask, "dapo")
    (grad,) = torch.autograd.grad(batched, logprobs)
    naive, tokens = 0.0, 0
    for i, t in mask.nonzero().tolist():
        r = math.exp(float(logprobs[i, t] - old[i, t]))
        naive = naive - min(r, 1.1) * float(advantages[i, 0]) * logprobs[i, t]
        tokens += 1
    naive = naive / tokens
    (naive_grad,) = torch.autograd.grad(naive, logprobs)
    assert torch.allclose(batched, naive, atol=1e-6) and torch.allclose(grad, naive_grad, atol=1e-6)
    assert clipped[mask.bool()].any() and (grad[mask.bool()] != 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_sapo_equals_its_soft_gate_token_by_token(seed):
    """SAPO: -(4 / tau) sigmoid(tau (r - 1)) A per token, tau 1.0 for A > 0 and 1.05 otherwise."""
    logprobs, old, advantages, mask = _family_inputs(seed)
    losses, ratio, _ = policy_loss(logprobs, old, advantages, mask, "sapo")
    for i in range(len(logprobs)):
        a = float(advantages[i, 0])
        tau = 1.0 if a > 0 else 1.05
        for t in range(logprobs.size(1)):
            r = math.exp(float(logprobs[i, t] - old[i, t])) if mask[i, t] else 1.0  # off the mask: ratio 1
            expected = -(4 / tau) / (1 + math.exp(-tau * (r - 1))) * a
            assert abs(float(losses[i, t]) - expected) < 1e-5 and abs(float(ratio[i, t]) - r) < 1e-5


def test_sapo_gate_by_hand():
    """r = 1: loss -2 A / tau * ... = -(4 / 1) * 0.5 * A = -2A, gradient weight 1; r = 3 with
    tau 1: weight 4 s (1 - s) at s = sigmoid(2) = 0.880797 is 0.419974 < 1/2: gated."""
    ratio_one = torch.zeros(1, 1, requires_grad=True)
    losses, _, gated = policy_loss(ratio_one, torch.zeros(1, 1), torch.tensor([[1.5]]), torch.ones(1, 1), "sapo")
    assert torch.allclose(losses, torch.tensor([[-3.0]])) and gated.item() == 0
    (grad,) = torch.autograd.grad(losses.sum(), ratio_one)
    assert torch.allclose(grad, torch.tensor([[-1.5]]))  # the policy gradient: -A
    far = torch.tensor([[math.log(3.0)]])
    _, _, gated = policy_loss(far, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), "sapo")
    assert gated.item() == 1


@pytest.mark.parametrize("kind", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_every_objective_is_the_policy_gradient(kind, level):
    """old = pi, detached: the ratio is exactly 1 and the gradient of each token's loss is -A."""
    logprobs, _, advantages, mask = _family_inputs(3)
    losses, ratio, clipped = policy_loss(logprobs, logprobs.detach(), advantages, mask, kind, level)
    assert torch.equal(ratio, torch.ones_like(ratio)) and not clipped.any()
    (grad,) = torch.autograd.grad(masked_sum(losses, mask), logprobs)
    if level == "sequence":  # the row's loss is one value on each of its n tokens: n x (-A / n) in all
        assert torch.allclose(masked_sum(grad, mask, dim=1), -advantages[:, 0] * mask.sum(1), atol=1e-6)
    else:
        assert torch.allclose(grad, (-advantages * mask).expand_as(grad), atol=1e-6)


def test_observations_stay_out_of_the_sequence_ratio():
    logprobs, old, advantages, mask = _family_inputs(5)
    moved = logprobs.detach().clone()
    moved[mask == 0] -= 5.0  # what the policy would give the observation tokens does not count
    a = importance_ratio(logprobs.detach(), old, mask, "sequence")
    b = importance_ratio(moved, old, mask, "sequence")
    assert torch.equal(a, b) and not torch.equal(a, importance_ratio(moved, old, torch.ones_like(mask), "sequence"))


@pytest.mark.parametrize(("advantage", "expected"), [(1.0, -1.402), (-1.0, 1.320)])
def test_sapo_gradient_off_policy_by_hand(advantage, expected):
    """d loss / d log pi = -4 s (1 - s) r A with s = sigmoid(tau (r - 1)), r = e: tau 1 for A = 1
    gives -1.4018, tau 1.05 for A = -1 gives +1.3203 (the gate, not a bare -r A)."""
    logprobs = torch.ones(1, 1, requires_grad=True)
    losses, _, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), "sapo")
    (grad,) = torch.autograd.grad(losses.sum(), logprobs)
    assert grad.item() == pytest.approx(expected, abs=1e-3)


def test_each_kind_flags_its_own_cut():
    """Ratios 0.05 … 3 with epsilon 0.2 / 0.28: PPO clips above 1.28 for A > 0 and below 0.8 for
    A < 0; CISPO caps the weight above 1.28 whatever the sign; SAPO's gate halves the update only
    above r of about 2.7; nothing is flagged where A = 0."""
    ratios = torch.tensor([[0.05, 0.5, 0.8, 1.25, 2.0, 2.6, 3.0]])
    flags = {}
    for a in (1.0, -1.0, 0.0):
        for kind in ("clip", "cispo", "sapo"):
            _, _, cut = policy_loss(
                ratios.log(),
                torch.zeros_like(ratios),
                torch.tensor([[a]]),
                torch.ones_like(ratios),
                kind,
                clip_low=0.2,
                clip_high=0.28,
            )
            flags[kind, a] = cut[0].int().tolist()
    assert flags["clip", 1.0] == [0, 0, 0, 0, 1, 1, 1] and flags["clip", -1.0] == [1, 1, 0, 0, 0, 0, 0]
    assert flags["cispo", 1.0] == flags["cispo", -1.0] == [0, 0, 0, 0, 1, 1, 1]
    assert flags["sapo", 1.0] == flags["sapo", -1.0] == [0, 0, 0, 0, 0, 0, 1]
    assert all(sum(flags[kind, 0.0]) == 0 for kind in ("clip", "cispo", "sapo"))


def test_the_sequence_ratio_refuses_what_it_cannot_mean():
    logprobs = torch.tensor([[-1.0, -float("inf")]])
    mask = torch.tensor([[1.0, 0.0]])  # a non-finite value off the mask does not reach the ratio
    assert torch.allclose(
        importance_ratio(logprobs, torch.tensor([[-1.2, -1.0]]), mask, "sequence"), torch.full((1, 2), math.exp(0.2))
    )
    with pytest.raises(ValueError, match="Unknown importance sampling level 'tokens'"):
        importance_ratio(logprobs, logprobs, mask, "tokens")
    with pytest.raises(ValueError, match="needs float32 log-probabilities, got torch.bfloat16"):
        importance_ratio(logprobs.bfloat16(), logprobs.bfloat16(), mask, "sequence")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["clip", "cispo", "sapo"])
def test_a_non_finite_log_ratio_off_the_mask_leaves_the_loss_finite(kind, level):
    """Padding's log-probabilities are never the policy's: a log-ratio past float32's ``exp``
    (about 88) there must not turn a masked-out token's loss into inf times 0."""
    logprobs = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -100.0]])  # the second token's ratio would be e^100: inf in float32
    mask, advantages = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0]])
    losses, ratio, _ = policy_loss(logprobs, old, advantages, mask, kind, level)
    loss = aggregate_loss(losses, mask, "grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert ratio[0, 1] == (1.0 if level == "token" else ratio[0, 0])
    padding = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)  # log pi itself non-finite there
    losses, _, _ = policy_loss(padding, old, advantages, mask, kind, level)
    loss = aggregate_loss(losses, mask, "grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(padding.grad).all() and padding.grad[0, 1] == 0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_a_masked_kl_estimate_is_zero_on_padding_and_unchanged_elsewhere(kind):
    """Padding's log-probabilities are nobody's: a gap past float32's ``expm1`` (k3) there must
    give 0, not inf (which ``* mask`` would turn into NaN), and keep the gradient finite."""
    logprobs = torch.tensor([[-1.0, -200.0], [-0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    kl = kl_estimate(logprobs, ref, kind, mask)
    kl.sum().backward()
    assert kl[0, 1] == 0 and torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0
    unmasked = kl_estimate(logprobs.detach(), ref, kind)
    assert torch.equal(kl.detach()[mask.bool()], unmasked[mask.bool()])


def test_ppo_clip_with_a_mask_stays_finite_on_padding():
    logprobs = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -100.0]])  # padding's ratio would be e^100: inf in float32
    losses, ratio, clipped = clipped_policy_loss(
        logprobs, old, torch.tensor([[-1.0]]), 0.2, mask=torch.tensor([[1, 0]])
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logprobs.grad).all() and ratio[0, 1] == 1
    same, _, _ = clipped_policy_loss(logprobs.detach(), old, torch.tensor([[-1.0]]), 0.2)  # no mask: every token
    assert losses[0, 0] == same[0, 0]
