"""Chat templates: the one place where a prompt, a completion or a conversation becomes tokens.

A row is **standard** (text) or **conversational** (a list of ``{"role", "content"}`` messages), as
in TRL's dataset formats. Standard text is used as it is: a prompt is tokenised whole, and a
completion follows it as ``" " + completion.strip()`` and the tokenizer's EOS (the course's rule,
which the seed notebooks' formats follow too). Conversational rows go through a chat template:

* a Hugging Face tokenizer's own template by default (``apply_chat_template``): the prompt's tokens
  are exactly ``apply_chat_template(messages, add_generation_prompt=True)``, and a completion's
  tokens exactly what the template adds after that prompt, up to and including its end-of-turn
  token (``<|im_end|>``, ``<|eot_id|>``), which ends generation as EOS does;
* the course's format (``System: …\\n\\nUser: …\\n\\nAssistant:``) for ShrayGPT's tokenizers, and for
  a Hugging Face tokenizer without a template (said once), written as the Jinja template
  ``COURSE_TEMPLATE`` and rendered through the same path: its tokens are the course's, exactly;
* ``none``: the messages' contents as plain text, each after a blank line, with no roles;
* any other Jinja template, as a string or a file (``--data.chat_template``).

A template must be *prefix-preserving*: the rendering of a conversation must start with the
rendering of its prompt, or the completion's tokens cannot be split off (TRL checks the same,
``is_chat_template_prefix_preserving``). A template that is not is refused in one sentence. In a
multi-turn conversation only the assistant's turns are trained: by the template's
``{% generation %}`` markers where it has them, else by rendering each assistant turn's prefixes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from shraygpt_rl.errors import ConfigError, DataError
from shraygpt_rl.tokenizer import DEFAULT_SYSTEM_PROMPT, encode_special, format_response, through

log = logging.getLogger(__name__)

Message = dict[str, Any]

# The course's format (tokenizer.format_chat) as a template: earlier turns render as
# "Role: content", the last assistant turn (a completion) as "Assistant: content<eos>" (" content"
# only when there is content, as format_response does), turns joined by a blank line.
COURSE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if message['role'] == 'system' %}{{ 'System: ' + content }}"
    "{%- elif message['role'] == 'user' %}{{ 'User: ' + content }}"
    "{%- elif message['role'] == 'assistant' and loop.last -%}"
    "{{ 'Assistant:' }}{% if content %}{{ ' ' + content }}{% endif %}{{ eos_token }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' + content }}"
    "{%- else %}{{ raise_exception(\"Unknown chat role '\" + message['role'] + \"'; use system, user or assistant\") }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif -%}"
)
# No roles: each message's content after a blank line, but an assistant's, which follows the text
# before it as a completion follows standard text (" " + content, then EOS).
NONE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% if content %}{{ ' ' + content }}{% endif %}{{ eos_token }}"
    "{%- else -%}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ content }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_SENTINEL = "\x00reply\x00"
# datasets keys its map cache on the mapped function's own code and arguments, not on what they
# call: this module's hash (and the template's text, ``ChatFormat.version``) key it too.
_CODE_VERSION = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:16]


def system_prompt_for(option: str | None, hf: bool) -> str | None:
    """``system_prompt``'s ``default``: the course's for ShrayGPT's tokenizers, none for a Hugging
    Face model (its template may add its own)."""
    if option == "default":
        return None if hf else DEFAULT_SYSTEM_PROMPT
    return option


def read_template(option: str | None, tokenizer) -> tuple[str, str]:
    """The Jinja source and a name for ``--data.chat_template`` (None: the model's own template,
    else the course's; ``course``; ``none``; a ``.jinja``/``.j2``/``.txt`` file; a template)."""
    own = getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None)
    if isinstance(own, dict):  # several named templates (a tool-use one beside it): the default one
        own = own.get("default")
    if option is None and isinstance(own, str) and own.strip():
        return own, f"the chat template of '{tokenizer.name}'"
    if option is None:
        if getattr(tokenizer, "tokenizer", None) is not None:  # a Hugging Face tokenizer without a template
            _say_once(f"'{tokenizer.name}' has no chat template: conversations use the course's User:/Assistant: "
                      "format (set --data.chat_template to change it)")  # fmt: skip
        return COURSE_TEMPLATE, "the course's format"
    if option == "course":
        return COURSE_TEMPLATE, "the course's format"
    if option == "none":
        return NONE_TEMPLATE, "the plain format (none)"
    if "{" not in option:  # a path, not a template
        path = Path(option).expanduser()
        if not path.is_file():
            raise ConfigError(f"--data.chat_template '{option}' is neither a template nor a file, course or none.")
        return path.read_text(encoding="utf-8"), f"the chat template in '{path}'"
    return option, "the given chat template"


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


class ChatFormat:
    """Tokens of prompts, completions and conversations for one tokenizer and template.

    Args:
        tokenizer: The DataModule's tokenizer: a tiktoken ``Encoding`` (ShrayGPT) or a
            ``tokenizer.HFTokenizer``.
        template: The Jinja template (``read_template``).
        name: How sentences name the template.
        system_prompt: Put first in every conversation that has no system message; None: none.

    Attributes:
        eot_token: The token that ends an assistant turn of this template (what the course's
            EOS is to its format); completions end with it, and batches are padded with it.
        stop_tokens: Every token that ends a response: ``eot_token`` and the tokenizer's EOS.
    """

    def __init__(self, tokenizer, template: str, name: str, system_prompt: str | None = None):
        self.tok, self.template, self.name, self.system_prompt = tokenizer, template, name, system_prompt
        self.eos = tokenizer.eot_token
        self.eot_token = self._end_of_turn()
        generation = tuple(getattr(tokenizer, "generation_stops", ()))  # the model's generation config's EOS ids
        self.stop_tokens = tuple(dict.fromkeys((self.eot_token, self.eos, *generation)))
        self.version = hashlib.sha1(f"{_CODE_VERSION}\n{template}".encode()).hexdigest()[:16]

    # -- rendering ---------------------------------------------------------------------------------
    def _messages(self, messages: list[Message]) -> list[Message]:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The template's text of ``messages`` (the system prompt added)."""
        return self._render(self._messages(messages), add_generation_prompt)

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        hf = getattr(self.tok, "tokenizer", None)
        try:
            if hf is not None:
                return hf.apply_chat_template(
                    messages, chat_template=self.template, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            return _jinja(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, eos_token=_eos_text(self.tok),
                bos_token="",
            )  # fmt: skip
        except Exception as err:  # jinja's errors, the template's raise_exception
            raise DataError(f"{self.name} could not render a conversation ({err}).") from err

    def encode(self, text: str) -> list[int]:
        """Tokens of rendered text, its special tokens read as such (``tokenizer.encode_special``)."""
        return encode_special(self.tok, text)

    # -- what the DataModules call ------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[Message], text: str | None = None) -> list[int]:
        """A prompt's tokens: standard text as it is, a conversation with the generation prompt
        (``text``: its ``prompt_text``, when the caller has it, so that it is rendered once)."""
        if isinstance(prompt, str):
            return self.tok.encode_ordinary(prompt)
        text = self.prompt_text(prompt) if text is None else text
        if self.reply_affixes is None:  # the course's and the plain format: text as the course tokenised it
            return self.tok.encode_ordinary(text)
        return self.encode(text)

    def prompt_text(self, prompt: str | list[Message]) -> str:
        """The prompt as reward functions and logs read it: the rendered text."""
        return prompt if isinstance(prompt, str) else self.render(prompt, add_generation_prompt=True)

    def completion_ids(self, prompt: str | list[Message], completion: str, head: list[int] | None = None) -> list[int]:
        """The tokens of ``completion`` (the assistant's reply) after ``prompt``, ending with the
        end-of-turn token: what the template adds after the prompt, cut after that token
        (``head``: the prompt's ``prompt_ids``, when the caller has them)."""
        if isinstance(prompt, str) or self.reply_affixes is None:  # standard text, the course's or the plain format
            return self._standard_reply(completion)
        head = self.prompt_ids(prompt) if head is None else head
        whole = self.encode(self.render([*prompt, {"role": "assistant", "content": completion}]))
        if whole[: len(head)] != head:
            raise DataError(self._not_prefix_preserving())
        return through(whole[len(head) :], self.eot_token)

    def completion_pieces(self, prompt, completion: str, observations: str) -> tuple[list[int], list[int]]:
        """``completion_ids`` with the spans ``observations`` matches tokenised on their own (a
        tool's answers, as a multi-turn rollout feeds them), and a mask (1: such a span's tokens).
        The reply must be the standard one: text, or the course's and the plain format's."""
        if not isinstance(prompt, str) and self.reply_affixes is not None:
            raise ConfigError(
                f"observations (tool answers in demonstrations) need the course's or the plain format, not {self.name}."
            )
        pieces = re.split(f"({observations})", format_response(completion))  # policy, observation, policy, …
        encoded = [self.tok.encode_ordinary(piece) for piece in pieces]
        ids = [t for piece in encoded for t in piece] + [self.eos]
        return ids, [i % 2 for i, piece in enumerate(encoded) for _ in piece] + [0]

    def conversation_ids(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """A whole conversation's tokens and its loss mask: 1 on the assistant turns' tokens.

        Each assistant turn starts where its prompt's rendering (with the generation prompt) ends,
        which must be a prefix of the whole, and runs as far as the whole agrees with the
        rendering that ends with that turn, through its end-of-turn token: in the course's format
        only a last turn ends with EOS, an earlier one runs into the next ``User:``."""
        messages = self._messages(messages)
        if self.has_generation_markers:
            return self._marked_ids(messages)
        ids = self.encode(self._render(messages, False))
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.encode(self._render(messages[:i], True)) if i else []
            if ids[: len(head)] != head:
                raise DataError(self._not_prefix_preserving())
            upto = self.encode(self._render(messages[: i + 1], False))
            agree = next((k for k, (a, b) in enumerate(zip(ids, upto)) if a != b), min(len(ids), len(upto)))
            turn = through(ids[len(head) : agree], self.eot_token)
            mask[len(head) : len(head) + len(turn)] = [1] * len(turn)
        return ids, mask

    @property
    def has_generation_markers(self) -> bool:
        """Whether the template marks the assistant's text with ``{% generation %}`` (read by a
        Hugging Face tokenizer's ``return_assistant_tokens_mask``)."""
        return getattr(self.tok, "tokenizer", None) is not None and "{% generation %}" in self.template.replace(
            "{%- generation %}", "{% generation %}"
        )

    def _marked_ids(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """``conversation_ids`` by the template's own ``{% generation %}`` markers."""
        out = self.tok.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])

    def reply_ids(self, response: str) -> list[int]:
        """A reply's tokens without its prompt (a reward model scoring text): the template's text
        around an assistant message, with ``response`` in it."""
        if self.reply_affixes is None:
            return self._standard_reply(response)
        before, after = self.reply_affixes
        return through(self.encode(before + response + after), self.eot_token)

    def _standard_reply(self, completion: str) -> list[int]:
        """Standard text's reply: ``" " + completion.strip()`` and EOS (the course's rule)."""
        return self.tok.encode_ordinary(format_response(completion)) + [self.eos]

    # -- the template's shape -------------------------------------------------------------------------
    @functools.cached_property
    def reply_affixes(self) -> tuple[str, str] | None:
        """The template's text before and after a reply's content; None for the course's and the
        plain format, whose replies are standard text's."""
        if self.template in (COURSE_TEMPLATE, NONE_TEMPLATE):
            return None
        probe = [{"role": "user", "content": "Hi"}]
        head = self._render(probe, True)
        whole = self._render([*probe, {"role": "assistant", "content": _SENTINEL}], False)
        if not whole.startswith(head) or _SENTINEL not in whole:
            raise DataError(self._not_prefix_preserving())
        before, after = whole[len(head) :].split(_SENTINEL, 1)
        return before, after

    def _end_of_turn(self) -> int:
        """The first special token the template puts after an assistant reply's content (its
        end-of-turn token), else the tokenizer's EOS."""
        if self.template in (COURSE_TEMPLATE, NONE_TEMPLATE):
            return self.eos
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self._render(probe, False)
        after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
        special = _special_ids(self.tok) | set(getattr(self.tok, "generation_stops", ()))
        return next((t for t in self.encode(after) if t in special), self.eos)

    def _not_prefix_preserving(self) -> str:
        return (
            f"{self.name} is not prefix-preserving: a conversation's rendering does not start with its prompt's, so "
            "its completion cannot be split off; pass another with --data.chat_template."
        )


def _eos_text(tok) -> str:
    return tok.decode([tok.eot_token])


def _special_ids(tok) -> set[int]:
    hf = getattr(tok, "tokenizer", None)
    if hf is not None:
        return set(hf.all_special_ids) | {i for i, t in hf.added_tokens_decoder.items() if t.special}
    return {tok.encode_single_token(s) for s in tok.special_tokens_set}


@functools.cache
def _jinja(template: str):
    """A compiled template, in the sandbox and with the settings transformers renders with."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class ChatTokenizer:
    """A DataModule's tokenizer as the rest of the project uses it (``encode_ordinary``,
    ``decode``, ``n_vocab``, …, the encoding's own), with the chat format's end of turn as
    ``eot_token`` (it ends completions and pads batches) and its ``stop_tokens`` (each ends a
    sampled response)."""

    def __init__(self, encoding, chat: ChatFormat):
        self.encoding, self.chat = encoding, chat
        self.eot_token, self.stop_tokens = chat.eot_token, chat.stop_tokens

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("encoding", "chat"):  # copy and pickle look before __init__ ran
            raise AttributeError(name)
        return getattr(self.encoding, name)


def tokenize_rows(batch: dict[str, list], columns: tuple[str, ...], chat: ChatFormat, observations: str | None) -> dict:
    """A ``datasets.map`` batch as tokens: ``prompt_ids``, ``prompt_text`` and, for each reply
    column, ``{column}_ids`` ending with the end-of-turn token; language-modelling rows (``text``
    or ``messages``) as an empty prompt and the whole row as the reply.

    With ``observations`` (a regex), the spans of a reply it matches are tokenised on their own,
    as a multi-turn rollout feeds a tool's answer, and ``{column}_fed`` marks their tokens (1:
    not trained on); a language-modelling row marks every token but the assistant's the same way.
    """
    if "prompt" not in batch:  # language modelling: a ``text`` or ``messages`` column is the row
        return _tokenize_documents(batch, columns, chat)
    prompts = batch["prompt"]
    texts = [chat.prompt_text(p) for p in prompts]  # each conversation rendered once
    out = {"prompt_ids": [chat.prompt_ids(p, t) for p, t in zip(prompts, texts)], "prompt_text": texts}
    for column in columns:
        if observations is None:
            replies = zip(prompts, batch[column], out["prompt_ids"])
            out[f"{column}_ids"] = [chat.completion_ids(p, r, head) for p, r, head in replies]
            continue
        ids, fed = zip(*(chat.completion_pieces(p, r, observations) for p, r in zip(prompts, batch[column])))
        out[f"{column}_ids"], out[f"{column}_fed"] = list(ids), list(fed)
    return out


def _tokenize_documents(batch: dict[str, list], columns: tuple[str, ...], chat: ChatFormat) -> dict:
    (column,) = columns  # SFT's ``response``: language modelling is SFT's alone
    if "messages" in batch:
        encoded = [chat.conversation_ids(m) for m in batch["messages"]]
    else:
        encoded = [(chat.tok.encode_ordinary(t) + [chat.eos], None) for t in batch["text"]]
    rows = len(encoded)
    return {
        "prompt_ids": [[] for _ in range(rows)],
        "prompt_text": ["" for _ in range(rows)],
        f"{column}_ids": [ids for ids, _ in encoded],
        f"{column}_fed": [[0] * len(ids) if mask is None else [1 - m for m in mask] for ids, mask in encoded],
    }
