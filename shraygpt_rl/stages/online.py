"""What PPO, GRPO and RLOO share: rollouts inside ``training_step``, rewards, log-probabilities,
manual optimisation over minibatches, and the metrics every online stage logs.

A rollout is one batched, KV-cached ``generate`` call over the step's prompts (each repeated
``repeats`` times), decoded and scored by the reward functions. Log-probabilities for the loss are
then recomputed by a training-style forward over prompt + response, in the same micro-batches as
the first update, so that the importance ratio starts at exactly 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from shraygpt_rl.checkpoint import stamp, stamped
from shraygpt_rl.environments import Environment
from shraygpt_rl.errors import ConfigError, require
from shraygpt_rl.evaluate import pass_and_majority
from shraygpt_rl.generation import EngineName, make_engine, response_logprobs, sample_and_decode
from shraygpt_rl.losses import masked_mean, truncated_importance_weights
from shraygpt_rl.rewards import LearnedReward, RewardFunction, TaskVerifier, WeightedSum
from shraygpt_rl.stages.base import StageModule, disable_dropout
from shraygpt_rl.stages.checks import check_rewards
from shraygpt_rl.stages.progress import count_rollouts
from shraygpt_rl.tokenizer import stop_tokens
from shraygpt_rl.turns import check_turns


@dataclass
class Rollout:
    """Sampled responses and their rewards; ``R`` rows (prompts x repeats), ``T`` response tokens."""

    sequences: Tensor  # (R, P + T) left-padded prompts, then right-padded responses
    attention_mask: Tensor  # (R, P + T)
    response_mask: Tensor  # (R, T) float, 1 on sampled tokens up to and including the stop token (EOS)
    prompt_length: int
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, Any]]
    scores: Tensor  # (R,) total reward of each response
    components: dict[str, Tensor] = field(default_factory=dict)  # each reward function's part
    truncated: Tensor | None = None  # (R,) bool: cut at max_new_tokens (no stop token, not ended by the environment)
    turns: dict[str, Tensor] | None = None  # multi-turn, each (R,): turns, tool_calls, tool_errors, max_turns,
    # ended_by_environment
    logprobs: Tensor | None = None  # (R, T) each sampled token's log-probability under the rollout engine

    def __len__(self) -> int:
        return self.sequences.size(0)


class MicroStep(NamedTuple):
    """What a stage's loss gives ``policy_update`` for one micro-batch."""

    loss: Tensor  # the micro-batch's part of the minibatch loss, aux loss included
    ratio: Tensor  # (r, T) importance ratios, for ``policy/ratio_at_start``
    mask: Tensor  # (r, T) the tokens that count
    metrics: dict[str, Tensor]  # per-row figures: averaged over micro-batches, weighted by rows
    token_metrics: dict[str, Tensor]  # means over the mask's tokens: weighted by tokens, so that
    # the minibatch's figure is its own token mean, however the rows were split


class OnlineRLStage(StageModule):
    """Base of the online stages (``PromptDataModule`` batches, manual optimisation).

    Args:
        rewards: Reward functions, each with its ``weight`` (YAML: ``class_path`` entries).
            Default: the built-in tasks' ``TaskVerifier`` unless ``reward_model`` is given.
        reward_model: A reward-model checkpoint used as one more reward (``LearnedReward``).
        max_new_tokens: Longest response.
        temperature: Sampling temperature; the loss's log-probabilities use the same one.
        top_k: Sample from the k most likely tokens only (the loss ignores this truncation).
        top_p: Nucleus sampling (the loss ignores this truncation).
        micro_batch_size: Rows per forward/backward in an update; None: a whole minibatch.
        max_grad_norm: Gradient clipping by global norm; None for none.
        log_samples_every: Write a few prompt -> response pairs to TensorBoard every so many steps.
        logprob_chunk_rows: Run the LM head and log-softmax of an update on this many rows at a
            time, recomputed in the backward, so that a micro-batch's (rows, tokens, vocabulary)
            float32 logits never exist at once; None: the whole micro-batch.
        eval_samples: Samples per held-out prompt in validation; above 1, also log pass@1, pass@k
            and maj@k with k = eval_samples on the built-in tasks.
        environment: Tools for multi-turn rollouts (YAML: a ``class_path`` entry, such as
            ``shraygpt_rl.environments.Calculator``): each tool call is answered in the rollout,
            and the answers are context, never trained on. None: single-turn rollouts.
        max_turns: Most policy turns per multi-turn rollout (a row still calling the tool then
            ends, counted in ``rollout/max_turns``).
        rollout_engine: What samples the rollouts (``engines.py``): ``auto`` (a fixed-shape decode
            step wherever the model supports it, else the eager loop), ``static``, ``eager``, or
            ``vllm`` (the optional extra). Every engine gives the same samples for a seed except
            vLLM, whose log-probabilities are its own kernels'.
        rollout_correction_cap: For an engine whose log-probabilities are not the training
            forward's (vLLM): each token's policy-gradient loss is weighted by
            ``min(pi_train / pi_rollout, cap)`` (truncated importance sampling, Yao et al. 2025).
            The exact engines need no weight and get none.
        **kwargs: ``StageModule``'s arguments (``policy``, ``optimizer``, ``lr``, …).
    """

    def __init__(
        self,
        rewards: list[RewardFunction] | None = None,
        reward_model: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        log_samples_every: int = 50,
        logprob_chunk_rows: int | None = None,
        eval_samples: int = 1,
        environment: Environment | None = None,
        max_turns: int = 4,
        rollout_engine: EngineName = "auto",
        rollout_correction_cap: float = 2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        check_turns(environment, max_turns)
        require(max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        require(temperature > 0, f"Online RL samples from the policy: temperature must be > 0, got {temperature}.")
        require(top_k is None or top_k >= 1, f"top_k must be at least 1 (or null), got {top_k}.")
        require(top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1] (or null), got {top_p}.")
        require(
            micro_batch_size is None or micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {micro_batch_size}."
        )
        require(
            max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm must be > 0 (or null), got {max_grad_norm}."
        )
        require(log_samples_every >= 0, f"log_samples_every must be >= 0, got {log_samples_every}.")
        require(
            logprob_chunk_rows is None or logprob_chunk_rows >= 1,
            f"logprob_chunk_rows must be >= 1 (or null), got {logprob_chunk_rows}.",
        )
        require(eval_samples >= 1, f"eval_samples must be at least 1, got {eval_samples}.")
        require(rollout_correction_cap >= 1, f"rollout_correction_cap must be >= 1, got {rollout_correction_cap}.")
        self.engine = make_engine(rollout_engine)
        require(
            self.engine.exact or (top_k is None and top_p in (None, 1)),
            f"rollout_engine {rollout_engine}'s log-probabilities are of the top-k/top-p truncated distribution, "
            "which its importance weights would compare with the untruncated training forward's; leave top_k and "
            "top_p unset with it.",
        )
        self.policy = disable_dropout(self.build_policy())
        functions = list(rewards or [])
        if reward_model:
            functions.append(LearnedReward(checkpoint=reward_model))
        self.reward_fn = WeightedSum(functions or [TaskVerifier()])
        self.environment = environment
        self.perf: dict[str, float] = {}
        self.rollouts = 0  # training rollouts so far (global_step counts optimizer steps)

    def new_tokens(self) -> int:
        return self.hparams.max_new_tokens

    def optimizer_steps_per_rollout(self) -> int:
        """The optimizer steps (what ``max_steps`` counts) one rollout takes, at most."""
        return 1

    def setup(self, stage: str) -> None:
        """``StageModule``'s checks; then Lightning's progress bar, before it starts, is made to
        count rollouts out of rollouts planned (``progress.py``)."""
        super().setup(stage)
        if self._trainer is not None:
            count_rollouts(self.trainer.progress_bar_callback)

    supports_ptx = False  # PPO-ptx: only PPO mixes demonstrations into its updates

    def check_data(self, datamodule) -> None:
        if hasattr(datamodule, "metadata_keys"):
            check_rewards(self.reward_fn.functions, datamodule.metadata_keys(), datamodule.hparams.source)
        if getattr(datamodule.hparams, "ptx_source", None) and not self.supports_ptx:
            raise ConfigError(f"--data.ptx_source is PPO-ptx's; the {self.kind} stage does not use demonstrations.")

    def check_minibatches(self, rows: int) -> None:
        """A rollout of ``rows`` must split into ``num_mini_batches`` equal minibatches."""
        n = self.hparams.num_mini_batches
        require(rows % n == 0, f"A rollout of {rows} rows does not split into num_mini_batches={n}; change either.")

    def on_fit_start(self) -> None:
        for fn in self.reward_fn.functions:  # learned rewards score on the policy's device
            if isinstance(getattr(fn, "scorer", None), nn.Module):
                fn.scorer.to(self.device)

    # -- rollouts ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], repeats: int = 1) -> Rollout:
        """Sample ``repeats`` responses per prompt in one batched generate call and score them."""
        hp, enc = self.hparams, self.trainer.datamodule.tokenizer
        ids = batch["input_ids"].repeat_interleave(repeats, dim=0)
        mask = batch["attention_mask"].repeat_interleave(repeats, dim=0)
        prompts = [p for p in batch["prompt"] for _ in range(repeats)]
        metadata = [m for m in batch["metadata"] for _ in range(repeats)]
        start = time.perf_counter()
        sampling = dict(temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
        tools = dict(environment=self.environment, prompts=prompts, metadata=metadata, max_turns=hp.max_turns)
        out, responses = sample_and_decode(
            self.policy, ids, mask, enc, hp.max_new_tokens, **sampling, **tools, engine=self.engine
        )
        self.perf["generation_s"] = time.perf_counter() - start
        self.perf["generated_tokens"] = float(out.response_mask.sum())
        stops = torch.tensor(stop_tokens(enc), device=out.responses.device)  # (S,) every token that ends a response
        truncated = ~(torch.isin(out.responses, stops) & out.response_mask.bool()).any(dim=1)
        turns = None if out.turns is None else {k: v.to(truncated.device) for k, v in out.turns.items()}
        if turns is not None:  # ended by the environment or at max_turns: an ending, not a cut
            truncated &= ~(turns["ended_by_environment"] | turns["max_turns"])
        scores, components = self.reward_fn.score(prompts, responses, metadata)
        if self.trainer.training:  # the trainer's state, not the module's mode: fit may start in eval mode
            self.rollouts += 1
        return Rollout(
            sequences=out.sequences,
            attention_mask=out.attention_mask,
            response_mask=out.response_mask.float(),
            prompt_length=out.prompt_length,
            prompts=prompts,
            responses=responses,
            metadata=metadata,
            scores=scores.float().to(self.device),
            components={name: value.to(self.device) for name, value in components.items()},
            truncated=truncated,
            turns=turns,
            logprobs=out.logprobs.to(self.device),
        )

    def rollout_correction(self, rollout: Rollout, micro: Tensor, old: Tensor, mask: Tensor):
        """The truncated importance weights (r, T) of ``micro``'s tokens when the rollout engine's
        log-probabilities are not the training forward's ``old`` (vLLM), else None; and the mean
        absolute gap between the two, which an exact engine keeps at float rounding (with
        ``top_k`` or ``top_p`` the sampler's are those of the truncated distribution, so the gap
        includes the truncation)."""
        if rollout.logprobs is None:  # a rollout built by hand, not sampled
            return None, None
        sampled = rollout.logprobs[micro]  # (r, T)
        gap = masked_mean((old - sampled).abs(), mask)
        if self.engine.exact:
            return None, gap
        return truncated_importance_weights(old, sampled, self.hparams.rollout_correction_cap), gap

    def response_logprobs(self, model, rollout: Rollout, rows: Tensor, entropy: bool = False):
        """Log-probabilities (r, T) of the response tokens of ``rows`` under ``model``, their
        entropies (or None), and the MoE aux loss."""
        hp = self.hparams
        seqs, mask = rollout.sequences[rows], rollout.attention_mask[rows]
        P, chunk = rollout.prompt_length, hp.logprob_chunk_rows
        return response_logprobs(model, seqs, mask, P, hp.temperature, entropy=entropy, chunk_rows=chunk)

    @torch.no_grad()
    def rowwise(self, fn, rollout: Rollout, minibatches: list[Tensor]) -> Tensor:
        """``fn(rows)`` over the same micro-batches the first update uses, concatenated in row order."""
        out = torch.empty(len(rollout), rollout.response_mask.size(1), device=self.device)
        for rows in (micro for mb in minibatches for micro in self.micro_batches(mb)):
            out[rows] = fn(rows).float()
        return out

    def logprobs_under(self, model: nn.Module, rollout: Rollout, first: list[Tensor]) -> Tensor:
        """Log-probabilities (R, T) of every response token under ``model``, without gradient,
        computed in the micro-batches of the first update: the rollout's "old" log-probabilities
        then equal the first update's exactly, and its importance ratio starts at 1."""
        return self.rowwise(lambda rows: self.response_logprobs(model, rollout, rows)[0], rollout, first)

    # -- minibatches ---------------------------------------------------------------------------
    def minibatches(self, n_rows: int, num_mini_batches: int, shuffle: bool) -> list[Tensor]:
        self.check_minibatches(n_rows)  # a last, smaller batch of prompts can still fail here
        order = torch.randperm(n_rows, device=self.device) if shuffle else torch.arange(n_rows, device=self.device)
        return list(order.chunk(num_mini_batches))

    def passes(self, first: list[Tensor], num_passes: int) -> Iterator[Tensor]:
        """The minibatches of ``num_passes`` passes over a rollout: ``first`` (in row order) for
        the first pass, a fresh shuffle for each later one."""
        n_rows = sum(len(rows) for rows in first)
        for i in range(num_passes):
            yield from first if i == 0 else self.minibatches(n_rows, len(first), shuffle=True)

    def micro_batches(self, rows: Tensor) -> Iterator[Tensor]:
        size = self.hparams.micro_batch_size or len(rows)
        return iter(rows.split(size))

    # -- one update ----------------------------------------------------------------------------
    def policy_update(
        self,
        rows: Tensor,
        micro_step: Callable[[Tensor, Tensor], MicroStep],
        extra: Callable[[], dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """One optimizer step over the minibatch ``rows``, accumulated micro-batch by micro-batch.

        ``micro_step(micro, rows)`` computes the micro-batch ``micro``'s part of the loss of the
        minibatch ``rows``, so that the backward passes add up to the gradient of the whole
        minibatch; ``extra()``, when given, one more term of the update (its ``loss`` and its
        metrics, such as PPO-ptx's); one optimizer step follows. A non-finite loss in any part
        drops the update. Returns the metrics averaged over the micro-batches (weighted by rows, or
        for token means by tokens) and ``policy/ratio_furthest``.
        """
        stats: dict[str, Tensor] = {}
        token_sums: dict[str, Tensor] = {}
        finite, furthest, tokens = True, None, 0.0
        for micro in self.micro_batches(rows):
            step = micro_step(micro, rows)
            finite = finite and bool(torch.isfinite(step.loss))
            self.manual_backward(step.loss)
            furthest = furthest_from_one(step.ratio, step.mask, furthest)
            accumulate(stats, len(micro) / len(rows), step.metrics)
            count = step.mask.sum()  # an all-padding micro-batch weighs 0
            accumulate(token_sums, count, step.token_metrics)
            tokens = tokens + count
        stats.update({key: total / tokens.clamp(min=1) for key, total in token_sums.items()})
        if extra is not None:
            term = extra()
            loss = term.pop("loss")
            finite = finite and bool(torch.isfinite(loss))
            self.manual_backward(loss)
            stats.update(term)
        stats["policy/ratio_furthest"] = furthest
        self.optimizer_step(finite)
        return stats

    def optimizer_step(self, finite: bool = True) -> None:
        """Step (guarding and clipping: ``on_before_optimizer_step``) and clear the gradients of the
        (single) optimizer, then step the schedule, by hand.

        Each call is one of Lightning's global steps: ``trainer.max_steps`` counts optimizer
        steps, so one rollout is ``num_iterations * num_mini_batches`` of them (PPO: epochs x
        minibatches), while ``val_check_interval`` and ``log_every_n_steps`` count rollouts.
        A minibatch whose loss was not finite on any rank (``finite=False``) is dropped on every
        rank: the optimizer steps without gradients, and the skip is counted in
        ``train/nonfinite_skipped``; one whose gradients are not finite is dropped the same way
        (``on_before_optimizer_step``).
        """
        optimizer = self.optimizers()
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):  # ranks must skip together
            optimizer.zero_grad(set_to_none=True)  # no gradients: the step leaves every parameter as it was
            self.count_nonfinite()
        optimizer.step()  # on_before_optimizer_step: the gradient guard, then clipping
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """The gradient guard (``StageModule``'s), then clipping by global norm (``max_grad_norm``):
        here, where fp16's GradScaler has unscaled the gradients, rather than before
        ``optimizer.step()``, where they are still scaled (the clip would be off by the scale)."""
        super().on_before_optimizer_step(optimizer)
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    # -- metrics -------------------------------------------------------------------------------
    def log_rollout(self, rollout: Rollout) -> None:
        """``reward/*``, ``completions/*`` and the rollout half of ``perf/*``."""
        metrics = {"reward/mean": rollout.scores.mean(), "reward/std": rollout.scores.std()}
        metrics.update({f"reward/{name}": value.float().mean() for name, value in rollout.components.items()})
        lengths = rollout.response_mask.sum(1)
        metrics["completions/mean_length"] = lengths.mean()
        metrics["completions/truncated_fraction"] = rollout.truncated.float().mean()
        metrics["perf/generation_tokens_per_s"] = self.perf["generated_tokens"] / max(self.perf["generation_s"], 1e-9)
        metrics.update(turn_metrics(rollout))
        self.log_dict({k: float(v) for k, v in metrics.items()}, on_step=True, batch_size=len(rollout))
        self.log("reward", rollout.scores.mean(), prog_bar=True, logger=False, batch_size=len(rollout))
        if self.hparams.log_samples_every and self.rollouts % self.hparams.log_samples_every == 0:
            self.log_samples(rollout)

    def log_update(self, update_s: float, tokens: float) -> None:
        gen = self.perf["generation_s"]
        self.log_dict(
            {
                "perf/update_tokens_per_s": tokens / max(update_s, 1e-9),
                "perf/generation_fraction": gen / max(gen + update_s, 1e-9),
                "perf/generation_s": gen,
                "perf/update_s": update_s,
                "perf/step_s": gen + update_s,
            },
            on_step=True,
        )

    def mean_of_updates(self, stats: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each per-update metric averaged over the step's updates, and ``policy/ratio_at_start``:
        the first update's token ratio furthest from 1 (the on-policy one, where it must be 1)."""
        mean = {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0] if k != "policy/ratio_furthest"}
        mean["policy/ratio_at_start"] = stats[0]["policy/ratio_furthest"]
        return mean

    def log_step(self, metrics: dict[str, Tensor]) -> None:
        """Log a step's metrics; ``moe/aux_loss`` goes with the router statistics (``log_moe``)."""
        aux_loss = metrics.pop("moe/aux_loss")
        self.log_dict({k: float(v) for k, v in metrics.items()}, on_step=True)
        self.log_moe(self.policy, aux_loss)

    def log_samples(self, rollout: Rollout, count: int = 4) -> None:
        """A few prompt -> response pairs, with their rewards, as a TensorBoard text entry."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        rows = ["| prompt | response | reward |", "| --- | --- | --- |"]
        for i in range(min(count, len(rollout))):
            cells = [rollout.prompts[i][-200:], rollout.responses[i], f"{rollout.scores[i]:.3f}"]
            rows.append("| " + " | ".join(c.replace("\n", " ").replace("|", "/") for c in cells) + " |")
        experiment.add_text("samples", "\n".join(rows), self.global_step)

    # -- held-out evaluation -------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_step(self, batch, split: str) -> None:
        """Held-out rollouts: the training reward, and on the built-in tasks the verifier's
        success rate (whatever the training reward is: a reward model can be fooled).

        With ``eval_samples`` k > 1 on the built-in tasks, each prompt is sampled k times in
        the one rollout: the figures above average over all samples, and pass@1, pass@k and
        maj@k are logged per prompt besides (``pass_and_majority``)."""
        k = self.hparams.eval_samples
        covered = TaskVerifier.covers(batch["metadata"])
        rollout = self.rollout(batch, repeats=k if covered else 1)
        size = len(rollout)
        self.log(f"{split}/reward/mean", rollout.scores.mean(), batch_size=size, prog_bar=split == "val")
        self.log(f"{split}/completions/mean_length", rollout.response_mask.sum(1).mean(), batch_size=size)
        self.log_dict({f"{split}/{name}": value for name, value in turn_metrics(rollout).items()}, batch_size=size)
        if covered:
            success = TaskVerifier().success(rollout.prompts, rollout.responses, rollout.metadata)
            self.log(f"{split}/success", success.float().mean(), batch_size=size, prog_bar=split == "val")
        if covered and k > 1:
            figures = pass_and_majority(rollout.prompts, rollout.responses, rollout.metadata, k)
            prompts = size // k  # each prompt weighs the same across batches, whatever its batch's size
            self.log_dict({f"{split}/{name}": value.mean() for name, value in figures.items()}, batch_size=prompts)
        self.log_reports(batch, rollout, split)

    def log_reports(self, batch, rollout: Rollout, split: str) -> None:
        """What reward functions report besides the reward (``report(responses)``, such as
        ``KeywordReward``'s animal-word frequency), for the policy and, when there is one, for the
        reference on the same prompts (``<name>_reference``), as seed 001 compares them."""
        reporters = [fn for fn in self.reward_fn.functions if hasattr(fn, "report")]
        if not reporters:
            return
        ref_texts = None
        if self.reference is not None:
            hp, enc = self.hparams, self.trainer.datamodule.tokenizer
            ids, mask = batch["input_ids"], batch["attention_mask"]
            sampling = dict(temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            engine = self.engine if self.engine.exact else "auto"  # vLLM would swap in the reference's weights
            reference = self.reference_model()
            _, ref_texts = sample_and_decode(reference, ids, mask, enc, hp.max_new_tokens, **sampling, engine=engine)
        for fn in reporters:
            for name, value in fn.report(rollout.responses).items():
                self.log(f"{split}/reward/{name}", value, batch_size=len(rollout))
            for name, value in (fn.report(ref_texts) if ref_texts is not None else {}).items():
                self.log(f"{split}/reward/{name}_reference", value, batch_size=len(rollout))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        stamp(checkpoint, rollouts=self.rollouts)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.rollouts = stamped(checkpoint).get("rollouts", 0)


def split_ptx(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A training batch as ``(prompts, demonstrations)``: a ``PromptDataModule`` with a
    ``ptx_source`` gives both (a ``CombinedLoader``), one without gives prompts alone."""
    if "prompts" in batch and "ptx" in batch:
        return batch["prompts"], batch["ptx"]
    return batch, None


def turn_metrics(rollout: Rollout) -> dict[str, Tensor]:
    """``rollout/turns``, ``rollout/tool_calls`` and ``rollout/tool_errors`` (means per response),
    ``rollout/max_turns`` (the share of responses ended at ``max_turns``) and
    ``rollout/ended_by_environment`` (the share the environment ended); none single-turn."""
    if rollout.turns is None:
        return {}
    return {f"rollout/{name}": value.float().mean() for name, value in rollout.turns.items()}


def furthest_from_one(ratio: Tensor, mask: Tensor, so_far: Tensor | None = None) -> Tensor:
    """The importance ratio furthest from 1 among the masked tokens (and ``so_far``): what
    ``policy/ratio_at_start`` reports for a rollout's first minibatch, where it must be 1."""
    deviation = ((ratio.detach() - 1).abs() * mask).flatten()
    candidate = ratio.detach().flatten()[deviation.argmax()] if deviation.numel() else ratio.new_ones(())
    if so_far is None or (candidate - 1).abs() > (so_far - 1).abs():
        return candidate
    return so_far


def policy_metrics(logprobs: Tensor, old_logprobs: Tensor, ratio: Tensor, clipped: Tensor, mask: Tensor):
    """``policy/clipfrac``, ``policy/ratio``, ``policy/approxkl`` (½ E[(log π − log π_old)²]) and
    ``objective/entropy`` (−E[log π] over the sampled tokens: an unbiased estimate) of a micro-batch."""
    own = mask.bool()  # padding's log pi may be -inf: -inf times a zero weight would be NaN
    logprobs, old_logprobs = torch.where(own, logprobs.detach(), 0.0), torch.where(own, old_logprobs, 0.0)
    return {
        "policy/clipfrac": masked_mean(clipped, mask),
        "policy/ratio": masked_mean(ratio.detach(), mask),
        "policy/approxkl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
        "objective/entropy": masked_mean(-logprobs, mask),
    }


def accumulate(stats: dict, share: float | Tensor, values: dict) -> None:
    """Add micro-batch metrics weighted by ``share`` (of the rows, or a count of tokens)."""
    for key, value in values.items():
        stats[key] = stats.get(key, 0.0) + share * value.float()
