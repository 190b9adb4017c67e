"""Held-out evaluation of a policy: verifier success, reward, KL and win rate against a reference.

``evaluate_policy`` samples one response per held-out prompt from the policy (and, when given,
from a reference policy), and reports:

* ``success`` and ``mean_reward``: the task verifier's (+1 is a success), on the built-in tasks;
* ``reward_model_score``: the reward model's mean score of the policy's responses;
* ``win_rate``: how often the reward model prefers the policy's response to the reference's for
  the same prompt (ties count half);
* ``kl_to_reference``: ``KL(policy || reference)`` per response in nats, estimated from the
  policy's own samples as the mean of ``sum_t log pi(y_t) - log pi_ref(y_t)`` (the unbiased k1
  estimator; Schulman, "Approximating KL divergence", 2020);
* ``reward_model_success``: the share of the policy's responses the reward model scores above
  0 (seed 003's ``evaluate_model``);
* ``mean_length`` in tokens, and a few side-by-side samples;
* ``pass@1``, ``pass@k`` and ``maj@k`` (``pass_k`` > 1, on the built-in tasks): from ``k``
  more samples per prompt, the unbiased pass@k of Chen et al. (2021) with ``n = k`` (pass@1 is
  the share of correct samples, averaged over prompts) and whether the majority answer is right
  (``pass_and_majority``).

``demonstration_scores`` judges a policy on held-out demonstrations instead, as seed 004 judges
SFT: the perplexity of the reference answers and ROUGE-L of the greedy answer against them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shraygpt_rl.data import stack_pairs
from shraygpt_rl.generation import EngineName, RolloutEngine, response_logits, sample_and_decode, sequence_logprobs
from shraygpt_rl.losses import masked_sum, token_logprobs
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.rewards import Metadata, TaskVerifier, reward_name, task_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``,
    the chance that ``k`` of them drawn without replacement hold a correct one (Chen et al.,
    2021, eq. 1), as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` that overflows nothing."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_correct(answers: Sequence[str | None], correct: str) -> bool:
    """maj@k of one prompt: whether the most frequent extracted answer among ``answers`` (one per
    sample; None where none could be extracted) is ``correct``; ties go to the answer seen first."""
    votes = Counter(a for a in answers if a is not None)
    return bool(votes) and votes.most_common(1)[0][0] == correct


def pass_columns(k: int) -> tuple[str, ...]:
    """The figures ``pass_and_majority`` reports for ``k`` samples per prompt; none for k <= 1."""
    return ("pass@1", f"pass@{k}", f"maj@{k}") if k > 1 else ()


def pass_and_majority(
    prompts: Sequence[str], responses: Sequence[str], metadata: Metadata, k: int
) -> dict[str, Tensor]:
    """pass@1, pass@k and maj@k of each prompt from its ``k`` samples, each (B,) float.

    The rows come in groups of ``k`` consecutive samples of one prompt (as ``repeat_interleave``
    lays them out); the verifier judges each (``TaskVerifier.success``) and ``task_answer``
    extracts the answers that vote. With ``n = k`` samples, pass@1 is the share that is correct
    and pass@k is 1 when any is; they are the unbiased estimates all the same.
    """
    if k < 1 or len(responses) % k:
        raise ValueError(f"pass_and_majority needs groups of k >= 1 samples, got {len(responses)} rows and k={k}.")
    success = TaskVerifier().success(prompts, responses, metadata).view(-1, k)  # (B, k)
    counts = success.sum(1).tolist()
    answers = [task_answer(p, r, m) for p, r, m in zip(prompts, responses, metadata)]
    groups = [answers[i : i + k] for i in range(0, len(answers), k)]
    majority = [majority_correct([answer for answer, _ in group], group[0][1]) for group in groups]
    return {
        "pass@1": torch.tensor([pass_at_k(k, c, 1) for c in counts]),
        f"pass@{k}": torch.tensor([pass_at_k(k, c, k) for c in counts]),
        f"maj@{k}": torch.tensor(majority, dtype=torch.float32),
    }


@dataclass
class Responses:
    """One sampled response per prompt of a split, with what scoring needs."""

    prompts: list[str]
    metadata: list[dict]
    texts: list[str]
    lengths: Tensor  # (N,) tokens, EOS included
    batches: list  # the GenerationOutput of each batch, for log-probabilities


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sample_batch(policy, batch: dict, datamodule, repeats: int, max_new_tokens, temperature, generator, tools):
    """``sample_and_decode`` of a prompt batch, each prompt ``repeats`` times in one call (with
    ``tools``' environment, multi-turn). Returns the output, the texts, and the repeated prompts
    and metadata."""
    device = _device(policy)
    ids = batch["input_ids"].to(device).repeat_interleave(repeats, dim=0)  # (B r, P)
    mask = batch["attention_mask"].to(device).repeat_interleave(repeats, dim=0)  # (B r, P)
    prompts = [p for p in batch["prompt"] for _ in range(repeats)]
    metadata = [m for m in batch["metadata"] for _ in range(repeats)]
    gen, texts = sample_and_decode(
        policy, ids, mask, datamodule.tokenizer, max_new_tokens, temperature=temperature, generator=generator,
        prompts=prompts, metadata=metadata, **tools,
    )  # fmt: skip
    return gen, texts, prompts, metadata


def sample_responses(
    policy: ShrayGPT,
    datamodule,
    split: str = "test",
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    desc: str | None = None,
    environment=None,
    max_turns: int = 4,
    engine: EngineName | RolloutEngine = "auto",
) -> Responses:
    """Sample one response per prompt of ``split``, batch by batch, with a seeded generator (and,
    with an ``environment``, its tool calls answered: multi-turn rollouts)."""
    generator = torch.Generator(device=_device(policy)).manual_seed(seed)
    tools = dict(environment=environment, max_turns=max_turns, engine=engine)
    out = Responses([], [], [], torch.zeros(0), [])
    lengths = []
    for batch in datamodule.plain_dataloader(split, desc=desc):
        gen, texts, _, _ = _sample_batch(policy, batch, datamodule, 1, max_new_tokens, temperature, generator, tools)
        out.texts += texts
        out.prompts += batch["prompt"]
        out.metadata += batch["metadata"]
        out.batches.append(gen)
        lengths.append(gen.response_mask.sum(1).float().cpu())
    out.lengths = torch.cat(lengths)
    return out


def sample_pass_at_k(
    policy: ShrayGPT,
    datamodule,
    k: int,
    split: str = "test",
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    desc: str | None = None,
    environment=None,
    max_turns: int = 4,
    engine: EngineName | RolloutEngine = "auto",
) -> dict[str, float] | None:
    """pass@1, pass@k and maj@k over the prompts of ``split``, from ``k`` samples per prompt.

    Each batch of prompts is repeated ``k`` times in one batched generate call, as an online
    rollout does, rather than sampled in ``k`` passes. None when the prompts are not all from
    the built-in tasks (nothing verifies them); it stops at the first such batch.

    Returns:
        ``pass_columns(k)`` as keys, each the mean over prompts of ``pass_and_majority``'s figure.
    """
    generator = torch.Generator(device=_device(policy)).manual_seed(seed)
    tools = dict(environment=environment, max_turns=max_turns, engine=engine)
    parts: list[dict[str, Tensor]] = []
    for batch in datamodule.plain_dataloader(split, desc=desc):
        if not TaskVerifier.covers(batch["metadata"]):
            return None
        _, texts, prompts, metadata = _sample_batch(
            policy, batch, datamodule, k, max_new_tokens, temperature, generator, tools
        )
        parts.append(pass_and_majority(prompts, texts, metadata, k))
    if not parts:
        return None
    return {name: torch.cat([part[name] for part in parts]).mean().item() for name in parts[0]}


@torch.no_grad()
def response_logprobs(model: ShrayGPT, responses: Responses, temperature: float = 1.0) -> Tensor:
    """Sum of each response's token log-probabilities under ``model``: (N,)."""
    model.eval()
    totals = []
    device = _device(model)
    for gen in responses.batches:
        seqs = gen.sequences.to(device)
        logits, _ = response_logits(model, seqs, gen.attention_mask.to(device), gen.prompt_length, temperature)
        logprobs = token_logprobs(logits, seqs[:, gen.prompt_length :])  # (B, N)
        totals.append(masked_sum(logprobs, gen.response_mask.to(device).float(), dim=1).cpu())
    return torch.cat(totals)


def verifier_success(
    policy: ShrayGPT,
    datamodule,
    split: str = "test",
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    environment=None,
    max_turns: int = 4,
    engine: EngineName | RolloutEngine = "auto",
) -> dict[str, float]:
    """The task verifier's success rate and mean reward, and the mean length, of one sampled
    response per held-out prompt (with an ``environment``: multi-turn, its tools answering)."""
    tools = dict(environment=environment, max_turns=max_turns, engine=engine)
    responses = sample_responses(policy, datamodule, split, temperature, max_new_tokens, seed, **tools)
    rewards, success = _verify(responses)
    return {
        "success": success.float().mean().item(),
        "mean_reward": rewards.mean().item(),
        "mean_length": responses.lengths.mean().item(),
    }


@torch.no_grad()
def answer_probability(policy, datamodule, split: str = "val") -> float:
    """The mean probability, over a split of an ``SFTDataModule`` of right answers, that the
    policy samples exactly the demonstrated answer (its end of turn included), teacher-forced.

    On a built-in task with ``wrong_fraction=0`` this is the expected verifier success of one
    response sampled at T = 1, without the sampling noise: a lower bound, since the verifier
    also accepts right answers worded otherwise ("Answer: 57" without the course's leading
    space, " Answer: 057", " Answer: 57." or anything after the number), mass that RL is free to
    move to. Measured on 200 prompts, sampled success has a standard deviation of about 0.035;
    this figure has none. The policy's mode (train or eval) is left as it was.
    """
    was_training = policy.training
    policy.eval()
    device, total, rows = _device(policy), 0.0, 0
    for batch in datamodule.plain_dataloader(split, desc="answer probability"):
        batch = {k: v.to(device) for k, v in batch.items()}
        logprobs, _ = sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        total += logprobs.exp().sum().item()  # (B,) each row's probability of its whole answer
        rows += logprobs.numel()
    policy.train(was_training)
    return total / rows


def _verify(responses: Responses) -> tuple[Tensor, Tensor]:
    """The task verifier's rewards (N,) and successes (N,) of sampled responses."""
    verifier, samples = TaskVerifier(), (responses.prompts, responses.texts, responses.metadata)
    return verifier(*samples), verifier.success(*samples)


def evaluate_policy(
    policy: ShrayGPT,
    datamodule,
    reference: ShrayGPT | None = None,
    reward_model=None,
    split: str = "test",
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    num_samples: int = 4,
    name: str = "policy",
    reference_samples: Responses | None = None,
    reward_functions: list | None = None,
    pass_k: int = 0,
    environment=None,
    max_turns: int = 4,
    engine: EngineName | RolloutEngine = "auto",
) -> dict:
    """Every held-out figure of one policy (see the module docstring); None where it does not apply.

    ``reference_samples`` are the reference's responses when already drawn (``sample_responses``
    with another seed than the policy's), so that several policies share them.
    ``reward_functions`` add ``reward/<name>``, each one's mean reward, and ``reward/<figure>`` for
    what each reports besides (``KeywordReward``'s ``animal_frequency``). ``pass_k`` above 1
    adds ``pass_columns(pass_k)`` from that many more samples per prompt (``sample_pass_at_k``;
    None off the built-in tasks). With an ``environment``, every sample is a multi-turn rollout
    with its tools (``max_turns``), the reference's too; the KL covers the policy's tokens only."""
    tools = dict(environment=environment, max_turns=max_turns, engine=engine)
    ours = sample_responses(
        policy, datamodule, split, temperature, max_new_tokens, seed, desc=f"sampling {name}", **tools
    )
    report: dict = {"prompts": len(ours.texts), "mean_length": ours.lengths.mean().item()}
    rewards, success = _verify(ours) if TaskVerifier.covers(ours.metadata) else (None, None)
    report["success"] = success.float().mean().item() if success is not None else None
    report["mean_reward"] = rewards.mean().item() if rewards is not None else None
    scores = reward_model.score(ours.prompts, ours.texts) if reward_model is not None else None
    report["reward_model_score"] = scores.mean().item() if scores is not None else None
    report["reward_model_success"] = (scores > 0).float().mean().item() if scores is not None else None
    for fn in reward_functions or []:
        report[f"reward/{reward_name(fn)}"] = fn(ours.prompts, ours.texts, ours.metadata).float().mean().item()
        reported = fn.report(ours.texts) if hasattr(fn, "report") else {}
        report.update({f"reward/{key}": value for key, value in reported.items()})
    if pass_k > 1:
        desc = f"pass@{pass_k} of {name}"
        figures = sample_pass_at_k(policy, datamodule, pass_k, split, temperature, max_new_tokens, seed, desc, **tools)
        report.update(figures or dict.fromkeys(pass_columns(pass_k)))
    report["kl_to_reference"] = report["win_rate"] = None
    theirs = None
    if reference is not None:
        gap = response_logprobs(policy, ours, temperature) - response_logprobs(reference, ours, temperature)
        report["kl_to_reference"] = gap.mean().item()
        theirs = reference_samples or sample_responses(
            reference, datamodule, split, temperature, max_new_tokens, seed + 1, "sampling the reference", **tools
        )
        if reward_model is not None:
            other = reward_model.score(theirs.prompts, theirs.texts)
            report["win_rate"] = ((scores > other).float() + 0.5 * (scores == other).float()).mean().item()
    report["samples"] = [
        {
            "prompt": ours.prompts[i],
            "response": ours.texts[i],
            "reward": rewards[i].item() if rewards is not None else None,
            "reward_model_score": scores[i].item() if scores is not None else None,
            "reference_response": theirs.texts[i] if theirs is not None else None,
        }
        for i in range(min(num_samples, len(ours.texts)))
    ]
    return report


def reward_model_accuracy(reward_model, datamodule, split: str = "test") -> float:
    """Share of held-out preference pairs the reward model ranks right (chosen above rejected)."""
    return _pair_accuracy(
        reward_model, lambda ids, attention, response: reward_model(ids, attention, response)[0], datamodule, split
    )


def preference_accuracy(policy, datamodule, split: str = "test", average: bool = False) -> float:
    """Share of held-out preference pairs whose chosen response ``policy`` gives the higher
    log-probability (summed over the response's tokens; per token with ``average``): the policy's
    own ranking, comparable across DPO, its reference-free variants and KTO."""

    def score(ids, attention, response):
        return sequence_logprobs(policy, ids, attention, response, average=average)[0]

    return _pair_accuracy(policy, score, datamodule, split)


@torch.no_grad()
def _pair_accuracy(model, score, datamodule, split: str) -> float:
    """Share of ``split``'s pairs whose chosen row ``score(ids, attention, response)`` (2B,) puts
    above its rejected row, with ``model`` in eval mode."""
    model.eval()
    device = _device(model)
    hits = []
    for batch in datamodule.plain_dataloader(split):
        B = batch["chosen_input_ids"].size(0)
        scores = score(*(t.to(device) for t in stack_pairs(batch)))  # (2B,)
        hits.append((scores[:B] > scores[B:]).float().cpu())
    return torch.cat(hits).mean().item()


# --------------------------------------------------------------------------------------------
# Demonstrations: perplexity and ROUGE-L (seed 004's SFT evaluation)
# --------------------------------------------------------------------------------------------
def split_demonstrations(batch: dict, pad_id: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """An ``SFTDataModule`` batch (right-padded, ``loss_mask`` 1 on the answer) as left-padded
    prompts (B, P), their attention mask, and each row's reference answer without its end-of-turn
    token: the first run of answer tokens (a multi-turn conversation's first assistant turn, the
    one its prompt asks for)."""
    prompts, references = [], []
    for ids, attention, answer in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        real = attention.bool()
        starts = answer.nonzero()
        cut = int(starts[0]) if len(starts) else int(real.sum())
        prompts.append(ids[:cut].tolist())
        ends = (answer[cut:] == 0).nonzero()
        end = cut + int(ends[0]) if len(ends) else len(answer)
        references.append([t for t in ids[cut:end].tolist() if t != pad_id])
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p, dtype=torch.long), 1
    return ids, mask, references


class DemonstrationScores:
    """Perplexity of held-out demonstrations' answers (torchmetrics ``Perplexity``, over every
    answer token of every batch) and ROUGE-L F1 of the policy's greedy answer against the
    reference answer (torchmetrics ``ROUGEScore``), accumulated batch by batch. A language
    modelling row (``text``: trained on whole, no prompt) has no answer to ask for: it counts in
    the perplexity only, and without any prompted row there is no ROUGE-L."""

    def __init__(self, max_new_tokens: int = 64):
        from torchmetrics.text import Perplexity, ROUGEScore

        self.max_new_tokens, self.prompted = max_new_tokens, 0
        self.perplexity = Perplexity(ignore_index=-100)
        self.rouge = ROUGEScore(rouge_keys=("rougeL",))

    def to(self, device) -> DemonstrationScores:
        if self.perplexity.device != torch.device(device):
            with torch.inference_mode(False):
                self.perplexity.to(device)
                self.rouge.to(device)
        return self

    @torch.no_grad()
    def update(self, policy, batch: dict, tokenizer, logits: Tensor | None = None) -> None:
        """Add a batch; ``logits`` (B, T, V) when the caller already ran the forward."""
        ids, attention, answer = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        if logits is None:
            logits, _, _ = policy(ids, attention_mask=attention)
        target = ids[:, 1:].masked_fill(answer[:, 1:] == 0, -100)  # the answer's tokens, EOS included
        with torch.inference_mode(False):  # the metric's states stay normal tensors (see ``compute``)
            self.perplexity.update(logits[:, :-1].float().clone(), target.clone())
        if not self.max_new_tokens:
            return
        prompts, mask, references = split_demonstrations(batch, tokenizer.eot_token)
        rows = mask.sum(1) > 0  # (B,) the rows with a prompt to answer
        if not rows.any():
            return
        prompts, mask = prompts[rows][:, (mask[rows].sum(0) > 0)], mask[rows][:, (mask[rows].sum(0) > 0)]
        _, texts = sample_and_decode(
            policy, prompts.to(ids.device), mask.to(ids.device), tokenizer, self.max_new_tokens, temperature=0.0
        )
        kept = [tokenizer.decode(r).strip() for r, keep in zip(references, rows.tolist()) if keep]
        self.rouge.update(texts, kept)
        self.prompted += len(kept)

    def compute(self) -> dict[str, float]:
        out = {"perplexity": float(self.perplexity.compute())}
        if self.max_new_tokens and self.prompted:
            out["rouge_l"] = float(self.rouge.compute()["rougeL_fmeasure"])
        self.prompted = 0
        with torch.inference_mode(False):  # fresh states must be normal tensors: the next update may run outside
            self.perplexity.reset()  # inference mode (Lightning validates in it, and fits without it)
            self.rouge.reset()
        return out


def demonstration_scores(policy, datamodule, split: str = "test", max_new_tokens: int = 64) -> dict[str, float]:
    """``DemonstrationScores`` of ``policy`` over a split of an ``SFTDataModule``."""
    scores = DemonstrationScores(max_new_tokens).to(_device(policy))
    policy.eval()
    for batch in datamodule.plain_dataloader(split, desc="perplexity and ROUGE-L"):
        scores.update(policy, {k: v.to(_device(policy)) for k, v in batch.items()}, datamodule.tokenizer)
    return scores.compute()
