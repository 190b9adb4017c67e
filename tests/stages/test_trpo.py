"""TRPO: Fisher-vector products, the trust region, the line search, DDP and learning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import ARITH, LEARNING_SEED, SpreadReward, fit_online, learned, tiny_trainer

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import sample_responses
from shraygpt_rl.generation import response_logits
from shraygpt_rl.losses import masked_sum, token_kl
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages.online import Rollout
from shraygpt_rl.stages.trpo import TRPOStage, split_like

LORA = {"r": 1, "alpha": 2, "target_modules": ["wq"]}  # 256 trainable numbers: a Hessian we can afford


def _stage(policy: str, **kwargs) -> TRPOStage:
    defaults = dict(
        policy=policy,
        rewards=[SpreadReward()],
        max_new_tokens=6,
        optimizer="adamw",
        lr=1e-3,
        export_path=None,
        log_samples_every=0,
    )
    torch.manual_seed(0)
    return TRPOStage(**{**defaults, **kwargs})


def _rollout(stage: TRPOStage, rows: int = 6) -> tuple[Rollout, list[torch.Tensor], dict[str, torch.Tensor]]:
    """A sampled rollout of the stage's policy, its micro-batches, and a buffer with random
    advantages (TRPO's step does not care where they came from)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 320, (rows, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, :2] = 0  # some left padding
    out = stage.policy.eval().generate(ids, 6, attention_mask=mask, generator=g, engine="eager")
    stage.policy.train()
    n = len(ids)
    rollout = Rollout(
        out.sequences,
        out.attention_mask,
        out.response_mask.float(),
        out.prompt_length,
        [""] * n,
        [""] * n,
        [{}] * n,
        torch.zeros(n),
    )
    micros = list(torch.arange(n).split(stage.hparams.micro_batch_size or n))
    logprobs = stage.logprobs_under(stage.policy, rollout, [torch.arange(n)])
    advantages = torch.randn(logprobs.shape, generator=g) * rollout.response_mask
    return rollout, micros, {"logprobs": logprobs, "advantages": advantages}


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_fisher_vector_product_is_the_hessian_of_the_response_kl(random_policy, perturb_adapters, micro_batch_size):
    """``(H + damping) v - damping v`` against ``H v`` with H from torch.autograd.functional.hessian
    of the mean response KL(pi_old || pi_theta) (a sum over tokens, a mean over responses), at
    theta = the rollout policy."""
    stage = _stage(random_policy, lora=LORA, damping=0.1, micro_batch_size=micro_batch_size)
    perturb_adapters(stage.policy)  # away from B = 0, where some second derivatives vanish
    rollout, micros, buffer = _rollout(stage)
    at_old = stage.linearise(rollout, micros, buffer)
    params = at_old.params
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    names = [n for n, p in stage.policy.named_parameters() if p.requires_grad]
    old = torch.cat(at_old.tables)  # (R, T, V), in micro-batch order = row order

    def mean_kl(flat_theta):
        tensors = dict(zip(names, split_like(flat_theta, params)))
        policy = _Logits(stage.policy, rollout, stage.hparams.temperature)
        table = torch.func.functional_call(policy, {f"policy.{k}": v for k, v in tensors.items()}, ())
        return masked_sum(token_kl(old, table.log_softmax(-1)), rollout.response_mask) / len(rollout)

    H = torch.autograd.functional.hessian(mean_kl, theta)  # (P, P)
    assert H.shape == (256, 256) and H.abs().max() > 0
    for seed in range(3):
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(at_old.fisher(v) - 0.1 * v, H @ v, atol=1e-5, rtol=1e-4)
    assert abs(float(at_old.ratio_furthest) - 1) < 1e-6  # the surrogate's ratio is 1 on-policy


class _Logits(torch.nn.Module):
    """The policy's response logits as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, policy, rollout, temperature):
        super().__init__()
        self.policy, self.rollout, self.temperature = policy, rollout, temperature

    def forward(self):
        r = self.rollout
        return response_logits(self.policy, r.sequences, r.attention_mask, r.prompt_length, self.temperature)[0]


def _kl_to(stage: TRPOStage, rollout, tables) -> tuple[float, float]:
    """The mean response KL and the largest state KL of the stage's policy from ``tables``, by a
    loop over responses and tokens (the stage computes them batched)."""
    with torch.no_grad():
        table, _ = stage.log_softmax(rollout, torch.arange(len(rollout)))
    old, per_response, largest = torch.cat(tables), [], 0.0
    for i in range(len(rollout)):
        kls = [float(token_kl(old[i, t], table[i, t])) for t in range(old.size(1)) if rollout.response_mask[i, t]]
        per_response.append(sum(kls))
        largest = max([largest, *kls])
    return sum(per_response) / len(per_response), largest


@pytest.mark.parametrize("kl_constraint", ["response", "max_state"])
def test_an_accepted_step_stays_inside_the_trust_region(random_policy, kl_constraint):
    """The measured KL that ``kl_constraint`` names is within max_kl, the figures the step logs are
    the loop's, and the improvement is at least accept_ratio of the linear model's."""
    stage = _stage(random_policy, max_kl=0.05, kl_constraint=kl_constraint, accept_ratio=0.1)
    rollout, micros, buffer = _rollout(stage)
    tables = stage.linearise(rollout, micros, buffer).tables
    before = [p.detach().clone() for p in stage.policy_parameters()]
    metrics = stage.policy_step(rollout, micros, buffer)
    assert float(metrics["trpo/step_fraction"]) > 0, "this step should be accepted"
    assert metrics["trpo/surrogate_improvement"] > 0
    assert float(metrics["trpo/expected_improvement_ratio"]) >= 0.1
    kl, largest = _kl_to(stage, rollout, tables)
    assert kl == pytest.approx(float(metrics["trpo/kl"]), rel=1e-4)
    assert largest == pytest.approx(float(metrics["trpo/max_state_kl"]), rel=1e-4)
    assert 0 < (kl if kl_constraint == "response" else largest) <= 0.05
    assert any(not torch.equal(a, b) for a, b in zip(before, stage.policy_parameters()))


def _candidates(improvements, kls, max_state_kls=None):
    """A stand-in for ``TRPOStage.evaluate`` that gives the line search's j-th candidate the j-th
    figures (the last ones repeat), and the list of candidates it was asked for."""
    tried = []

    def evaluate(*args):
        j = len(tried)
        tried.append(j)
        at = lambda values: torch.tensor(values[min(j, len(values) - 1)])  # noqa: E731
        return {
            "surrogate": at(improvements),
            "kl": at(kls),
            "max_state_kl": at(kls if max_state_kls is None else max_state_kls),
            "flip_rate": torch.tensor(0.5),
        }

    return evaluate, tried


def test_a_rejected_step_leaves_every_parameter_bit_for_bit(random_policy, monkeypatch):
    stage = _stage(random_policy, max_backtracks=3)
    rollout, micros, buffer = _rollout(stage)
    before = {n: p.detach().clone() for n, p in stage.policy.named_parameters()}
    evaluate, tried = _candidates([-1.0], [0.0])  # every candidate lowers the surrogate
    monkeypatch.setattr(stage, "evaluate", evaluate)
    metrics = stage.policy_step(rollout, micros, buffer)
    assert len(tried) == 4  # the full step and three shrinkings
    assert float(metrics["trpo/step_fraction"]) == 0 and float(metrics["trpo/line_search_failures"]) == 1
    assert float(metrics["policy/argmax_flip_rate"]) == 0 and float(metrics["trpo/kl"]) == 0
    assert all(torch.equal(before[n], p) for n, p in stage.policy.named_parameters())


def _line_search(stage, candidates, expected=1.0):
    """The line search over a unit step whose linear model expects ``expected``, the surrogate
    starting at 0; its metrics and the candidates it evaluated."""
    rollout, micros, buffer = _rollout(stage)
    step = torch.zeros(sum(p.numel() for p in stage.policy_parameters()))
    evaluate, tried = candidates
    stage.evaluate = evaluate
    found = stage.line_search(rollout, micros, buffer, [], step, expected, torch.tensor(0.0), stage.hparams.max_kl)
    return found, tried


def test_the_line_search_wants_a_tenth_of_the_expected_improvement(random_policy):
    """TRPO's appendix C: a candidate that improves the surrogate, but by less than accept_ratio of
    what the linear model expects at its size, is shrunk, not kept."""
    stage = _stage(random_policy, max_kl=0.05, backtrack_ratio=0.5, max_backtracks=3, accept_ratio=0.1)
    # Expected 1 at the full step, 0.5 at half: 0.05 is under a tenth of both; 0.06 at a quarter is not.
    found, tried = _line_search(stage, _candidates([0.05, 0.04, 0.06], [0.01]))
    assert tried == [0, 1, 2] and float(found["trpo/step_fraction"]) == 0.25
    stage = _stage(random_policy, max_kl=0.05, accept_ratio=0.0)  # any improvement will do
    found, tried = _line_search(stage, _candidates([0.05], [0.01]))
    assert tried == [0] and float(found["trpo/step_fraction"]) == 1


@pytest.mark.parametrize("kl_constraint", ["response", "max_state"])
def test_the_line_search_checks_the_kl_the_constraint_names(random_policy, kl_constraint):
    """Mean response KL 0.01 within delta 0.05 at every size; the largest state KL 0.2, then 0.04.
    ``response`` keeps the full step, ``max_state`` the first size whose largest state KL fits."""
    stage = _stage(random_policy, max_kl=0.05, backtrack_ratio=0.5, kl_constraint=kl_constraint)
    found, tried = _line_search(stage, _candidates([0.9, 0.45], [0.01, 0.01], [0.2, 0.04]))
    assert float(found["trpo/step_fraction"]) == (1.0 if kl_constraint == "response" else 0.5)
    found, tried = _line_search(stage, _candidates([0.9], [0.08]))  # over delta at every size
    assert float(found["trpo/step_fraction"]) == 0 and len(tried) == stage.hparams.max_backtracks + 1


def test_the_trust_region_decays_linearly_over_the_rollouts(random_policy):
    stage = _stage(random_policy, max_kl=0.08, max_kl_end=0.02, vf_iters=2)
    deltas = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            deltas.append(module.trust_region())

    fit_online(stage, max_steps=8, prompts=dict(ARITH, batch_size=4, train_size=32), callbacks=[Record()])
    assert deltas == pytest.approx([0.08, 0.06, 0.04, 0.02])  # 4 rollouts of vf_iters 2 steps
    assert _stage(random_policy, max_kl=0.08).trust_region() == 0.08


def test_the_flip_rate_counts_states_whose_most_likely_token_changed(random_policy):
    """``policy/argmax_flip_rate`` after an accepted step against a loop over the response states."""
    stage = _stage(random_policy, max_kl=0.5, accept_ratio=0.0)
    rollout, micros, buffer = _rollout(stage)
    old = torch.cat(stage.linearise(rollout, micros, buffer).tables)
    metrics = stage.policy_step(rollout, micros, buffer)
    assert float(metrics["trpo/step_fraction"]) > 0
    with torch.no_grad():
        new = stage.log_softmax(rollout, torch.arange(len(rollout)))[0]
    states = [(i, t) for i in range(len(rollout)) for t in range(old.size(1)) if rollout.response_mask[i, t]]
    flips = sum(int(old[i, t].argmax() != new[i, t].argmax()) for i, t in states)
    assert float(metrics["policy/argmax_flip_rate"]) == pytest.approx(flips / len(states))
    assert flips > 0  # a step this large on a random policy moves some modes


def test_only_the_critic_learns_during_its_warmup(random_policy):
    """Two warm-up rollouts of vf_iters 2 steps leave the policy bit for bit and move the critic;
    a third rollout moves the policy."""
    stage = _stage(random_policy, critic_warmup=2, vf_iters=2, max_kl=0.05)
    policy_before = {n: p.detach().clone() for n, p in stage.policy.named_parameters()}
    critic_before = [p.detach().clone() for p in stage.critic.parameters()]
    fit_online(stage, max_steps=4, prompts=dict(ARITH, batch_size=8, train_size=32))
    assert all(torch.equal(policy_before[n], p) for n, p in stage.policy.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, stage.critic.parameters()))
    fit_online(stage, max_steps=6, prompts=dict(ARITH, batch_size=8, train_size=32))  # a third rollout
    assert any(not torch.equal(policy_before[n], p) for n, p in stage.policy.named_parameters())


def test_bad_trust_region_options_are_refused(random_policy):
    bad_options = (dict(max_kl=0), dict(max_kl_end=-1.0), dict(kl_constraint="token"), dict(accept_ratio=1.0))
    for bad in (*bad_options, dict(critic_warmup=-1)):
        with pytest.raises(ValueError):
            _stage(random_policy, **bad)


def test_trpo_trains_the_critic_and_logs_its_figures(random_policy):
    stage = _stage(random_policy, vf_iters=3, num_mini_batches=2)
    critic_before = [p.detach().clone() for p in stage.critic.parameters()]
    metrics = fit_online(stage, max_steps=6, prompts=dict(ARITH, batch_size=8, train_size=32))  # 2 rollouts
    assert stage.global_step == 6
    wanted = "trpo/kl trpo/step_fraction trpo/surrogate_improvement trpo/cg_residual trpo/line_search_failures "
    wanted += "trpo/expected_improvement_ratio trpo/max_state_kl trpo/max_kl policy/argmax_flip_rate "
    wanted += "value/loss objective/kl policy/ratio_at_start reward/mean"
    assert set(wanted.split()) <= set(metrics)
    assert abs(metrics["policy/ratio_at_start"] - 1) < 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, stage.critic.parameters()))
    assert metrics["trpo/kl"] <= stage.hparams.max_kl


def _held_out_spread(policy, data) -> float:
    """Mean ``SpreadReward`` of one response per validation prompt, sampled at T = 1."""
    responses = sample_responses(policy, data, split="val", max_new_tokens=8)
    return float(SpreadReward()(responses.prompts, responses.texts, responses.metadata).mean())


@pytest.mark.slow
@pytest.mark.timeout(600)  # 90-110 s on an idle 2-core machine, twice that on a busy one
def test_trpo_raises_held_out_reward(random_policy):
    """From a random tiny policy against ``SpreadReward`` (the share of letters and digits among a
    response's first 8 characters, about a quarter at random), TRPO_TEST_ROLLOUTS rollouts of 64
    raise the mean reward on 64 held-out prompts by TRPO_TEST_GAIN or more.

    On the arithmetic demo TRPO learns too slowly for a test (``bench learning --stages trpo``
    measures it there), so the test takes an easier task instead of a lower threshold."""
    data = dict(ARITH, batch_size=64, train_size=TRPO_TEST_ROLLOUTS * 64)
    held_out = PromptDataModule(**data)
    held_out.setup()
    before = _held_out_spread(ShrayGPT.load_from_checkpoint(random_policy).eval(), held_out)
    stage = _stage(random_policy, max_new_tokens=8, max_kl=3.0, vf_iters=4)
    L.seed_everything(LEARNING_SEED)
    tiny_trainer(TRPO_TEST_ROLLOUTS * 4, limit_val_batches=0).fit(stage, datamodule=PromptDataModule(**data))
    after = _held_out_spread(stage.policy.eval(), held_out)
    learned("trpo", before, after)
    assert after > before + TRPO_TEST_GAIN, (before, after)


TRPO_TEST_ROLLOUTS = 12
# Gains over seeds 0-4 (SHRAYGPT_LEARNING_SEED) at 1 / 2 torch threads: seed 0 +0.121 / +0.102,
# seed 1 +0.123 / +0.071, seed 2 +0.121 / +0.086, seed 3 +0.141 / +0.143, seed 4 +0.112 / +0.125; so
# the threshold is the least less a margin of about 0.03. (20 rollouts gained +0.159 to +0.258 in
# 70% more time.)
TRPO_TEST_GAIN = 0.04


def test_an_engine_with_other_logprobs_is_refused(random_policy, monkeypatch):
    """TRPO's surrogate has no importance weight for another sampler's tokens (vLLM's)."""
    from shraygpt_rl.engines import StaticEngine
    from shraygpt_rl.errors import ConfigError
    from shraygpt_rl.stages import online

    inexact = type("Inexact", (StaticEngine,), {"exact": False, "name": "vllm"})
    monkeypatch.setattr(online, "make_engine", lambda name: inexact())
    with pytest.raises(ConfigError, match="rollout_engine vllm does not give; use auto, static or eager"):
        _stage(random_policy)


def test_a_non_finite_trust_region_step_is_skipped_counted_and_stops_the_run(random_policy, monkeypatch):
    """A NaN in g (the surrogate's gradient) makes the natural-gradient step NaN: the policy
    stays where it was, the guard counts it (the critic's finite steps between do not end the
    run of skips), and ``max_nonfinite`` of them in a row stop training."""
    from shraygpt_rl.errors import TrainingError

    stage = _stage(random_policy, max_nonfinite=2, vf_iters=1)
    linearise = stage.linearise

    def poisoned(*args):
        at_old = linearise(*args)
        at_old.g = at_old.g * float("nan")
        return at_old

    monkeypatch.setattr(stage, "linearise", poisoned)
    before = {n: p.detach().clone() for n, p in stage.policy.named_parameters()}
    metrics = fit_online(stage, 1, ARITH)
    assert stage.nonfinite_skipped == 1 and metrics["trpo/step_skipped"] == 1
    assert metrics["trpo/step_fraction"] == 0 and "trpo/line_search_failures" in metrics  # the same figures
    assert all(torch.equal(before[n], p) for n, p in stage.policy.named_parameters())
    with pytest.raises(TrainingError, match=r"^2 updates in a row had a non-finite loss or gradient"):
        fit_online(stage, 2, ARITH)


def test_fp16_loss_scaling_is_refused_and_bf16_runs(random_policy):
    """The critic's gradients are set by hand, so a GradScaler never scaled them and would fail
    to unscale them at the first step: refused in one sentence; bf16-mixed has no scaler."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from shraygpt_rl.errors import ConfigError

    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))  # what a GPU's 16-mixed sets up
    with pytest.raises(ConfigError, match="^TRPO sets its critic's gradients by hand .* use --trainer.precision"):
        tiny_trainer(1, limit_val_batches=0, plugins=[fp16]).fit(
            _stage(random_policy), datamodule=PromptDataModule(**dict(ARITH, batch_size=4, train_size=16))
        )
    stage = _stage(random_policy)
    trainer = tiny_trainer(2, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(stage, datamodule=PromptDataModule(**dict(ARITH, batch_size=4, train_size=16)))
    assert stage.rollouts == 1 and trainer.global_step == stage.hparams.vf_iters and stage.nonfinite_skipped == 0
