"""What PPO, GRPO and RLOO share: generation and training see the same function of each row.

A token's log-probability and its MoE routing must not depend on whether it was computed by the
cached rollout engine or by a training forward, nor on which other rows share its batch.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import ARITH, PoisonGradient, SpreadReward, fit_online, tiny_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from shraygpt_rl import decode
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.data.tasks import arithmetic_target
from shraygpt_rl.errors import TrainingError
from shraygpt_rl.layers import route
from shraygpt_rl.losses import token_logprobs
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.stages import online
from shraygpt_rl.stages.grpo import GRPOStage
from shraygpt_rl.stages.online import furthest_from_one, policy_metrics
from shraygpt_rl.stages.ppo import PPOStage


def _routing_recorder(model: ShrayGPT):
    """Hooks on every router that record, per call, each routed token's top-k experts (sorted)."""
    calls: list[list[torch.Tensor]] = [[] for _ in model.layers]
    handles = []
    for i, layer in enumerate(model.layers):
        k = layer.moe.top_k

        def hook(module, inputs, output, i=i, k=k):
            calls[i].append(output.float().topk(k, dim=-1).indices.sort(dim=-1).values)

        handles.append(layer.moe.gate.register_forward_hook(hook))
    return calls, handles


def _prompts(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding, as the prompt DataModule makes it
        ids[row, width - n :] = torch.randint(1, vocab, (n,))
        mask[row, width - n :] = 1
    return ids, mask


def _likes_to_stop(model: ShrayGPT, eos: int) -> ShrayGPT:
    """Point the EOS row of the head along the mean hidden state, so that a random model ends
    about one row in ten at each step and rows finish at different times."""
    with torch.no_grad():
        hidden, _, _ = model.features(torch.randint(1, model.vocab_size, (8, 30)))
        direction = hidden.reshape(-1, hidden.size(-1)).mean(0)
        model.head.weight[eos] = 4.0 * direction / direction.norm()
    return model


def _decode_routing_recorder(monkeypatch, n_layers: int) -> list[list[torch.Tensor]]:
    """Record, per layer and decode step, the static decoder's top-k experts of every row."""
    calls: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    seen = [0]

    def recording_route(gate_logits, top_k):
        probs, weights, experts = route(gate_logits, top_k)
        calls[seen[0] % n_layers].append(experts.sort(dim=-1).values)
        seen[0] += 1
        return probs, weights, experts

    monkeypatch.setattr(decode, "route", recording_route)
    return calls


@pytest.mark.parametrize("static", [False, True])
def test_generation_and_training_give_each_token_the_same_logprob_and_routing(tiny_model, monkeypatch, static):
    """The rollout engine (prefill + one cached token per step; the eager loop skips finished
    rows, the static decode step computes them and drops the result) and one training forward
    over prompt + response agree on every sampled token's log-probability and on every token's
    top-k experts, whatever the batch's padding and composition."""
    model = _likes_to_stop(tiny_model, eos=7)
    ids, prompt_mask = _prompts(model.vocab_size, [5, 11, 8, 3, 11, 7])
    calls, handles = _routing_recorder(model)  # the model's own routers: eager steps and the prefill
    steps = _decode_routing_recorder(monkeypatch, len(model.layers))  # the static decode step's
    out = model.generate(
        ids,
        12,
        temperature=1.0,
        eos_token_id=7,
        attention_mask=prompt_mask,
        generator=torch.Generator().manual_seed(1),
        engine=("static" if static else "eager"),
    )
    P, N = out.prompt_length, out.response_mask.size(1)
    real = out.attention_mask.bool()
    if static:  # each decode step routed every row: keep the rows whose fed token was real, in the
        # steps the eager loop takes too (the static loop looks for EOS only every few steps)
        alive = [real[:, P + t] for t in range(min(len(steps[0]), N - 1))]
        for layer, per_step in enumerate(steps):
            calls[layer] += [experts[keep] for experts, keep in zip(per_step, alive)]
    generated_routing = [torch.cat(c) for c in calls]
    for c in calls:
        c.clear()
    assert (out.response_mask.sum(1) < N).any(), "some rows must stop early for this test to mean much"

    with torch.no_grad():
        logits, _, _ = model(out.sequences, attention_mask=out.attention_mask)  # training-style forward
    training_routing = [torch.cat(c) for c in calls]
    for c in calls:
        c.clear()
    # Which (row, position) each generation-time router call covered: the prefill's real prompt
    # tokens, then at each decode step the token just sampled by every row still running. The
    # last sampled token is never fed, so generation routed fewer tokens than training.
    positions = real.nonzero()  # (S, 2) row-major: the order of the training forward's router call
    index = {tuple(p.tolist()): j for j, p in enumerate(positions)}
    fed = [(b, p) for b, p in positions.tolist() if p < P]
    for t in range(N - 1):
        fed += [(b, P + t) for b in range(len(ids)) if real[b, P + t]]
    assert len(fed) == generated_routing[0].size(0)
    rows = torch.tensor([index[f] for f in fed])
    for layer in range(len(model.layers)):
        assert torch.equal(generated_routing[layer], training_routing[layer][rows])

    logprobs = token_logprobs(logits[:, P - 1 : -1], out.responses)  # (B, N)
    mask = out.response_mask.bool()
    assert torch.allclose(logprobs[mask], out.logprobs[mask], atol=1e-5)

    # The same rows in another batch composition (reversed, split in two) give the same numbers.
    with torch.no_grad():
        for part in (torch.tensor([5, 3, 1]), torch.tensor([4, 2, 0])):
            sub, _, _ = model(out.sequences[part], attention_mask=out.attention_mask[part])
            sub_logprobs = token_logprobs(sub[:, P - 1 : -1], out.responses[part])
            assert torch.allclose(sub_logprobs[mask[part]], logprobs[part][mask[part]], atol=1e-6)


def test_ratio_at_start_reports_the_token_furthest_from_one():
    ratio = torch.tensor([[1.0, 1.2, 0.7], [0.95, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 3.0 is padding
    assert furthest_from_one(ratio, mask) == 0.7
    assert furthest_from_one(ratio[:1, :2], mask[:1, :2], so_far=torch.tensor(0.9)) == 1.2
    assert furthest_from_one(ratio[1:], mask[1:], so_far=torch.tensor(1.5)) == 1.5


class NaNReward:
    """A reward that is never finite: every update's loss is NaN."""

    weight, name = 1.0, "nan"

    def __call__(self, prompts, responses, metadata):
        return torch.full((len(responses),), float("nan"))


@pytest.mark.parametrize(("stage_class", "options"), [(GRPOStage, {}), (PPOStage, {"num_ppo_epochs": 1})])
def test_skipped_updates_count_towards_max_steps(random_policy, stage_class, options):
    """Before: skipped updates did not advance global_step, and a run whose every update was
    non-finite never reached max_steps. Now it stops there, the policy untouched."""
    stage = stage_class(
        policy=random_policy,
        rewards=[NaNReward()],
        max_new_tokens=4,
        optimizer="adamw",
        export_path=None,
        log_samples_every=0,
        max_nonfinite=100,
        **options,
    )
    start = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    metrics = fit_online(stage, max_steps=6, prompts=dict(ARITH, batch_size=4, train_size=64))
    assert stage.trainer.global_step == 6 and stage.nonfinite_skipped == 6
    assert metrics["train/nonfinite_skipped"] == 6
    assert all(torch.equal(start[k], v) for k, v in stage.policy.state_dict().items())


def test_a_run_of_non_finite_updates_stops_in_one_sentence(random_policy):
    stage = GRPOStage(
        policy=random_policy,
        rewards=[NaNReward()],
        max_new_tokens=4,
        optimizer="adamw",
        export_path=None,
        log_samples_every=0,
        max_nonfinite=3,
    )
    with pytest.raises(TrainingError, match=r"^3 updates in a row had a non-finite loss or gradient \(NaN or inf\)"):
        fit_online(stage, max_steps=50, prompts=dict(ARITH, batch_size=4, train_size=64))
    assert stage.trainer.global_step == 2  # the third skip stops the run before its step


@pytest.mark.parametrize(("stage_class", "options"), [(GRPOStage, {}), (PPOStage, {"num_ppo_epochs": 1})])
def test_a_non_finite_gradient_skips_the_update(random_policy, stage_class, options):
    """A finite loss whose gradient is NaN (by hand, after the backward of step 1): the update is
    dropped and counted; the next ones train."""
    poison = PoisonGradient(step=1)
    stage = stage_class(
        policy=random_policy, rewards=[SpreadReward()], max_new_tokens=4, optimizer="adamw", lr=1e-3,
        export_path=None, log_samples_every=0, **options,
    )  # fmt: skip
    start = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    fit_online(stage, max_steps=3, prompts=dict(ARITH, batch_size=4, train_size=64), callbacks=[poison])
    assert stage.nonfinite_skipped == 1 and stage.trainer.global_step == 3
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before)
    assert all(torch.isfinite(v).all() for v in stage.policy.state_dict().values())
    assert any(not torch.equal(start[k], v) for k, v in stage.policy.state_dict().items())


def test_under_fp16_the_clip_sees_unscaled_gradients(random_policy, monkeypatch):
    """``max_grad_norm`` clips the gradients GradScaler has unscaled (review of issue 33: the
    online stages clipped before ``optimizer.step()``, on gradients still times the scale, so the
    clip was off by 2^16 and cut every update to almost nothing). The norms the clip measures
    under a CPU GradScaler of scale 1024 match those of a float32 run."""
    norms: dict[str, list[float]] = {}
    clip = torch.nn.utils.clip_grad_norm_
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", 1024.0))
    for name, plugins in (("fp32", []), ("fp16", [fp16])):
        seen = norms.setdefault(name, [])
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, v, seen=seen: seen.append(float(clip(p, v))))
        stage = GRPOStage(policy=random_policy, rewards=[SpreadReward()], max_new_tokens=4, optimizer="adamw",
                          export_path=None, log_samples_every=0, max_grad_norm=1.0)  # fmt: skip
        L.seed_everything(0)
        trainer = tiny_trainer(2, limit_val_batches=0, plugins=plugins)
        trainer.fit(stage, datamodule=PromptDataModule(**dict(ARITH, batch_size=4, train_size=64)))
    assert len(norms["fp16"]) == len(norms["fp32"]) == 2
    assert norms["fp16"][0] == pytest.approx(norms["fp32"][0], rel=0.2)  # fp16 rounding, not a factor of 1024


def _validate(stage) -> dict[str, float]:
    """Two validation batches of four arithmetic prompts; the logged metrics as floats."""
    trainer = tiny_trainer(1, limit_val_batches=2)
    trainer.validate(stage, datamodule=PromptDataModule(**{**ARITH, "batch_size": 4, "train_size": 8}), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _grpo(policy: str, **options) -> GRPOStage:
    return GRPOStage(policy=policy, max_new_tokens=4, export_path=None, log_samples_every=0, **options)


def test_validation_with_eval_samples_logs_pass_at_k_and_maj_at_k(random_policy):
    metrics = _validate(_grpo(random_policy, eval_samples=3))
    one, three, majority = (metrics[f"val/{name}"] for name in ("pass@1", "pass@3", "maj@3"))
    assert all(0 <= figure <= 1 for figure in (one, three, majority)) and three >= one
    assert metrics["val/success"] == pytest.approx(one)  # the share of right samples either way
    assert not any("@" in name for name in _validate(_grpo(random_policy)))  # eval_samples=1: as before


def test_validation_samples_each_prompt_eval_samples_times_in_one_rollout(random_policy, monkeypatch):
    """Scripted answers: of each prompt's four samples only the first is right, so pass@1 is
    1/4, pass@4 is 1 and the wrong answer wins every vote."""
    sample, rows = online.sample_and_decode, []

    def first_of_four_right(model, ids, mask, enc, max_new_tokens, **options):
        out, _ = sample(model, ids, mask, enc, max_new_tokens, **options)
        rows.append(ids.size(0))
        targets = [arithmetic_target(enc.decode(row[seen.bool()].tolist())) for row, seen in zip(ids, mask)]
        return out, [f"Answer: {t if i % 4 == 0 else t + 1}" for i, t in enumerate(targets)]

    monkeypatch.setattr(online, "sample_and_decode", first_of_four_right)
    metrics = _validate(_grpo(random_policy, eval_samples=4))
    assert rows == [16, 16]  # 4 prompts x 4 samples per batch, one generate call each
    assert metrics["val/pass@1"] == pytest.approx(0.25) and metrics["val/success"] == pytest.approx(0.25)
    assert metrics["val/pass@4"] == 1.0 and metrics["val/maj@4"] == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda policy: PPOStage(policy=policy, kl_coef=0.1, **BF16_COMMON),
        lambda policy: GRPOStage(policy=policy, beta=0.1, **BF16_COMMON),
        lambda policy: GRPOStage(policy=policy, beta=0.1, num_mini_batches=2, **BF16_COMMON),
    ],
    ids=["ppo", "grpo", "grpo-two-updates"],
)
def test_under_bf16_autocast_the_first_update_is_on_policy(random_policy, make):
    """The rollout's log-probabilities (the "old" ones) and the reference's are computed outside
    the update's step: under bf16-mixed they must come from the same autocast as the step, or
    bf16 rounding alone moves the ratio off 1 and the KL to the reference off 0."""
    stage = make(random_policy)
    L.seed_everything(0)
    trainer = tiny_trainer(1, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(stage, datamodule=PromptDataModule(**dict(ARITH, batch_size=4, train_size=16)))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["policy/ratio_at_start"] == 1.0
    if stage.hparams.num_mini_batches == 1:  # (a second update's KL is after the first has moved it)
        assert metrics["objective/kl"] == 0.0  # the reference is the policy before its first update
    assert stage.nonfinite_skipped == 0


BF16_COMMON = dict(rewards=[SpreadReward()], max_new_tokens=6, optimizer="adamw", export_path=None, log_samples_every=0)


def test_policy_metrics_ignore_padding_whatever_its_log_probabilities():
    """Padding's log pi may be -inf (nobody's token): a masked mean of it would be -inf times 0,
    NaN, and PPO's target_kl stop would never fire on a NaN approxkl."""
    logprobs, old = torch.tensor([[-1.0, -float("inf")]]), torch.tensor([[-1.5, -float("inf")]])
    mask = torch.tensor([[1.0, 0.0]])
    metrics = policy_metrics(logprobs, old, torch.ones(1, 2), torch.zeros(1, 2), mask)
    assert metrics["policy/approxkl"] == pytest.approx(0.5 * 0.5**2) and metrics["objective/entropy"] == 1.0
