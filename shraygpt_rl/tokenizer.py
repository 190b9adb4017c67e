"""Tokenizers and the course's chat format.

* ``r50k_base`` (GPT-2 BPE, 50257 tokens) through tiktoken, as the course uses it. Offline, an
  explicit file path or ``$SHRAYGPT_R50K_FILE`` seeds tiktoken's cache, so that tiktoken itself
  loads the vocabulary (and checks its hash) exactly as it would after a download.
* ``byte``: a built-in byte-level tiktoken encoding (256 bytes plus ``<|endoftext|>`` = 256), no
  download, for the tiny models that the tests and the embedded demo train on CPU.

Both are plain ``tiktoken.Encoding`` objects; ``HFTokenizer`` gives a Hugging Face tokenizer the
same calls. ``encode_ordinary``, ``decode``, ``eot_token`` and ``n_vocab`` are what the project
uses, and ``stop_tokens`` where a DataModule's chat format adds an end-of-turn token
(``data/chat.py``'s ``ChatTokenizer``); ``encode_special`` reads a chat template's special tokens.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import tiktoken

from shraygpt_rl.errors import TokenizerError

TokenizerName = Literal["r50k_base", "byte", "hf"]

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_ENV = "SHRAYGPT_R50K_FILE"
# GPT-2's pre-tokenisation pattern, shared by the byte encoding so text splits the same way.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

DEFAULT_SYSTEM_PROMPT = "You are ShrayGPT, a helpful and concise AI assistant."
_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def get_tokenizer(name: TokenizerName = "r50k_base", path: str | os.PathLike | None = None):
    """Return the named encoding; ``path`` is a local ``r50k_base.tiktoken`` for offline machines,
    or for ``hf`` the hub name or folder of a Hugging Face tokenizer."""
    if name == "byte":
        return byte_encoding()
    if name == "r50k_base":
        return r50k_base(path)
    if name == "hf":
        if not path:
            raise TokenizerError("--data.tokenizer hf needs --data.tokenizer_path: a hub name or a tokenizer folder.")
        return HFTokenizer(str(path))
    raise ValueError(f"Unknown tokenizer '{name}'; choose 'r50k_base', 'byte' or 'hf'.")


class HFTokenizer:
    """A Hugging Face tokenizer with the tiktoken calls the project makes (``encode_ordinary``,
    ``encode_ordinary_batch``, ``decode``, ``eot_token``, ``n_vocab``, ``name``).

    Text is encoded without special tokens, as tiktoken's ``encode_ordinary`` does; the model's
    EOS token ends responses and pads batches. ``generation_stops`` are the EOS ids of the
    model's generation config beside it (an instruct model's end of turn, ``<|eot_id|>``), when
    it has one.
    """

    def __init__(self, source: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise TokenizerError(
                f"No Hugging Face tokenizer could be loaded from '{source}' (a folder with tokenizer files, or a hub "
                "name on a machine with network)."
            ) from err
        if self.tokenizer.eos_token_id is None:
            raise TokenizerError(f"The tokenizer of '{source}' has no EOS token, which ends every response.")
        self.name, self.eot_token, self.n_vocab = source, self.tokenizer.eos_token_id, len(self.tokenizer)
        self.generation_stops = _generation_stops(source)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _generation_stops(source: str) -> tuple[int, ...]:
    """The EOS ids of a model's ``generation_config.json`` (one id or several), or none. From a
    folder, or the hub's cache (the model's download put it there): never the network."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(source, local_files_only=True).eos_token_id
    except Exception:  # no generation config beside the tokenizer, or none offline
        return ()
    return tuple(ids) if isinstance(ids, list | tuple) else () if ids is None else (int(ids),)


@functools.cache
def byte_encoding() -> tiktoken.Encoding:
    """The 257-token byte-level encoding: every byte is a token, ``<|endoftext|>`` is 256."""
    return tiktoken.Encoding(
        name="shraygpt_byte",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads cached vocabularies from (same rules as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def r50k_base(path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """tiktoken's ``r50k_base``, seeding its cache from ``path`` or ``$SHRAYGPT_R50K_FILE`` if given."""
    path = path or os.environ.get(R50K_ENV)
    cached = tiktoken_cache_dir() / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if path:
        _seed_cache(Path(path), cached)
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as err:  # requests' connection errors, or a read-only cache
        raise TokenizerError(
            "The r50k_base vocabulary is neither cached nor downloadable here: pass the path of a local "
            f"r50k_base.tiktoken (tokenizer_path=... or ${R50K_ENV}); it is the file at {R50K_URL}."
        ) from err


def _seed_cache(source: Path, cached: Path) -> None:
    if not source.is_file():
        raise TokenizerError(f"No r50k_base vocabulary file at '{source}'.")
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != R50K_SHA256:
        raise TokenizerError(f"'{source}' is not the r50k_base vocabulary: its sha256 does not match tiktoken's.")
    if cached.is_file() and cached.read_bytes() == data:
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, cached)  # atomic, so concurrent ranks never read half a file


# --------------------------------------------------------------------------------------------
# Chat format
# --------------------------------------------------------------------------------------------
def format_chat(
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Render messages in the course's format: ``Role: content`` blocks joined by blank lines.

    Args:
        messages: Dicts with ``role`` (system, user or assistant) and ``content``.
        add_generation_prompt: End with an open ``Assistant:`` turn for the model to complete.
        system_prompt: Prepended as a ``System:`` block unless the messages start with one;
            None for no system block.

    Returns:
        For example ``"System: You are ShrayGPT, …\\n\\nUser: Hi\\n\\nAssistant:"``. A response
        continues such a prompt as ``" " + text`` followed by ``<|endoftext|>``.
    """
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    blocks = []
    for message in messages:
        role = _ROLES.get(message["role"])
        if role is None:
            raise ValueError(f"Unknown chat role '{message['role']}'; use system, user or assistant.")
        blocks.append(f"{role}: {message['content'].strip()}")
    text = "\n\n".join(blocks)
    return text + "\n\nAssistant:" if add_generation_prompt else text


def format_prompt(user: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """A one-turn prompt ending in an open ``Assistant:`` turn."""
    return format_chat([{"role": "user", "content": user}], add_generation_prompt=True, system_prompt=system_prompt)


def format_response(text: str) -> str:
    """The text that follows a generation prompt for an assistant reply (without the EOS token).

    An empty reply (HH-RLHF has some: declining to answer) renders as nothing, so that only the EOS
    token follows the prompt.
    """
    return " " + text.strip() if text.strip() else ""


def stop_tokens(enc) -> tuple[int, ...]:
    """The ids that end a sampled response: the tokenizer's ``stop_tokens`` where it has them (an
    instruct model's end-of-turn token, ``<|im_end|>`` or ``<|eot_id|>``, besides its EOS), else
    its ``eot_token`` alone (tiktoken's encodings)."""
    return tuple(enc.stop_tokens) if hasattr(enc, "stop_tokens") else (enc.eot_token,)


def encode_special(enc, text: str) -> list[int]:
    """Tokens of text a chat template rendered, its special tokens (a BOS, an end of turn) read as
    such, as ``apply_chat_template`` tokenises: none is added."""
    hf = getattr(enc, "tokenizer", None)
    if hf is not None:
        return hf(text, add_special_tokens=False)["input_ids"]
    return getattr(enc, "encoding", enc).encode(text, allowed_special="all")


def through(ids: list[int], token: int) -> list[int]:
    """``ids`` up to and including the first ``token`` (what follows a reply's end-of-turn token,
    such as a newline before the next turn, is not the reply's); all of ``ids`` without one."""
    return ids[: ids.index(token) + 1] if token in ids else ids


def decode_response(enc, ids, own=None) -> str:
    """Text of a sampled response: up to the policy's first stop token (``stop_tokens``: EOS, or
    an instruct model's end-of-turn token), skipping ids the tokenizer lacks (a model's vocabulary
    may be padded beyond the tokenizer's, as the byte models' is).

    ``own`` (one flag per id, None: all) marks the policy's tokens in a multi-turn transcript: an
    observation's tokens are text even where one is a stop id (a Hugging Face tokenizer reads the
    text ``<|endoftext|>`` in a tool's answer as that token), so only the policy's stop token ends it.
    """
    ids = [int(i) for i in ids]
    own = [True] * len(ids) if own is None else [bool(o) for o in own]
    stops = set(stop_tokens(enc))
    end = next((i for i, (t, o) in enumerate(zip(ids, own)) if o and t in stops), len(ids))
    return enc.decode([i for i in ids[:end] if i < enc.n_vocab])
