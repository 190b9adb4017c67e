"""Multi-turn rollouts: the host-side bookkeeping of ``generation.generate`` with an environment.

The decode loop samples one token per row per step, as for single-turn rollouts. ``Turns``
watches each row's tokens. When the text of a row's current turn contains the environment's
``stop`` string (a complete tool call), it asks ``environment.step(prompt, text, metadata)``
for the observation, tokenises it on its own and queues its tokens. In the steps that follow,
that row is fed its queued tokens one per step instead of sampling (``forced``), while every
other row keeps sampling: the observation goes into the row's KV cache through the same step
that decodes, the batch keeps its fixed shape, and no row waits for another.

Token in, token out: the sequence trained on is the one sampled, token for token. Nothing is
re-tokenised at a turn boundary, so the log-probabilities of the policy's tokens are those of the
rollout, and the observation's tokens are marked as not the policy's (``response_mask`` 0,
log-probability 0) so that no loss, KL or advantage counts them.

A row ends at a stop token that the policy samples (any of ``tokenizer.stop_tokens``: EOS, or an
instruct model's end-of-turn token; the environment is asked once more and must say done: None),
when the environment answers a tool call with None (``ended_by_environment``), when its
``max_turns``-th turn ends in another tool call (``max_turns_hit``), or when it runs out of
``max_new_tokens``.
Only the last is a truncation: the other two are endings the environment chose, and RL must see
their reward (a row that never stops calling the tool earns nothing) rather than drop them as cut
off. A call in the row's last column is not answered: there is no room left for the answer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from shraygpt_rl.errors import ConfigError, EnvironmentStepError
from shraygpt_rl.tokenizer import stop_tokens


class Turns:
    """Per-row turn state for one ``generate`` call over ``len(prompts)`` rows.

    Args:
        environment: An object with a ``stop`` string, a ``name``, ``calls``/``errors`` counters
            and ``step(prompt, text, metadata) -> str | None`` (``environments.Environment``).
        tokenizer: The policy's tokenizer (``encode_ordinary``, ``decode``, ``eot_token`` and, where
            it has them, ``stop_tokens``: see ``tokenizer.stop_tokens``).
        prompts: Each row's prompt text.
        metadata: Each row's metadata (passed to ``step``).
        max_turns: Most policy turns per row (1: the policy's first tool call ends the row).
        capacity: The response columns (``max_new_tokens``), to cut observations that overflow.
    """

    def __init__(
        self, environment, tokenizer, prompts: list[str], metadata: list[dict[str, Any]], max_turns: int, capacity: int
    ):
        check_turns(environment, max_turns)
        stop = environment.stop
        self.env, self.enc, self.prompts, self.metadata = environment, tokenizer, prompts, metadata
        self.max_turns, self.capacity, self.stop = max_turns, capacity, stop
        self.ends = frozenset(stop_tokens(tokenizer))  # the policy's tokens that end its response
        B = len(prompts)
        self.window = len(stop.encode())  # a token holds at least one byte: the stop spans at most this many
        self.last_char = stop[-1]
        self.queue: list[list[int]] = [[] for _ in range(B)]  # observation tokens still to feed
        self.turn: list[list[int]] = [[] for _ in range(B)]  # the current turn's policy tokens
        self.response: list[list[int]] = [[] for _ in range(B)]  # every response token so far
        self.own: list[list[bool]] = [[] for _ in range(B)]  # whether each of them is the policy's
        self.turns = torch.ones(B, dtype=torch.long)
        self.tool_calls = torch.zeros(B, dtype=torch.long)
        self.tool_errors = torch.zeros(B, dtype=torch.long)
        self.max_turns_hit = torch.zeros(B, dtype=torch.bool)
        self.ended_by_environment = torch.zeros(B, dtype=torch.bool)  # a tool call answered with None
        self.cut = 0  # observations cut to fit the context
        self._ends: dict[int, bool] = {}  # token -> whether its text holds the stop's last character
        self._idle: tuple[Tensor, Tensor] | None = None  # ``forced`` when no row is fed

    # -- what the next step feeds --------------------------------------------------------------
    def forced(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(force (B,) bool, tokens (B,) long): the rows fed an observation token at the next step."""
        if not any(self.queue):  # most steps: nothing to feed, no tensors to build
            if self._idle is None or self._idle[0].device != device:
                B = len(self.queue)
                self._idle = (
                    torch.zeros(B, dtype=torch.bool, device=device),
                    torch.zeros(B, dtype=torch.long, device=device),
                )
            return self._idle
        force = torch.tensor([bool(q) for q in self.queue])
        tokens = torch.tensor([q[0] if q else 0 for q in self.queue])
        return force.to(device), tokens.to(device)

    # -- what the last step produced -----------------------------------------------------------
    def record(self, column: int, tokens: Tensor, alive: Tensor, force: Tensor) -> list[int]:
        """Take in step ``column``'s tokens (B,) (``alive`` rows were real, ``force`` rows fed an
        observation token). Returns the rows to end now (they stop without a stop token)."""
        end = []
        step = torch.stack([tokens, alive.long(), force.long()]).tolist()  # one read from the device
        for b, (token, real, fed) in enumerate(zip(*step)):
            if not real:
                continue
            self.response[b].append(token)
            self.own[b].append(not fed)
            if fed:
                self.queue[b].pop(0)
                continue
            if token in self.ends:
                self._ask(b, at_eos=True)
                continue
            self.turn[b].append(token)
            if self._calls(b) and self._tool_call(b, column):
                end.append(b)
        return end

    def _calls(self, b: int) -> bool:
        """Whether row ``b``'s current turn now holds the stop string (one decode of a few tokens,
        and only after a token that could complete it: one whose text holds the stop's last
        character, or part of a character, U+FFFD alone, which may complete a non-ASCII one)."""
        token = self.turn[b][-1]
        if token not in self._ends:
            text = self.enc.decode([token]) if token < self.enc.n_vocab else ""
            self._ends[token] = self.last_char in text or "\ufffd" in text
        return self._ends[token] and self.stop in self.enc.decode(
            [t for t in self.turn[b][-self.window :] if t < self.enc.n_vocab]
        )

    def _tool_call(self, b: int, column: int) -> bool:
        """Answer row ``b``'s tool call; True when the row ends here instead."""
        if int(self.turns[b]) >= self.max_turns:
            self.max_turns_hit[b] = True
            return True
        room = self.capacity - (column + 1)
        if room <= 0:  # the row is cut here anyway: an answer could not be fed, so the tool never runs
            return False
        observation = self._ask(b, at_eos=False)
        if observation is None:
            self.ended_by_environment[b] = True
            return True
        ids = self.enc.encode_ordinary(observation)
        if len(ids) > room:
            self.cut += 1
            if self.cut == 1:
                warnings.warn(
                    f"Environment {_name(self.env)} answered with more tokens than the response has room for; "
                    "the observation is cut (raise max_new_tokens to keep it whole).",
                    stacklevel=2,
                )
            ids = ids[:room]
        self.queue[b] = ids
        self.turn[b] = []
        self.turns[b] += 1
        return False

    def _ask(self, b: int, at_eos: bool) -> str | None:
        """``environment.step`` for row ``b``, with its counters read per row; one sentence on misuse."""
        ends, n_vocab = self.ends, self.enc.n_vocab
        # The policy's stop token is not text; an observation's tokens are, even one the tokenizer
        # reads as a stop token.
        text = self.enc.decode(
            [t for t, own in zip(self.response[b], self.own[b]) if t < n_vocab and not (own and t in ends)]
        )
        if not at_eos:
            text = text[: text.rindex(self.stop) + len(self.stop)]  # a token may run past the stop string
        calls, errors = getattr(self.env, "calls", 0), getattr(self.env, "errors", 0)
        turn = int(self.turns[b])
        try:
            observation = self.env.step(self.prompts[b], text, self.metadata[b])
        except Exception as error:
            raise EnvironmentStepError(
                f"Environment {_name(self.env)} raised {error!r} at turn {turn} of row {b}."
            ) from error
        if observation is not None and not isinstance(observation, str):
            raise EnvironmentStepError(
                f"Environment {_name(self.env)} returned a {type(observation).__name__} at turn {turn} of row {b}; "
                "step must return the observation text or None (done)."
            )
        if at_eos and observation is not None:
            raise EnvironmentStepError(
                f"Environment {_name(self.env)} never says done: it answered the end of text at turn {turn} of row {b} "
                "with an observation; step must return None once the policy has answered."
            )
        self.tool_calls[b] += getattr(self.env, "calls", 0) - calls
        self.tool_errors[b] += getattr(self.env, "errors", 0) - errors
        return observation

    def stats(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Per row, on ``device`` (the rollout's): ``turns``, ``tool_calls``, ``tool_errors``,
        ``max_turns`` (hit) and ``ended_by_environment`` (a tool call answered with None)."""
        counts = {
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "max_turns": self.max_turns_hit,
            "ended_by_environment": self.ended_by_environment,
        }
        return {name: value.to(device, copy=True) for name, value in counts.items()}


def check_turns(environment, max_turns: int) -> None:
    """``ConfigError`` (one sentence) unless ``max_turns`` >= 1 and ``environment`` (when given)
    has a non-empty ``stop`` string: checked by ``Turns`` and, at startup, by whatever builds one."""
    if max_turns < 1:
        raise ConfigError(f"max_turns must be at least 1, got {max_turns}.")
    stop = getattr(environment, "stop", None)
    if environment is not None and (not isinstance(stop, str) or not stop):
        raise ConfigError(
            f"Environment {_name(environment)} has no stop string; set its `stop` to the text that ends a tool call."
        )


def _name(environment) -> str:
    return f"'{getattr(environment, 'name', type(environment).__name__)}'"
