"""Held-out evaluation and its report: figures by hand against the policies' own samples.

The eval and pipeline commands themselves run in tests/test_documented_commands.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import ARITH, scripted_over_real, scripted_sampler

from shraygpt_rl import evaluate
from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.evaluate import (
    evaluate_policy,
    majority_correct,
    pass_and_majority,
    pass_at_k,
    pass_columns,
    response_logprobs,
    sample_pass_at_k,
    sample_responses,
)
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.report import _smooth, latest_run, plot_report, table


class LengthScorer:
    """A stand-in reward model: longer responses score higher."""

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


@pytest.fixture
def prompts():
    return PromptDataModule(**{**ARITH, "test_size": 24, "batch_size": 10})


def test_kl_and_win_rate_by_hand(prompts):
    torch.manual_seed(0)
    policy, reference = ShrayGPT(**tiny_config()), ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=reference, reward_model=LengthScorer(), max_new_tokens=6)
    ours = sample_responses(policy, prompts, max_new_tokens=6, seed=0)
    theirs = sample_responses(reference, prompts, max_new_tokens=6, seed=1)
    # KL: the mean over the policy's samples of log pi(y) - log pi_ref(y); log pi(y) is also what
    # generation recorded while sampling
    sampled = torch.cat([b.logprobs.sum(1) for b in ours.batches])
    assert torch.allclose(response_logprobs(policy, ours), sampled, atol=1e-4)
    expected_kl = (sampled - response_logprobs(reference, ours)).mean().item()
    assert report["kl_to_reference"] == pytest.approx(expected_kl, abs=1e-4)
    mine, other = torch.tensor([len(t) for t in ours.texts]), torch.tensor([len(t) for t in theirs.texts])
    wins = ((mine > other).float() + 0.5 * (mine == other).float()).mean().item()
    assert report["win_rate"] == pytest.approx(wins)
    assert report["success"] == 0.0 and report["mean_reward"] == -1.0  # a random model never answers
    assert report["prompts"] == 24 and len(report["samples"]) == 4
    assert report["samples"][0]["reference_response"] == theirs.texts[0]


def test_a_policy_against_itself_has_no_kl(prompts):
    torch.manual_seed(0)
    policy = ShrayGPT(**tiny_config())
    report = evaluate_policy(policy, prompts, reference=policy, max_new_tokens=6)
    assert report["kl_to_reference"] == 0.0 and report["win_rate"] is None


def test_report_helpers_by_hand(tmp_path):
    assert _smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    (tmp_path / "version_2").mkdir()
    (tmp_path / "version_10").mkdir()
    assert latest_run(tmp_path).name == "version_10"
    text = table({"SFT": {"success": 0.5, "win_rate": None}}, ("success", "win_rate"))
    assert text.splitlines()[2].split() == ["SFT", "0.500", "-"]
    long = table({"SFT": {"mean_length": 2.0, "reward_model_success": 1.0}}, ("mean_length", "reward_model_success"))
    assert long.splitlines()[0].split() == ["policy", "mean", "length", "reward", "model", "success"]


def test_demonstrations_split_into_left_padded_prompts_and_answers():
    from shraygpt_rl.evaluate import split_demonstrations

    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 1, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]),
        "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0]]),
    }
    ids, mask, answers = split_demonstrations(batch, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 3]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert answers == [[8, 9], [4, 1, 2]]  # the EOS (0 here) is not part of the reference text


def test_demonstration_scores_by_hand(tiny_model):
    """Perplexity is exp of the mean answer-token NLL over all batches; a policy that answers with
    the reference text scores ROUGE-L 1, one that answers nothing 0."""
    from shraygpt_rl.evaluate import DemonstrationScores
    from shraygpt_rl.losses import next_token_loss
    from shraygpt_rl.tokenizer import get_tokenizer

    enc = get_tokenizer("byte")
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 10))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": (torch.arange(10) >= 6).long().expand(3, 10),
    }
    scores = DemonstrationScores(max_new_tokens=0)
    with torch.no_grad():
        logits, _, _ = tiny_model(ids)
    scores.update(tiny_model, batch, enc, logits)
    expected = math.exp(next_token_loss(logits, ids, batch["loss_mask"]).item())
    assert scores.compute()["perplexity"] == pytest.approx(expected, rel=1e-5)

    rouge = DemonstrationScores(max_new_tokens=4)
    rouge.rouge.update(["the cat sat"], ["the cat sat"])
    rouge.rouge.update(["dog"], ["the cat sat"])
    assert float(rouge.rouge.compute()["rougeL_fmeasure"]) == pytest.approx(0.5)


def test_reward_model_success_is_the_share_scored_above_zero(tiny_model):
    """Seed 003's evaluate_model: the fraction of responses the reward model scores above 0."""

    class Scorer:
        def score(self, prompts, responses):
            return torch.tensor([1.0 if i % 4 == 0 else (0.0 if i % 4 == 1 else -2.0) for i in range(len(responses))])

    data = PromptDataModule(**{**ARITH, "test_size": 12, "batch_size": 12})
    data.setup()
    report = evaluate_policy(tiny_model, data, reward_model=Scorer(), max_new_tokens=2)
    assert report["reward_model_success"] == pytest.approx(3 / 12)  # 0 is not above 0


def test_pass_at_k_by_hand_and_against_every_draw():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 4, 2) == 1.0
    for n in range(1, 8):  # the share of all k-subsets of the n samples that hold a correct one
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, draws)) / len(draws), abs=1e-12)
    assert 0 < pass_at_k(1000, 1, 500) < 1  # no factorial overflow
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 2)


def test_majority_vote_by_hand():
    assert majority_correct(["12", "13", "12", None], "12")
    assert not majority_correct(["13", "12"], "12")  # a tie goes to the answer seen first
    assert majority_correct(["12", "13"], "12")
    assert not majority_correct([None, None], "12") and not majority_correct([], "12")
    assert not majority_correct(["13", None, None, "12", "13"], "12")


def test_pass_and_majority_by_hand():
    seven, sort = {"task": "arithmetic", "target": 7}, {"task": "sorting", "numbers": [3, 1]}
    groups = [
        (seven, ["Answer: 7"] * 4),  # c = 4: every figure 1
        (seven, ["Answer: 8", "Answer: 7", "Answer: 8", "no answer"]),  # c = 1; 8 wins the vote
        (sort, ["Answer: 3, 1", "Answer: 1,3", "oops", "Answer: 01, 3"]),  # c = 2; "1, 3" wins it
        ({"task": "arithmetic", "target": 5}, ["Answer: 6", "Answer: 4", "x", "Answer: 6"]),  # c = 0
    ]
    texts = [t for _, group in groups for t in group]
    metadata = [m for m, group in groups for _ in group]
    figures = pass_and_majority(["p"] * len(texts), texts, metadata, k=4)
    assert list(figures) == list(pass_columns(4)) == ["pass@1", "pass@4", "maj@4"]
    assert figures["pass@1"].tolist() == [1.0, 0.25, 0.5, 0.0]
    assert figures["pass@4"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert figures["maj@4"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # n = k = 2 over the same rows: pass@2 = 1 - C(2-c, 2) / C(2, 2) per pair
    pairs = pass_and_majority(["p"] * len(texts), texts, metadata, k=2)
    assert pairs["pass@2"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert pairs["maj@2"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # ties go to the first answer
    assert pass_columns(1) == pass_columns(0) == ()
    with pytest.raises(ValueError, match="groups of k"):
        pass_and_majority(["p"] * 3, texts[:3], metadata[:3], k=2)


def test_sample_pass_at_k_against_known_counts_batched_or_not(monkeypatch, tiny_model):
    k, calls = 4, []
    monkeypatch.setattr(evaluate, "sample_and_decode", scripted_sampler(k, calls))
    sizes = {**ARITH, "train_size": 8, "test_size": 24}
    batched = sample_pass_at_k(tiny_model, PromptDataModule(**{**sizes, "batch_size": 10}), k)
    assert calls == [40, 40, 16]  # each batch of prompts repeated k times, in one call
    single = sample_pass_at_k(tiny_model, PromptDataModule(**{**sizes, "batch_size": 1}), k)
    data = PromptDataModule(**sizes)
    data.setup()
    counts = [min(row["target"] % (k + 1), k) for row in data.splits["test"]]
    assert {0, 1, 2, 4} <= set(counts)  # every case of the vote: none right, a minority, a tie, all
    assert batched["pass@1"] == pytest.approx(sum(c / k for c in counts) / 24)
    assert batched["pass@4"] == pytest.approx(sum(c > 0 for c in counts) / 24)
    assert batched["maj@4"] == pytest.approx(sum(c >= 2 for c in counts) / 24)  # a 2-2 tie goes to the first
    assert single == pytest.approx(batched)


def test_sample_pass_at_k_skips_prompts_no_verifier_covers(monkeypatch, tiny_model):
    class Stories:
        def plain_dataloader(self, split, desc=None):
            return [{"metadata": [{"source": "story"}], "prompt": ["Once"], "input_ids": None}]

    calls = []
    monkeypatch.setattr(evaluate, "sample_and_decode", scripted_sampler(2, calls))
    assert sample_pass_at_k(tiny_model, Stories(), k=2) is None and calls == []


def test_evaluate_policy_adds_pass_at_k_and_the_report_takes_it(monkeypatch, prompts, tmp_path):
    """pass@k through ``evaluate_policy``, on scripted answers: of each prompt's k samples,
    ``min(target % (k + 1), k)`` are right, so every figure is above 0 and equals a count by hand.
    (A random policy's figures are 0 however the k samples are drawn, grouped or judged: a check
    on them could not fail.) Fails if the k samples of a row group are not one prompt's (``repeat``
    for ``repeat_interleave``), if pass@1 and pass@k swap, or if maj@k votes over the wrong group."""
    k, calls = 3, []
    monkeypatch.setattr(evaluate, "sample_and_decode", scripted_over_real(k, calls))
    prompts.setup()
    torch.manual_seed(0)
    report = evaluate_policy(ShrayGPT(**tiny_config()), prompts, max_new_tokens=4, pass_k=k)
    counts = [min(row["target"] % (k + 1), k) for row in prompts.splits["test"]]
    assert calls == [10, 10, 4, 30, 30, 12]  # one sample per prompt, then k per prompt in one call
    assert 0 < sum(counts) < k * len(counts) and {c >= 2 for c in counts} == {True, False}
    expected = {
        "pass@1": sum(c / k for c in counts) / 24,
        "pass@3": sum(c > 0 for c in counts) / 24,
        "maj@3": sum(c >= 2 for c in counts) / 24,  # k = 3: no ties; the wrong answers all agree
    }
    assert {name: report[name] for name in expected} == pytest.approx(expected)
    # the single sample of row i of a batch of 10 is right when i % k < target % (k + 1)
    firsts = [(i % 10) % k < row["target"] % (k + 1) for i, row in enumerate(prompts.splits["test"])]
    assert report["success"] == pytest.approx(sum(firsts) / 24)
    assert "pass@1" not in evaluate_policy(ShrayGPT(**tiny_config()), prompts, max_new_tokens=2)
    policies = {"SFT": report, "PPO": {"success": 0.5, "pass@1": None}}
    lines = table(policies, ("success", *pass_columns(k))).splitlines()
    assert lines[2].split()[-3:] == [f"{expected[name]:.3f}" for name in pass_columns(k)]
    assert lines[3].split() == ["PPO", "0.500", "-", "-", "-"]
    assert plot_report(tmp_path / "report.png", {}, policies).stat().st_size > 0


def test_preference_accuracy_is_a_per_pair_comparison_of_full_forward_logprobs(tiny_model):
    """Batched through the response-only head, against one pair at a time through the whole
    model's logits; and the chosen answer gets the higher score exactly when the count says so."""
    from conftest import ARITH

    from shraygpt_rl.data import PreferenceDataModule
    from shraygpt_rl.evaluate import preference_accuracy

    data = PreferenceDataModule(**{**ARITH, "train_size": 8, "test_size": 24, "batch_size": 8})
    data.setup()
    hits = []
    for batch in data.plain_dataloader("test"):
        for i in range(batch["chosen_input_ids"].size(0)):
            scores = []
            for side in ("chosen", "rejected"):
                ids = batch[f"{side}_input_ids"][i : i + 1]
                attention = batch[f"{side}_attention_mask"][i : i + 1]
                mask = attention.bool() & ~batch[f"{side}_prompt_mask"][i : i + 1].bool()  # the response
                with torch.no_grad():
                    logits = tiny_model(ids, attention_mask=attention)[0]
                logprobs = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
                scores.append(logprobs[mask[0, 1:]].sum().item())
            hits.append(scores[0] > scores[1])
    assert preference_accuracy(tiny_model, data) == pytest.approx(sum(hits) / len(hits))


def test_reward_model_accuracy_is_a_per_pair_comparison(tiny_model):
    """Batched over the split, against scoring each side of each pair on its own."""
    from conftest import ARITH

    from shraygpt_rl.data import PreferenceDataModule
    from shraygpt_rl.evaluate import reward_model_accuracy
    from shraygpt_rl.reward_model import RewardModel

    torch.manual_seed(1)
    scorer = RewardModel(tiny_model).eval()
    torch.nn.init.normal_(scorer.value_head.weight)  # a fresh head may score every row alike
    data = PreferenceDataModule(**{**ARITH, "train_size": 8, "test_size": 24, "batch_size": 8})
    data.setup()
    hits = []
    for batch in data.plain_dataloader("test"):
        for i in range(batch["chosen_input_ids"].size(0)):
            with torch.no_grad():
                chosen, rejected = (
                    scorer(batch[f"{side}_input_ids"][i : i + 1], batch[f"{side}_attention_mask"][i : i + 1])[0].item()
                    for side in ("chosen", "rejected")
                )
            hits.append(chosen > rejected)
    assert 0 < sum(hits) < len(hits)  # both outcomes occur: the comparison is not vacuous
    assert reward_model_accuracy(scorer, data) == pytest.approx(sum(hits) / len(hits))


def test_a_plain_function_is_a_reward_in_the_report_as_in_training(prompts):
    """``WeightedSum`` names a plain function by ``__name__``; the report did by ``fn.name`` only,
    and raised AttributeError (one rule now: ``rewards.reward_name``)."""

    def length(prompts, responses, metadata):
        return torch.tensor([float(len(r)) for r in responses])

    torch.manual_seed(0)
    report = evaluate_policy(ShrayGPT(**tiny_config()), prompts, max_new_tokens=3, reward_functions=[length])
    assert 0 <= report["reward/length"] <= 3  # characters of at most 3 byte tokens


def test_a_multi_turn_reference_is_its_first_assistant_turn():
    """ROUGE-L's reference is the answer the prompt asks for, the first run of answer tokens, not
    every assistant turn of the conversation joined (issue 34's review)."""
    from shraygpt_rl.evaluate import split_demonstrations

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9, 9]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 7 + [0, 0]]),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0, 0]]),
    }
    prompts, mask, references = split_demonstrations(batch, pad_id=9)
    assert prompts.tolist() == [[1, 2]] and mask.tolist() == [[1, 1]] and references == [[3, 4]]


def test_answer_probability_is_each_rows_answer_and_end_of_turn_probability_averaged(tiny_model):
    """Against a per-row loop: the full forward of each unpadded row, the product of the
    probabilities of exactly the tokens of the course's response `` Answer: <sum>`` (its leading
    space included) and the end of turn, averaged over the split (two ragged batches). A random
    model's probabilities are about 1e-30: the comparison is relative only."""
    from shraygpt_rl.data import SFTDataModule
    from shraygpt_rl.evaluate import answer_probability

    data = SFTDataModule(**{**ARITH, "val_size": 6, "batch_size": 4}, wrong_fraction=0.0)
    data.setup()
    enc = data.tokenizer
    probabilities = []
    for row in data.splits["val"]:
        ids = torch.tensor(data.example(row)["input_ids"])  # prompt then response, unpadded
        answer = enc.encode_ordinary(f" Answer: {row['target']}") + [enc.eot_token]
        assert ids[-len(answer) :].tolist() == answer  # the row ends with the answer and its end of turn
        with torch.no_grad():
            logits, _, _ = tiny_model(ids[None])  # (1, T, V)
        start = len(ids) - len(answer)
        logprobs = logits[0, start - 1 : -1].log_softmax(-1)  # position t predicts token t + 1
        probabilities.append(logprobs.gather(1, ids[start:, None]).sum().exp().item())
    tiny_model.train()
    assert answer_probability(tiny_model, data, "val") == pytest.approx(sum(probabilities) / 6, rel=1e-4, abs=0)
    assert tiny_model.training  # the policy's mode is left as it was
