"""The interface every rollout engine answers (``engines.py`` lists them): ``generate`` from
prompts to a ``GenerationOutput``. Its own module, so that an optional engine
(``vllm_engine.py``) can implement it while ``engines.make_engine`` imports that engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shraygpt_rl.fixed_shape import Sampling
from shraygpt_rl.turns import Turns


@dataclass
class GenerationOutput:
    """Prompts and sampled responses.

    Attributes:
        sequences: (B, P + N) left-padded prompts followed by right-padded responses.
        attention_mask: (B, P + N) 1 on real prompt and response tokens, 0 on padding.
        response_mask: (B, N) 1 on sampled tokens up to and including the row's stop token; 0 on
            padding and on the observations of a multi-turn rollout (not the policy's tokens).
        logprobs: (B, N) log-probability of each sampled token under the sampling distribution;
            0 where ``response_mask`` is 0, and 0 for greedy decoding (a point mass).
        prompt_length: P, the padded prompt width.
        turns: Multi-turn rollouts: per row ``turns``, ``tool_calls``, ``tool_errors`` and
            ``max_turns`` (hit), each (B,); None for single-turn.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logprobs: Tensor
    prompt_length: int
    turns: dict[str, Tensor] | None = None

    @property
    def responses(self) -> Tensor:
        """(B, N) the sampled tokens, padded after each row's end."""
        return self.sequences[:, self.prompt_length :]


class RolloutEngine:
    """What every engine answers: ``generate`` with the arguments already checked by
    ``generation.generate`` (``attention_mask`` given, ``P + max_new_tokens`` within the model)."""

    name: str = ""
    exact: bool = True  # its log-probabilities are the training forward's (to float rounding)

    def generate(
        self,
        model: nn.Module,
        idx: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        generator: torch.Generator | None = None,
        turns: Turns | None = None,
    ) -> GenerationOutput:
        raise NotImplementedError
