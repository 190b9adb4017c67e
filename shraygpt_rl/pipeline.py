"""``python train.py --stage eval`` and ``python train.py --stage pipeline``.

``evaluate`` measures one policy on held-out prompts against a reference and a reward model.
``pipeline`` runs the whole demo: SFT, reward model, PPO against the reward model, GRPO against
the verifier and DPO, each with its config, then evaluates every policy it made and prints a
table. Both write a JSON report and a PNG plot.
"""

from __future__ import annotations

import time
from pathlib import Path

from shraygpt_rl.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from shraygpt_rl.environments import Environment
from shraygpt_rl.errors import DataError, require
from shraygpt_rl.evaluate import (
    demonstration_scores,
    evaluate_policy,
    pass_columns,
    reward_model_accuracy,
    sample_responses,
)
from shraygpt_rl.generation import EngineName, make_engine
from shraygpt_rl.policy import load_policy
from shraygpt_rl.report import plot_report, table, write_json
from shraygpt_rl.reward_model import RewardModel
from shraygpt_rl.rewards import RewardFunction
from shraygpt_rl.runner import data_from_config, policy_tokenizer, run_stage
from shraygpt_rl.stages.checks import check_rewards
from shraygpt_rl.turns import check_turns

COLUMNS = ("success", "mean_reward", "kl_to_reference", "win_rate", "reward_model_score", "mean_length")
# what --stage eval adds: the reward model's success rate, and the SFT figures on demonstrations
EVAL_COLUMNS = (*COLUMNS, "reward_model_success", "perplexity", "rouge_l")
# both tables end with pass_columns(pass_k): pass@1, pass@k and maj@k, named after the k asked for


def _prompts(config: str | None, num_prompts: int, policy=None) -> PromptDataModule:
    """Held-out prompts built as ``config``'s data, so that evaluation prompts look like training's;
    tokenised by ``policy``'s own tokenizer when it has one and the config names none."""
    sizes = dict(test_size=num_prompts, val_size=num_prompts, batch_size=100)
    return data_from_config(PromptDataModule, config, **sizes, **policy_tokenizer(policy, config))


def _demonstrations(config: str | None, num_prompts: int, policy) -> SFTDataModule | None:
    """Held-out demonstrations from ``config``'s data source, or None when it has none (prompts only)."""
    sizes = dict(test_size=num_prompts, val_size=num_prompts, batch_size=100)
    demos = data_from_config(SFTDataModule, config, **sizes, **policy_tokenizer(policy, config))
    try:
        demos.setup()
    except DataError:  # a source of prompts only (its kind is checked when it is read)
        return None
    return demos


def evaluate(
    policy: str,
    reference: str | None = None,
    reward_model: str | None = None,
    rewards: list[RewardFunction] | None = None,
    logs: list[str] | None = None,
    data_config: str | None = "configs/sft.yaml",
    num_prompts: int = 200,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    pass_k: int = 8,
    environment: Environment | None = None,
    max_turns: int = 4,
    rollout_engine: EngineName = "auto",
    out: str = "reports/eval",
) -> dict:
    """Evaluate a policy on held-out prompts; write ``<out>.json`` and ``<out>.png``.

    Args:
        policy: The policy to evaluate: anything ``--model.policy`` takes (a ShrayGPT checkpoint,
            a Hugging Face hub name or folder, an adapter folder).
        reference: A policy to compare with (usually the SFT policy), of the same kinds: KL to
            it, the reward model's win rate over its responses, and every figure for it too.
        reward_model: A reward-model checkpoint that scores responses and judges the win rate.
        rewards: Reward functions (``class_path`` entries, as the online stages take them): each
            one's mean reward, and what it reports besides (``KeywordReward``: seed 001's
            animal-word frequency), for the policy and the reference.
        logs: TensorBoard folders of training runs (``logs/ppo``) whose reward and KL curves go
            into the plot.
        data_config: A stage config whose ``data:`` section says how prompts are built (source,
            tokenizer, system prompt); the built-in arithmetic task by default. A Hugging Face
            policy's own tokenizer is used unless the config names one.
        num_prompts: Held-out prompts (the test split).
        max_new_tokens: Longest response.
        temperature: Sampling temperature (1 samples the policy as RL trained it).
        seed: Seeds the sampling.
        pass_k: Samples per held-out prompt for pass@1, pass@k and maj@k with k = pass_k, on the
            built-in tasks (the unbiased estimator of Chen et al., 2021, and a majority vote over
            the extracted answers), drawn besides the one sample the other figures use; 0 or 1
            leaves them out.
        environment: Tools for multi-turn rollouts (``class_path``, as the online stages take
            it: ``shraygpt_rl.environments.Calculator``): every sample, the reference's too, has
            its tool calls answered. None: single-turn.
        max_turns: Most policy turns per multi-turn sample.
        rollout_engine: What samples (``auto``, ``static``, ``eager``, ``vllm``), as the online
            stages' ``--model.rollout_engine``.
        out: Path of the report, without extension.
    """
    require(pass_k >= 0, f"pass_k must be >= 0 (0 or 1 leaves pass@k out), got {pass_k}.")
    check_turns(environment, max_turns)
    model = load_policy(policy).eval()
    ref = load_policy(reference).eval() if reference else None
    data = _prompts(data_config, num_prompts, model)
    if rewards:
        check_rewards(rewards, data.metadata_keys(), data.hparams.source)
    scorer = RewardModel.load_from_checkpoint(reward_model).eval() if reward_model else None
    options = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        reward_model=scorer,
        reward_functions=rewards,
        pass_k=pass_k,
        environment=environment,
        max_turns=max_turns,
        engine=make_engine(rollout_engine),
    )
    policies = {}
    if ref is not None:
        policies["reference"] = evaluate_policy(ref, data, name="reference", **options)
    policies["policy"] = evaluate_policy(model, data, reference=ref, name="policy", **options)
    demos = _demonstrations(data_config, num_prompts, model)
    for label, candidate in (("reference", ref), ("policy", model)):
        if candidate is not None and demos is not None:
            policies[label].update(demonstration_scores(candidate, demos, max_new_tokens=max_new_tokens))
    columns = [
        *EVAL_COLUMNS,
        *pass_columns(pass_k),
        *sorted({k for r in policies.values() for k in r if k.startswith("reward/")}),
    ]
    print(f"\n{policy} on {policies['policy']['prompts']} held-out prompts:\n{table(policies, columns)}")
    for sample in policies["policy"]["samples"]:
        print(f"\n  prompt:    {sample['prompt'][-120:]!r}\n  policy:    {sample['response']!r}")
        if sample["reference_response"] is not None:
            print(f"  reference: {sample['reference_response']!r}")
    runs = {Path(log).name: log for log in logs or []}
    report = {"policy": policy, "reference": reference, "reward_model": reward_model, "results": policies}
    print(f"\nwrote {write_json(f'{out}.json', report)} and {plot_report(f'{out}.png', runs, policies)}")
    return report


def _evaluate_against_sft(
    exports: dict[str, str], data, scorer, max_new_tokens: int, seed: int, pass_k: int = 0
) -> dict:
    """Every exported policy on the same held-out prompts; KL and win rate against the SFT policy,
    whose reference samples all policies share; pass@k and maj@k for ``pass_k`` > 1."""
    sft_policy = load_policy(exports["SFT"]).eval()
    options = dict(max_new_tokens=max_new_tokens, seed=seed, reward_model=scorer, pass_k=pass_k)
    policies = {"SFT": {**evaluate_policy(sft_policy, data, name="SFT", **options), "kl_to_reference": 0.0}}
    sft_samples = sample_responses(sft_policy, data, max_new_tokens=max_new_tokens, seed=seed + 1)
    for label in ("PPO", "GRPO", "DPO"):
        if label in exports:
            model = load_policy(exports[label]).eval()
            policies[label] = evaluate_policy(
                model, data, reference=sft_policy, name=label, reference_samples=sft_samples, **options
            )
    return policies


def pipeline(
    sft: str = "configs/sft.yaml",
    reward: str = "configs/reward.yaml",
    ppo: str | None = "configs/ppo-rm.yaml",
    grpo: str | None = "configs/grpo.yaml",
    dpo: str | None = "configs/dpo.yaml",
    num_prompts: int = 200,
    max_new_tokens: int = 16,
    seed: int = 0,
    train_seed: int = 0,
    pass_k: int = 8,
    out: str = "reports/pipeline",
) -> dict:
    """SFT -> reward model -> PPO (reward model) -> GRPO (verifier) -> DPO, then the held-out table.

    Any configs will do, ShrayGPT's or a Hugging Face model's (``configs/opt-pipeline.yaml``: seed
    004's chain on OPT-350m with LoRA); the evaluation loads every export as ``--model.policy``
    would and tokenises with the SFT policy's own tokenizer when it has one.

    Args:
        sft: Config of the SFT stage; its ``data:`` section also builds the evaluation prompts.
        reward: Config of the reward model, which PPO's config must read.
        ppo: Config of PPO; None skips it.
        grpo: Config of GRPO; None skips it.
        dpo: Config of DPO; None skips it.
        num_prompts: Held-out test prompts for the final table.
        max_new_tokens: Longest response in the evaluation.
        seed: Seeds the evaluation's sampling.
        train_seed: Seeds every stage's training (``--seed_everything``).
        pass_k: Samples per held-out prompt for pass@1, pass@k and maj@k (k = pass_k) of every
            policy, on the built-in tasks; 0 or 1 leaves them out.
        out: Path of the report (``.json`` and ``.png``), without extension.
    """
    require(pass_k >= 0, f"pass_k must be >= 0 (0 or 1 leaves pass@k out), got {pass_k}.")
    steps = [("SFT", "sft", sft), ("reward", "reward", reward), ("PPO", "ppo", ppo), ("GRPO", "grpo", grpo)]
    steps = [s for s in [*steps, ("DPO", "dpo", dpo)] if s[2] is not None]
    exports, logs, seconds, optimised = {}, {}, {}, {}
    for i, (label, stage, config) in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {label}: python train.py --stage {stage} --config {config}", flush=True)
        start = time.perf_counter()
        cli = run_stage(stage, ["--config", config, f"--seed_everything={train_seed}"])
        seconds[label] = round(time.perf_counter() - start, 1)
        exports[label], logs[label] = cli.model.hparams.export_path, cli.trainer.logger.log_dir
        if stage in ("ppo", "grpo"):  # what each online run optimised: the plot puts them side by side
            optimised[label] = "reward model" if cli.model.hparams.reward_model else "reward functions"

    print(f"\n[evaluation] {num_prompts} held-out prompts per policy", flush=True)
    scorer = RewardModel.load_from_checkpoint(exports["reward"]).eval()
    sft_policy = load_policy(exports["SFT"])
    pairs = data_from_config(PreferenceDataModule, reward, batch_size=100, **policy_tokenizer(sft_policy, reward))
    accuracy = reward_model_accuracy(scorer, pairs)
    data = _prompts(sft, num_prompts, sft_policy)
    policies = _evaluate_against_sft(exports, data, scorer, max_new_tokens, seed, pass_k)
    report = {
        "reward_model_accuracy": accuracy,
        "seconds": seconds,
        "exports": exports,
        "results": policies,
        "logs": {label: log[0] if isinstance(log, tuple) else log for label, log in logs.items()},
    }
    runs = {f"{label} ({optimised[label]})": logs[label] for label in ("PPO", "GRPO") if label in logs}
    png = plot_report(f"{out}.png", runs, policies)
    extra = f"; pass@k and maj@k from {pass_k} more" if pass_k > 1 else ""
    print(
        f"\nheld-out prompts, one sample per prompt at T = 1{extra} (KL and win rate against the SFT policy):\n"
        f"{table(policies, (*COLUMNS, *pass_columns(pass_k)))}\n"
        f"reward model pairwise accuracy on held-out pairs: {accuracy:.3f}\n"
        f"training time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}\n"
        f"wrote {write_json(f'{out}.json', report)} and {png}"
    )
    return report
