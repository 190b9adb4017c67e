"""``train.py --stage eval`` for any policy: Hugging Face folders and adapters, rule rewards. The
pipeline on Hugging Face configs (``configs/opt-pipeline.yaml``) runs in the documented-commands
test, on a tiny OPT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARITH, fails, scripted_over_real

from shraygpt_rl import evaluate
from shraygpt_rl.bench import ROOT
from shraygpt_rl.cli import main
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.pipeline import _evaluate_against_sft


def test_eval_reports_a_hugging_face_policy_with_the_seeds_rule_reward(tiny_hf, tmp_path, monkeypatch):
    """Seed 001's report for a tiny GPT-Neo folder against itself: the keyword reward and the
    animal-word frequency of policy and reference, tokenised by the model's own tokenizer, from the
    story openings (no demonstrations: no perplexity). The same model twice: no KL, the same samples."""
    monkeypatch.chdir(tmp_path)
    folder = str(tiny_hf("gpt_neo"))
    args = f"--policy {folder} --reference {folder} --data_config {ROOT / 'configs' / 'tinystories-ppo.yaml'} "
    args += "--num_prompts 8 --max_new_tokens 8 --out reports/neo"
    report = main(
        ["--stage", "eval", *args.split(), "--rewards", '[{"class_path": "shraygpt_rl.rewards.KeywordReward"}]']
    )
    policy, reference = report["results"]["policy"], report["results"]["reference"]
    for figures in (policy, reference):
        assert {"reward/keyword_reward", "reward/animal_frequency"} <= set(figures)
        assert "perplexity" not in figures  # story openings have no demonstrations
        assert figures["pass@8"] is None  # nor a verifier: no pass@k (--pass_k is 8 by default)
    assert policy["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert policy["reward/animal_frequency"] == reference["reward/animal_frequency"]
    assert _responses(policy) == _responses(reference)  # the same seed: the same samples
    written = json.loads((tmp_path / "reports" / "neo.json").read_text())
    assert written["results"]["policy"]["reward/keyword_reward"] == policy["reward/keyword_reward"]
    assert policy["prompts"] == 6  # the 24 built-in openings give 6 test prompts
    eager = main(["--stage", "eval", *args.split(), "--rollout_engine", "eager", "--pass_k", "0"])
    assert _responses(eager["results"]["policy"]) == _responses(policy)  # auto ran the static step: same samples


def test_eval_of_an_adapter_folder_differs_from_its_base(tiny_hf, tmp_path, monkeypatch, perturb_adapters):
    """An adapter folder (what a LoRA stage exports) evaluates as base + adapter: its samples and
    figures differ from the base's, and the KL to the base is positive."""
    from shraygpt_rl.lora import LoRASpec
    from shraygpt_rl.policy import export_policy, load_policy, with_lora

    monkeypatch.chdir(tmp_path)
    base = str(tiny_hf("gpt_neo"))
    model = with_lora(load_policy(base), LoRASpec.parse({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    perturb_adapters(model, scale=2.0)
    export_policy(model, tmp_path / "adapter")
    args = (
        f"--policy {tmp_path / 'adapter'} --reference {base} --data_config {ROOT / 'configs' / 'tinystories-ppo.yaml'} "
    )
    args += "--num_prompts 8 --max_new_tokens 8 --out reports/adapter"
    report = main(
        ["--stage", "eval", *args.split(), "--rewards", '[{"class_path": "shraygpt_rl.rewards.KeywordReward"}]']
    )
    assert report["results"]["policy"]["kl_to_reference"] > 0.01
    assert _responses(report["results"]["policy"]) != _responses(report["results"]["reference"])


def _responses(figures: dict) -> list[str]:
    return [sample["response"] for sample in figures["samples"]]


def test_eval_reports_pass_at_k_and_maj_at_k_on_the_built_in_tasks(random_policy, tmp_path, monkeypatch, capsys):
    """``--pass_k`` adds pass@1, pass@k and maj@k to the table and the JSON, for the policy and the
    reference; ``--pass_k 0`` leaves them out, and a negative one is refused in one sentence."""
    monkeypatch.chdir(tmp_path)
    # Scripted answers on the real samples: some right, so a pass@k stuck at 0 (or unwritten) fails.
    monkeypatch.setattr(evaluate, "sample_and_decode", scripted_over_real(3, []))
    args = f"--policy {random_policy} --data_config {ROOT / 'configs' / 'sft.yaml'} --num_prompts 6 --max_new_tokens 3"
    report = main(["--stage", "eval", *args.split(), "--reference", random_policy, "--pass_k", "3", "--out", "r/k"])
    assert "pass@3" in capsys.readouterr().out
    written = json.loads((tmp_path / "r" / "k.json").read_text())["results"]
    for label in ("policy", "reference"):
        figures = {name: written[label][name] for name in ("pass@1", "pass@3", "maj@3")}
        assert figures == {name: report["results"][label][name] for name in figures}
        assert 0 < figures["pass@1"] <= figures["pass@3"] <= 1 and figures["maj@3"] <= figures["pass@3"]
    off = main(["--stage", "eval", *args.split(), "--pass_k", "0", "--out", "r/off"])
    assert not any("@" in name for name in off["results"]["policy"])
    assert fails(capsys, ["--stage", "eval", *args.split(), "--pass_k", "-1"]).startswith("pass_k must be >= 0")


def test_the_pipeline_report_has_pass_at_k_for_every_policy(random_policy, monkeypatch):
    class LengthScorer:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

    data = PromptDataModule(**{**ARITH, "train_size": 8, "test_size": 6})
    data.setup()
    exports = {"SFT": random_policy, "GRPO": random_policy}
    monkeypatch.setattr(evaluate, "sample_and_decode", scripted_over_real(2, []))  # known right answers
    policies = _evaluate_against_sft(exports, data, LengthScorer(), max_new_tokens=3, seed=0, pass_k=2)
    assert list(policies) == ["SFT", "GRPO"]
    counts = [min(row["target"] % 3, 2) for row in data.splits["test"]]  # right samples of each prompt's 2
    expected = {"pass@1": sum(c / 2 for c in counts) / 6, "pass@2": sum(c > 0 for c in counts) / 6}
    assert 0 < expected["pass@1"] < expected["pass@2"]
    for label in policies:
        assert {name: policies[label][name] for name in expected} == pytest.approx(expected), label
