"""Chat templates (``data/chat.py``): the course's format, token for token as before; Hugging Face
templates as ``apply_chat_template`` gives them (ChatML without a BOS, an [INST] one with a BOS);
the assistant-only loss mask; templates that cannot be split; the options."""

from __future__ import annotations

import random

import pytest

from shraygpt_rl.data.chat import COURSE_TEMPLATE, NONE_TEMPLATE, ChatFormat, read_template
from shraygpt_rl.errors import ConfigError, DataError
from shraygpt_rl.tokenizer import DEFAULT_SYSTEM_PROMPT, HFTokenizer, byte_encoding, format_chat, format_response

ROLES = ("user", "assistant")
PIECES = ["Hi", " ", "What is 2 + 3?", "\n", "  padded  ", "", "Answer: 5", "é", "<|endoftext|>x", "A\n\nB", "::"]


def random_conversation(rng: random.Random, turns: int) -> list[dict[str, str]]:
    """Alternating user and assistant messages (user first, last), random contents."""
    return [
        {"role": ROLES[i % 2], "content": "".join(rng.choice(PIECES) for _ in range(rng.randrange(4))) or "x"}
        for i in range(2 * turns - 1)
    ]


@pytest.fixture(scope="module")
def templated(tiny_hf):
    """Chat formats of tiny instruct tokenizers: ChatML (no BOS) and [INST] (a BOS first)."""
    made = {}
    for name in ("chatml", "inst"):
        tok = HFTokenizer(str(tiny_hf("llama", template=name)))
        made[name] = (tok, ChatFormat(tok, *read_template(None, tok)))
    return made


@pytest.mark.parametrize("system_prompt", [DEFAULT_SYSTEM_PROMPT, None])
def test_the_course_template_is_the_course_format_token_for_token(system_prompt):
    """200 random conversations: the prompt renders as ``format_chat`` did, and prompt and
    completion tokens are what the course's tokenizer gave (``encode_ordinary`` of the prompt, of
    ``format_response`` of the reply, then EOS), so the course's numbers do not move."""
    enc, rng = byte_encoding(), random.Random(0)
    chat = ChatFormat(enc, COURSE_TEMPLATE, "the course's format", system_prompt)
    for _ in range(200):
        prompt = random_conversation(rng, rng.randrange(1, 4))
        reply = rng.choice(PIECES) + rng.choice(PIECES)
        text = format_chat(prompt, add_generation_prompt=True, system_prompt=system_prompt)
        assert chat.render(prompt, add_generation_prompt=True) == text
        assert chat.prompt_ids(prompt) == enc.encode_ordinary(text)
        expected = enc.encode_ordinary(format_response(reply)) + [enc.eot_token]
        assert chat.completion_ids(prompt, reply) == expected == chat.reply_ids(reply)
        whole = enc.encode(chat.render([*prompt, {"role": "assistant", "content": reply}]), allowed_special="all")
        if "<|endoftext|>" not in str(prompt) + reply:  # the EOS's text in a message stays text in the prompt
            assert whole == chat.prompt_ids(prompt) + expected  # the template itself splits there
    assert chat.eot_token == enc.eot_token and chat.stop_tokens == (enc.eot_token,)


def test_the_course_template_on_r50k(r50k_file):
    from shraygpt_rl.tokenizer import get_tokenizer

    enc, rng = get_tokenizer("r50k_base", r50k_file), random.Random(1)
    chat = ChatFormat(enc, COURSE_TEMPLATE, "the course's format", DEFAULT_SYSTEM_PROMPT)
    for _ in range(100):
        prompt, reply = random_conversation(rng, 2), rng.choice(PIECES[:-3]) + " and more, 'quoted'."
        assert chat.prompt_ids(prompt) == enc.encode_ordinary(format_chat(prompt, add_generation_prompt=True))
        whole = enc.encode(chat.render([*prompt, {"role": "assistant", "content": reply}]), allowed_special="all")
        if "<|endoftext|>" not in str(prompt):
            assert whole == chat.prompt_ids(prompt) + chat.completion_ids(prompt, reply)


@pytest.mark.parametrize("name", ["chatml", "inst"])
def test_a_hugging_face_template_gives_apply_chat_templates_tokens(templated, name):
    tok, chat = templated[name]
    hf, rng = tok.tokenizer, random.Random(2)
    for _ in range(50):
        prompt = random_conversation(rng, rng.randrange(1, 3))
        reply = rng.choice(PIECES[:-2]) + "ok"
        expected = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert chat.prompt_ids(prompt) == expected
        whole = hf.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], return_dict=False)
        completion = chat.completion_ids(prompt, reply)
        assert whole[: len(expected) + len(completion)] == expected + completion  # exactly what it adds after
        assert completion[-1] == chat.eot_token and chat.eot_token not in completion[:-1]
        assert chat.reply_ids(reply) == completion  # a reward model scoring text tokenises the reply the same
    bos = hf.convert_tokens_to_ids("<s>")
    ids = chat.prompt_ids([{"role": "user", "content": "Hi"}])
    assert ids.count(bos) == (name == "inst")  # one BOS where the template has it, never two


def test_end_of_turn_and_stop_tokens(templated):
    tok, chatml = templated["chatml"]
    assert tok.decode([chatml.eot_token]) == "<|im_end|>" and chatml.stop_tokens == (chatml.eot_token, tok.eot_token)
    tok, inst = templated["inst"]
    assert inst.eot_token == tok.eot_token and inst.stop_tokens == (tok.eot_token,)  # its replies end with EOS


@pytest.mark.parametrize("name", ["chatml", "inst", "course"])
def test_only_the_assistant_turns_are_trained(templated, name):
    """The loss mask of a multi-turn conversation covers the assistant replies and their
    end-of-turn tokens, nothing else: checked against a naive loop that renders each prefix."""
    if name == "course":
        enc = byte_encoding()
        chat = ChatFormat(enc, COURSE_TEMPLATE, "the course's format", None)
    else:
        enc, chat = templated[name]
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple"},
    ]
    ids, mask = chat.conversation_ids(messages)
    trained = enc.decode([t for t, m in zip(ids, mask) if m])
    assert (
        trained
        == {
            "chatml": "Hello<|im_end|>An apple<|im_end|>",
            "inst": " Hello<|endoftext|> An apple<|endoftext|>",
            "course": " Hello An apple<|endoftext|>",  # in the course's format only a last turn ends with EOS
        }[name]
    )
    last = chat.prompt_ids(messages[:3]) + chat.completion_ids(messages[:3], "An apple")
    assert ids[: len(last)] == last and all(mask[len(chat.prompt_ids(messages[:3])) : len(last)])


def test_a_template_that_is_not_prefix_preserving_is_refused_in_one_sentence(templated):
    """A template that drops earlier assistant turns (as some drop earlier reasoning) renders a
    conversation that does not start with its prompt's rendering."""
    tok, _ = templated["chatml"]
    forgetful = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    chat = ChatFormat(tok, *read_template(forgetful, tok))
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    with pytest.raises(DataError) as refused:
        chat.conversation_ids([*conversation, {"role": "assistant", "content": "d"}])
    message = str(refused.value)
    assert message.startswith("the given chat template is not prefix-preserving") and message.count(". ") == 0
    unsplittable = "{{ 'x' if add_generation_prompt else 'y' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="is not prefix-preserving"):
        ChatFormat(tok, *read_template(unsplittable, tok)).completion_ids(conversation[:1], "b")


def test_template_options(tmp_path, templated):
    tok, _ = templated["chatml"]
    path = tmp_path / "template.jinja"
    path.write_text(NONE_TEMPLATE)
    assert read_template(str(path), tok) == (NONE_TEMPLATE, f"the chat template in '{path}'")
    assert read_template("course", tok)[0] == COURSE_TEMPLATE and read_template("none", tok)[0] == NONE_TEMPLATE
    with pytest.raises(ConfigError, match="is neither a template nor a file, course or none"):
        read_template(str(tmp_path / "missing.jinja"), tok)
    plain = ChatFormat(tok, NONE_TEMPLATE, "none")
    prompt = [{"role": "user", "content": "Once upon a time"}]
    assert plain.render(prompt, True) == "Once upon a time"
    assert tok.decode(plain.completion_ids(prompt, "there was")) == " there was<|endoftext|>"


def test_a_base_model_without_a_template_falls_back_to_the_course_and_says_so_once(tiny_hf, caplog):
    tok = HFTokenizer(str(tiny_hf("opt")))
    with caplog.at_level("WARNING"):
        assert read_template(None, tok)[0] == COURSE_TEMPLATE
        read_template(None, tok)
    assert [r.message for r in caplog.records].count(
        f"'{tok.name}' has no chat template: conversations use the course's User:/Assistant: format (set "
        "--data.chat_template to change it)"
    ) <= 1


def test_standard_text_is_used_as_it_is(templated):
    tok, chat = templated["chatml"]
    assert chat.prompt_ids("Once upon a time") == tok.encode_ordinary("Once upon a time")
    assert chat.completion_ids("Once upon a time", " there ") == tok.encode_ordinary(" there") + [tok.eot_token]


def test_generation_stops_at_the_end_of_turn_and_logprobs_stay_exact(tiny_hf):
    """A ChatML model samples through its DataModule's tokenizer: a row that samples <|im_end|>
    ends there (its mask covers it, nothing after), the text the rewards read stops before it,
    and the rollout's log-probabilities equal the training forward's."""
    import torch

    from shraygpt_rl.data import PromptDataModule
    from shraygpt_rl.generation import response_logprobs, sample_and_decode
    from shraygpt_rl.policy import load_policy

    folder = str(tiny_hf("llama", template="chatml"))
    data = PromptDataModule(source="arithmetic", tokenizer="hf", tokenizer_path=folder, batch_size=64, val_size=8)
    batch = next(iter(data.train_dataloader()))
    policy = load_policy(folder).eval()
    enc = data.tokenizer
    im_end = enc.eot_token
    assert enc.decode([im_end]) == "<|im_end|>" and set(enc.stop_tokens) == {im_end, enc.encoding.eot_token}
    generator = torch.Generator().manual_seed(0)
    out, texts = sample_and_decode(
        policy, batch["input_ids"], batch["attention_mask"], enc, 40, generator=generator
    )  # fmt: skip
    mask = out.response_mask.bool()
    ended = [((row == im_end) & own).nonzero()[:1] for row, own in zip(out.responses, mask)]  # pads are im_end too
    stopped = [i for i, e in enumerate(ended) if len(e)]
    assert stopped, "no row sampled <|im_end|>: pick another seed"
    for i in stopped:
        at = int(ended[i][0])
        assert mask[i, at] and not mask[i, at + 1 :].any()  # the stop token is the reply's, then nothing
        assert "<|im_end|>" not in texts[i] and texts[i] == enc.decode(out.responses[i, :at].tolist())
    with torch.no_grad():
        logprobs, _, _ = response_logprobs(policy, out.sequences, out.attention_mask, out.prompt_length)
    assert torch.allclose(logprobs[mask], out.logprobs[mask], atol=1e-5)


def test_generation_markers_mask_what_rendering_prefixes_masks(templated):
    """A template with ``{% generation %}`` markers gives its own assistant mask
    (``return_assistant_tokens_mask``); it is the mask rendering the prefixes gives."""
    from shraygpt_rl.bench.tiny_hf import CHATML

    tok, chatml = templated["chatml"]
    marked = CHATML.replace(
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}",
    )
    assert marked != CHATML
    chat = ChatFormat(tok, *read_template(marked, tok))
    assert chat.has_generation_markers and not chatml.has_generation_markers
    rng = random.Random(3)
    for _ in range(20):
        messages = random_conversation(rng, 3)[:-1] + [{"role": "assistant", "content": "bye"}]
        messages = [m if m["content"].strip() else {**m, "content": "x"} for m in messages]
        assert chat.conversation_ids(messages) == chatml.conversation_ids(messages)


def test_review_mends(tiny_hf, tmp_path):
    """Issue 34's review: a dict of named templates uses its default one; the model's generation
    config's EOS ids stop generation too; the plain format trains every assistant turn; the
    tokenizer wrapper copies."""
    import copy
    import json as jsonlib

    from shraygpt_rl.bench.tiny_hf import CHATML
    from shraygpt_rl.data.chat import ChatTokenizer

    folder = tiny_hf("llama", template="chatml")
    config = jsonlib.loads((folder / "tokenizer_config.json").read_text())
    named = tmp_path / "named"
    named.mkdir()
    for path in folder.iterdir():
        (named / path.name).write_bytes(path.read_bytes())
    (named / "tokenizer_config.json").write_text(
        jsonlib.dumps(
            {**config, "chat_template": [{"name": "default", "template": CHATML}, {"name": "x", "template": "y"}]}
        )
    )
    (named / "chat_template.jinja").unlink(missing_ok=True)
    tok = HFTokenizer(str(named))
    assert read_template(None, tok)[0] == CHATML  # not the course's fallback
    gen = jsonlib.loads((folder / "generation_config.json").read_text())
    (named / "generation_config.json").write_text(jsonlib.dumps({**gen, "eos_token_id": [256, 7]}))
    chat = ChatFormat(HFTokenizer(str(named)), CHATML, "chatml")
    assert 7 in chat.stop_tokens and chat.eot_token == HFTokenizer(str(named)).tokenizer.convert_tokens_to_ids(
        "<|im_end|>"
    )
    plain = ChatFormat(byte_encoding(), NONE_TEMPLATE, "none")
    messages = [
        {"role": r, "content": c}
        for r, c in (("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ok"))
    ]
    ids, mask = plain.conversation_ids(messages)
    assert byte_encoding().decode([t for t, m in zip(ids, mask) if m]) == " Hello<|endoftext|> Ok<|endoftext|>"
    wrapped = ChatTokenizer(byte_encoding(), plain)
    assert copy.copy(wrapped).eot_token == wrapped.eot_token
