"""KTO's unpaired examples: ``prompt``, ``completion`` and ``label`` (true: desirable).

They come from rows of TRL's unpaired preference type, read as they are (``data/formats.py``),
or from preference pairs (a built-in task, HH-RLHF, a preference or judgement file), each pair
giving two examples: the chosen response desirable, the rejected one undesirable ("KTO on the
same pairs, unpaired").

Each example also gets a fixed *partner*, another example of its split, whose completion after
this example's prompt forms the mismatched pair of KTO's KL reference point (``stages/kto.py``).
"""

from __future__ import annotations

import random

import datasets


def unpair(pairs: datasets.Dataset) -> datasets.Dataset:
    """Preference pairs (``prompt``, ``chosen_response``, ``rejected_response``) as examples: each
    pair's chosen response (desirable), then its rejected one (undesirable). Interleaved, so that
    any run of rows, such as the first validation batches, holds both labels."""
    rows = {"prompt": [], "completion": [], "label": []}
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen_response"], pairs["rejected_response"]):
        rows["prompt"] += [prompt, prompt]
        rows["completion"] += [chosen, rejected]
        rows["label"] += [True, False]
    return datasets.Dataset.from_dict(rows)


def partners(size: int, seed: str) -> list[int]:
    """Each row's partner: the next row in one random cycle through all ``size`` rows, fixed by
    ``seed``. No row is its own partner (unless ``size`` is 1), and every row is someone's partner
    once, so the mismatched completions are the split's completions, each used once."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    out = [0] * size
    for k, row in enumerate(order):
        out[row] = order[(k + 1) % size]
    return out
