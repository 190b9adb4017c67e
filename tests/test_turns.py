"""Multi-turn rollouts in the engine: observations fed, not sampled; static = eager = row by row;
the rollout's log-probabilities recovered by a training forward; max_turns; the error cases."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from conftest import ByteTokenizer, Echo, frequent_byte

from shraygpt_rl.environments import Calculator, Environment
from shraygpt_rl.errors import ConfigError, EnvironmentStepError
from shraygpt_rl.generation import generate, response_logprobs, sample_and_decode
from shraygpt_rl.lora import LoRASpec
from shraygpt_rl.model import ShrayGPT
from shraygpt_rl.policy import load_policy, with_lora
from shraygpt_rl.tokenizer import byte_encoding, stop_tokens
from shraygpt_rl.turns import Turns

OBSERVATION = "<r>"
ARITH_PROMPTS = dict(source="arithmetic", digits=2, system_prompt=None, max_length=64, max_prompt_length=48)


Encoding = ByteTokenizer


def prompts(batch: int = 4, width: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(97, 123, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def a_stop(out) -> str:
    return frequent_byte(out.responses)


def run(model, ids, mask, env, max_new_tokens=40, enc=None, max_turns=4, **kwargs):
    enc = enc or Encoding()
    turns = Turns(env, enc, ["p"] * len(ids), [{}] * len(ids), max_turns, max_new_tokens)
    return generate(
        model, ids, max_new_tokens, attention_mask=mask, eos_token_id=stop_tokens(enc), turns=turns, **kwargs
    )


def observation_texts(out) -> list[list[str]]:
    """Each row's runs of fed (attended but not the policy's) tokens, as text."""
    fed = out.attention_mask[:, out.prompt_length :].bool() & ~out.response_mask.bool()
    texts = []
    for row, mask in zip(out.responses.tolist(), fed.tolist()):
        runs, current = [], []
        for token, is_fed in zip(row, mask):
            if is_fed:
                current.append(token)
            elif current:
                runs.append(bytes(current).decode()), current.clear()
        texts.append(runs + ([bytes(current).decode()] if current else []))
    return texts


@pytest.mark.parametrize("sampled", [False, True])
def test_static_and_eager_loops_agree(tiny_model, sampled):
    ids, mask = prompts()
    sampling = dict(generator=torch.Generator().manual_seed(3)) if sampled else dict(top_k=1)
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, **sampling))
    if sampled:
        sampling["generator"].manual_seed(3)
    static = run(tiny_model, ids, mask, Echo(stop), engine="static", **sampling)
    if sampled:
        sampling["generator"].manual_seed(3)
    eager = run(tiny_model, ids, mask, Echo(stop), engine="eager", **sampling)
    assert int(static.turns["tool_calls"].sum()) >= 2
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.equal(static.response_mask, eager.response_mask)
    assert torch.equal(static.attention_mask, eager.attention_mask)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-5)
    assert all(torch.equal(static.turns[k], eager.turns[k]) for k in static.turns)


@pytest.mark.parametrize("static", [True, False])
def test_batched_turns_equal_row_by_row(tiny_model, static):
    """Rows call the tool at different steps and end at different steps; each row's tokens and
    masks are those it gets alone."""
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    first = run(tiny_model, ids, mask, Echo(stop), top_k=1, engine=("static" if static else "eager"))
    own = first.response_mask[2].nonzero()[:, 0]
    enc = Encoding(eot_token=first.responses[2, own[own >= 20][0]].item())  # row 2 (at least) ends by EOS
    batched = run(tiny_model, ids, mask, Echo(stop), enc=enc, top_k=1, engine=("static" if static else "eager"))
    lengths = batched.attention_mask[:, batched.prompt_length :].sum(1)
    assert len(set(lengths.tolist())) > 1 and len(set(batched.turns["turns"].tolist())) > 1
    for i in range(len(ids)):
        keep = mask[i].bool()
        alone = run(
            tiny_model,
            ids[i : i + 1, keep],
            mask[i : i + 1, keep],
            Echo(stop),
            enc=enc,
            top_k=1,
            engine=("static" if static else "eager"),
        )
        n = alone.responses.size(1)
        assert torch.equal(batched.responses[i, :n], alone.responses[0])
        assert torch.equal(batched.response_mask[i, :n], alone.response_mask[0])
        assert not batched.attention_mask[i, batched.prompt_length + n :].any()
        assert all(int(batched.turns[k][i]) == int(alone.turns[k][0]) for k in batched.turns)


def test_observations_are_fed_and_never_the_policys(tiny_model):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    env = Echo(stop, answer=lambda text: f"<{len(text)}>")
    out = run(tiny_model, ids, mask, env, top_k=1, max_new_tokens=60)
    runs = observation_texts(out)
    assert sum(map(len, runs)) == env.calls == int(out.turns["tool_calls"].sum()) >= 2
    for row, texts in enumerate(runs):
        assert len(texts) == int(out.turns["tool_calls"][row])
        assert all(t.startswith("<") and t.endswith(">") for t in texts)
    fed = out.attention_mask[:, out.prompt_length :].bool() & ~out.response_mask.bool()
    assert (out.logprobs[fed] == 0).all()


@pytest.mark.parametrize("static", [True, False])
def test_a_training_forward_recovers_the_rollout_logprobs(tiny_model, static):
    """The policy's tokens after an observation are scored with the observation in context: if
    the observation had not reached the KV cache (or were re-tokenised), they would differ."""
    ids, mask = prompts(batch=8)
    g = torch.Generator().manual_seed(5)
    stop = a_stop(generate(tiny_model, ids, 60, attention_mask=mask, generator=g))
    out = run(
        tiny_model,
        ids,
        mask,
        Echo(stop),
        60,
        generator=g.manual_seed(5),
        engine=("static" if static else "eager"),
        temperature=0.9,
    )
    with torch.no_grad():
        logprobs, _, _ = response_logprobs(tiny_model, out.sequences, out.attention_mask, out.prompt_length, 0.9)
    own = out.response_mask.bool()
    fed = out.attention_mask[:, out.prompt_length :].bool() & ~own
    after = own & (fed.long().cumsum(1) > 0)  # the policy's tokens that follow an observation
    assert fed.sum() >= 3 and after.sum() >= 10
    assert torch.allclose(logprobs[own], out.logprobs[own], atol=1e-5)
    assert (logprobs[fed] < -1e-3).all()  # an observation token, had it leaked into the loss, would count


@pytest.mark.parametrize("kind", ["gpt_neo", "opt"])
def test_hugging_face_policies_with_lora_take_turns(tiny_hf, perturb_adapters, kind):
    policy = load_policy(str(tiny_hf(kind))).eval()
    with_lora(policy, LoRASpec(r=4, alpha=8, dropout=0.0))
    perturb_adapters(policy)
    ids, mask = prompts()
    g = torch.Generator().manual_seed(1)
    stop = a_stop(generate(policy, ids, 30, attention_mask=mask, generator=g))
    out = run(policy, ids, mask, Echo(stop), max_new_tokens=30, generator=g.manual_seed(1))
    assert int(out.turns["tool_calls"].sum()) >= 1
    logprobs, _, _ = response_logprobs(policy, out.sequences, out.attention_mask, out.prompt_length)
    own = out.response_mask.bool()
    assert torch.allclose(logprobs[own], out.logprobs[own], atol=1e-5)
    for i in range(len(ids)):  # row by row, greedy
        keep = mask[i].bool()
        alone = run(policy, ids[i : i + 1, keep], mask[i : i + 1, keep], Echo(stop), max_new_tokens=30, top_k=1)
        batched = run(policy, ids, mask, Echo(stop), max_new_tokens=30, top_k=1)
        n = alone.responses.size(1)
        assert torch.equal(batched.responses[i, :n], alone.responses[0])


def test_max_turns_ends_a_row_that_keeps_calling(tiny_model):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    unlimited = run(tiny_model, ids, mask, Echo(stop), top_k=1, max_turns=100)
    assert int(unlimited.turns["turns"].max()) > 2
    out = run(tiny_model, ids, mask, Echo(stop), top_k=1, max_turns=2)
    assert int(out.turns["turns"].max()) == 2
    hit = out.turns["max_turns"]
    assert torch.equal(hit, unlimited.turns["turns"] > 2)
    for row in hit.nonzero()[:, 0].tolist():  # the row's second call is its last token
        own = out.response_mask[row].nonzero()[:, 0]
        last = out.responses[row, own[-1]].item()
        assert chr(last) == stop and not out.attention_mask[row, out.prompt_length + own[-1] + 1 :].any()


def test_sample_and_decode_returns_the_whole_transcript(tiny_model):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    out, texts = sample_and_decode(
        tiny_model, ids, mask, byte_encoding(), 40, top_k=1, environment=Echo(stop), prompts=["p"] * 4
    )
    assert sum(text.count(OBSERVATION) for text in texts) == int(out.turns["tool_calls"].sum()) >= 2


class Raises(Echo):
    def step(self, prompt, text, metadata):
        raise KeyError("boom")


class Number(Echo):
    def step(self, prompt, text, metadata):
        return 7


class NeverDone(Echo):
    def step(self, prompt, text, metadata):
        return "more"


@pytest.mark.parametrize(
    "env,match",
    [
        (Raises, r"Environment 'raises' raised KeyError\('boom'\) at turn 1 of row \d\."),
        (Number, r"Environment 'number' returned a int at turn 1 of row \d; step must return"),
    ],
)
def test_a_broken_environment_is_named_with_its_turn(tiny_model, env, match):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    with pytest.raises(EnvironmentStepError, match=match):
        run(tiny_model, ids, mask, env(stop), top_k=1)


def test_an_environment_that_never_says_done_is_named(tiny_model):
    ids, mask = prompts()
    free = generate(tiny_model, ids, 40, attention_mask=mask, top_k=1)
    enc = Encoding(eot_token=free.responses[0, 3].item())
    with pytest.raises(EnvironmentStepError, match=r"Environment 'never_done' never says done: .* at turn 1 of row"):
        run(tiny_model, ids, mask, NeverDone("\x00"), enc=enc, top_k=1)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="max_turns must be at least 1"):
        Turns(Calculator(), byte_encoding(), ["p"], [{}], 0, 10)
    with pytest.raises(ConfigError, match="Environment 'echo' has no stop string"):
        Turns(Echo(""), byte_encoding(), ["p"], [{}], 2, 10)


def test_an_observation_longer_than_the_context_is_cut_with_a_warning(tiny_model):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    with pytest.warns(UserWarning, match="Environment 'echo' answered with more tokens than the response has room for"):
        out = run(tiny_model, ids, mask, Echo(stop, answer=lambda text: "x" * 500), top_k=1)
    assert out.responses.size(1) == 40
    assert out.attention_mask[:, out.prompt_length :].all()  # every row called, then was fed to the end


# -- Turns on the host, token by token: what a stop, a last column and an EOS in an answer do --
def feed(turns: Turns, rows: list[list[int]], own: list[list[bool]] | None = None) -> list[list[int]]:
    """Record ``rows`` (B, N) column by column as if sampled (``own``: False feeds the token as an
    observation); returns the rows ended at each column."""
    ended = []
    for column in range(len(rows[0])):
        tokens = torch.tensor([row[column] for row in rows])
        fed = torch.tensor([not o[column] for o in own]) if own else torch.zeros(len(rows), dtype=torch.bool)
        ended.append(turns.record(column, tokens, torch.ones(len(rows), dtype=torch.bool), fed))
    return ended


def test_a_call_in_the_last_column_is_not_answered():
    """There is no room left to feed an answer, so the tool must not run: no side effect, no
    count, no warning about a cut observation (issue 33)."""
    env = Echo("a", answer="<r>")
    turns = Turns(env, byte_encoding(), ["p"], [{}], 4, capacity=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feed(turns, [list(b"xxxxa")])
    assert env.calls == 0 and turns.queue == [[]] and turns.cut == 0
    assert turns.stats()["tool_calls"].tolist() == [0] and turns.stats()["turns"].tolist() == [1]
    earlier = Turns(env, byte_encoding(), ["p"], [{}], 4, capacity=6)  # one column to spare: answered
    feed(earlier, [list(b"xxxxa")])
    assert env.calls == 1 and earlier.queue == [list(b"<")]  # the answer, cut to the room left


@pytest.mark.parametrize("stop", ["→", "<é", "😀"])
def test_a_stop_string_ending_in_a_non_ascii_character_is_found(stop):
    """A byte-level token of a multi-byte character decodes alone to U+FFFD, never to the
    character: the stop must still be seen when its last byte arrives."""
    env = Echo(stop, answer="ok")
    turns = Turns(env, byte_encoding(), ["p"], [{}], 4, capacity=40)
    ended = feed(turns, [list(f"x {stop}".encode())])
    assert env.calls == 1 and turns.queue == [list(b"ok")] and not any(ended)
    assert turns.stats()["turns"].tolist() == [2]


def test_only_the_policys_eos_ends_the_text_the_rewards_read(tiny_hf):
    """With a Hugging Face tokenizer the text ``<|endoftext|>`` in a tool's answer becomes the EOS
    id; the transcript goes on past it to the policy's own EOS, and the environment reads it too."""
    from shraygpt_rl.tokenizer import HFTokenizer, decode_response

    enc = HFTokenizer(str(tiny_hf("opt")))
    answer = "[<|endoftext|>]"
    assert enc.eot_token in enc.encode_ordinary(answer)  # what makes this case

    class Reader(Environment):  # answers the first call; at the EOS, reads the transcript and says done
        stop = "a"

        def __init__(self):
            super().__init__()
            self.read = []

        def step(self, prompt, text, metadata):
            self.read.append(text)
            return answer if len(self.read) == 1 else None

    policy, observation, after = enc.encode_ordinary("xa"), enc.encode_ordinary(answer), enc.encode_ordinary("b")
    ids = policy + observation + after + [enc.eot_token]
    own = [True] * len(policy) + [False] * len(observation) + [True] * (len(after) + 1)
    assert decode_response(enc, ids, own) == "xa[<|endoftext|>]b"
    assert decode_response(enc, ids) == "xa["  # all tokens the policy's: the first EOS ends it
    env = Reader()
    feed(Turns(env, enc, ["p"], [{}], 4, capacity=len(ids) + 4), [ids], [own])
    assert env.read == ["xa", "xa[<|endoftext|>]b"]  # at the policy's EOS: the whole transcript


def test_rows_the_environment_ends_are_not_truncated(random_policy):
    """Ended by the environment (None to a call) or at max_turns: an ending, with its reward, not
    a cut; GRPO's mask_truncated_completions keeps them and PPO's missing_eos_penalty spares them."""
    from shraygpt_rl.data import PromptDataModule
    from shraygpt_rl.stages.grpo import GRPOStage

    policy = ShrayGPT.load_from_checkpoint(random_policy)
    torch.manual_seed(0)
    stop = frequent_byte(generate(policy.eval(), torch.randint(97, 123, (16, 12)), 24).responses)
    ends = Echo(stop, answer=lambda text: None)  # None to a call: the environment ends the row
    for env, max_turns, ended in ((ends, 4, "ended_by_environment"), (Echo(stop), 1, "max_turns")):
        stage = GRPOStage(policy=random_policy, environment=env, max_turns=max_turns, max_new_tokens=48,
                          num_generations=4, mask_truncated_completions=True, export_path=None)  # fmt: skip
        data = PromptDataModule(**{**ARITH_PROMPTS, "batch_size": 8})
        data.setup()
        stage._trainer = type("T", (), {"datamodule": data, "training": False})()
        torch.manual_seed(0)
        rollout = stage.rollout(next(iter(data.train_dataloader())), repeats=4)
        by_env = rollout.turns[ended]
        assert by_env.any(), ended
        assert not rollout.truncated[by_env].any()
        cut = ~by_env & ~(rollout.sequences[:, rollout.prompt_length :] == 256).any(1)
        assert torch.equal(rollout.truncated, cut)


class Reader(Echo):
    """Echo that also keeps every text it is asked about."""

    def __init__(self, stop: str = "a", answer="<r>"):
        super().__init__(stop, answer)
        self.read = []

    def step(self, prompt, text, metadata):
        self.read.append(text)
        return super().step(prompt, text, metadata)


def test_a_stop_token_other_than_eos_ends_the_policys_turn():
    """An instruct model ends its turn with an end-of-turn token, not EOS: the environment is asked
    once more at it and reads the transcript without it; the same token in an observation is text."""
    enc = Encoding(stop_tokens=(256, ord("#")))
    env = Reader("a", answer="[#]")
    policy, observation = list(b"xa"), list(b"[#]")
    ids = policy + observation + list(b"b#")
    own = [True] * len(policy) + [False] * len(observation) + [True, True]
    assert feed(Turns(env, enc, ["p"], [{}], 4, capacity=len(ids) + 4), [ids], [own]) == [[]] * len(ids)
    assert env.read == ["xa", "xa[#]b"] and env.calls == 1  # at the policy's "#": the transcript without it


@pytest.mark.parametrize("static", [True, False])
def test_rows_end_at_any_stop_token_and_the_environment_is_asked_there(tiny_model, static):
    ids, mask = prompts()
    stop = a_stop(generate(tiny_model, ids, 40, attention_mask=mask, top_k=1))
    first = run(tiny_model, ids, mask, Echo(stop), top_k=1, engine=("static" if static else "eager"))
    own = first.response_mask[2].nonzero()[:, 0]
    end = first.responses[2, own[own >= 20][0]].item()  # row 2 (at least) ends there, after a tool call
    enc = Encoding(stop_tokens=(256, end))
    env = Reader(stop)
    out = run(tiny_model, ids, mask, env, enc=enc, top_k=1, engine=("static" if static else "eager"))
    last = [int(out.response_mask[row].nonzero()[-1, 0]) for row in range(len(ids))]  # each row's last own token
    ended = [row for row in range(len(ids)) if out.responses[row, last[row]].item() in enc.stop_tokens]
    assert out.responses[2, last[2]].item() == end and int(out.turns["tool_calls"][2]) >= 1
    for row in ended:  # nothing after the stop token
        assert not out.attention_mask[row, out.prompt_length + last[row] + 1 :].any()
    assert len(env.read) == env.calls + len(ended)  # each tool call, and once more at each row's stop token


def test_rows_that_end_at_any_stop_token_are_not_truncated(random_policy):
    """A rollout counts a row as cut at max_new_tokens only when none of the tokenizer's stop
    tokens ended it (PPO's missing_eos_penalty, GRPO's mask_truncated_completions)."""
    from types import SimpleNamespace

    from shraygpt_rl.data import PromptDataModule
    from shraygpt_rl.stages.grpo import GRPOStage

    stage = GRPOStage(policy=random_policy, max_new_tokens=24, num_generations=4, export_path=None)
    data = PromptDataModule(**{**ARITH_PROMPTS, "batch_size": 8})
    data.setup()
    batch = next(iter(data.train_dataloader()))
    stage._trainer = type("T", (), {"datamodule": data, "training": False})()
    torch.manual_seed(0)
    plain = stage.rollout(batch, repeats=2)
    end = ord(frequent_byte(plain.sequences[:, plain.prompt_length :]))
    enc = Encoding(stop_tokens=(256, end))
    stage._trainer = type("T", (), {"datamodule": SimpleNamespace(tokenizer=enc), "training": False})()
    torch.manual_seed(0)
    rollout = stage.rollout(batch, repeats=2)
    responses, own = rollout.sequences[:, rollout.prompt_length :], rollout.response_mask.bool()
    at_end = ((responses == end) & own).any(1)
    assert at_end.sum() >= 2 and not rollout.truncated[at_end].any()
    assert torch.equal(rollout.truncated, ~(torch.isin(responses, torch.tensor([256, end])) & own).any(1))
    assert all(chr(end) not in text for text in rollout.responses)  # each text stops before its stop token


@pytest.mark.parametrize("stop", ["a", "</c>", "→", "<é"])
def test_a_call_is_answered_exactly_where_the_turn_first_holds_the_stop_string(stop):
    """Fuzz: 500 random byte streams per stop (its pieces, other multi-byte characters, lone
    continuation and lead bytes) recorded as an engine would, feeding each answer before the
    next sampled byte. A naive reader, who decodes the whole turn after every byte, sees the
    stop string at the very bytes where the environment is asked, with the text up to it."""
    rng = random.Random(0)
    pieces = [*stop.encode(), *"é→😀ab<>/c".encode(), 0x80, 0xBF, 0xC3, 0xE2, 0xF0, *b"  x"]
    for _ in range(500):
        stream = [rng.choice(pieces) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.5:
            stream[rng.randint(0, len(stream)) : 0] = list(stop.encode())  # a call for sure
        asked: list[str] = []
        env = Echo(stop, answer=lambda text, asked=asked: asked.append(text) or "<r>")
        turns = Turns(env, byte_encoding(), ["p"], [{}], max_turns=1000, capacity=10_000)
        expected, own, turn = [], [], b""
        column, left = 0, list(stream)
        while left or turns.queue[0]:
            fed = bool(turns.queue[0])
            token = turns.queue[0][0] if fed else left.pop(0)
            turns.record(column, torch.tensor([token]), torch.tensor([True]), torch.tensor([fed]))
            column += 1
            own.append((token, not fed))
            if not fed:
                turn += bytes([token])
                if stop in turn.decode(errors="replace"):  # the naive reader: a call here
                    text = bytes(t for t, mine in own).decode(errors="replace")
                    expected.append(text[: text.rindex(stop) + len(stop)])
                    turn = b""
        assert asked == expected, (stop, bytes(stream))
