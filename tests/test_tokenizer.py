"""Tokenizers: offline r50k_base, the byte encoding, and the course's chat format."""

from __future__ import annotations

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from conftest import ByteTokenizer

from shraygpt_rl.tokenizer import (
    R50K_ENV,
    TokenizerError,
    byte_encoding,
    decode_response,
    format_chat,
    format_prompt,
    format_response,
    get_tokenizer,
    stop_tokens,
)


@pytest.fixture
def fresh_tiktoken(tmp_path, monkeypatch):
    """An empty tiktoken cache, no loaded encodings, and no network."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(R50K_ENV, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def offline(url):
        raise ConnectionError(f"offline: {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    return tmp_path / "cache"


def test_byte_encoding_round_trips_any_text():
    enc = byte_encoding()
    text = "Answer: 42 ✓ — naïve\n\n"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids) == text
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [256]


def test_r50k_from_an_explicit_file_seeds_the_cache(fresh_tiktoken, r50k_file):
    enc = get_tokenizer("r50k_base", path=r50k_file)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert len(list(fresh_tiktoken.iterdir())) == 1  # tiktoken itself read the seeded cache


def test_r50k_from_the_environment_variable(fresh_tiktoken, r50k_file, monkeypatch):
    monkeypatch.setenv(R50K_ENV, str(r50k_file))
    assert get_tokenizer("r50k_base").decode([15496, 995]) == "Hello world"


def test_r50k_missing_everywhere_says_what_to_do(fresh_tiktoken):
    with pytest.raises(TokenizerError, match=R50K_ENV) as err:
        get_tokenizer("r50k_base")
    assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)


def test_r50k_refuses_a_wrong_file(fresh_tiktoken, tmp_path):
    fake = tmp_path / "r50k_base.tiktoken"
    fake.write_text("not the vocabulary")
    with pytest.raises(TokenizerError, match="sha256 does not match"):
        get_tokenizer("r50k_base", path=fake)
    with pytest.raises(TokenizerError, match="No r50k_base vocabulary file"):
        get_tokenizer("r50k_base", path=tmp_path / "missing.tiktoken")


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="Unknown tokenizer"):
        get_tokenizer("gpt5")


def test_chat_format_matches_the_course():
    assert format_prompt("What is 2 + 3?") == (
        "System: You are ShrayGPT, a helpful and concise AI assistant.\n\nUser: What is 2 + 3?\n\nAssistant:"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "Bye"},
    ]
    assert format_chat(messages, add_generation_prompt=True) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"
    )
    assert format_chat([{"role": "user", "content": "x"}], system_prompt=None) == "User: x"
    assert format_prompt("Q") + format_response(" A ") == format_chat(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    )


def test_chat_format_refuses_unknown_roles():
    with pytest.raises(ValueError, match="Unknown chat role"):
        format_chat([{"role": "robot", "content": "beep"}])


def test_a_response_ends_at_the_first_of_the_stop_tokens():
    enc = ByteTokenizer(ord("|"), (ord("|"), 256), n_vocab=257)
    assert decode_response(enc, [*b"ab", 256, *b"c|d"]) == "ab"
    assert decode_response(enc, [*b"ab|c", 256, *b"d"]) == "ab"
    assert decode_response(enc, [*b"ab", 300, *b"c"]) == "abc"  # beyond the tokenizer: skipped
    # An observation's token is text, even one that is a stop id: only the policy's own stop ends it.
    ids, own = [*b"a|b", 256, *b"c|d"], [True, False, True, False, True, True, True]
    assert decode_response(enc, ids, own) == "a|b<|endoftext|>c"


def test_stop_tokens_are_the_tokenizers_or_its_eot_token():
    assert stop_tokens(byte_encoding()) == (256,)  # tiktoken: EOS alone
    assert stop_tokens(ByteTokenizer(ord("|"), [ord("|"), 256])) == (ord("|"), 256)
