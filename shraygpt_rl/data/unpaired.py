"""KTO's unpaired examples: ``prompt``, ``completion`` and ``label`` (true: desirable).

They come from a local JSON/JSONL file of such rows, read as they are, or from preference pairs
(a built-in task, HH-RLHF, a preference or judgement file), each pair giving two examples: the
chosen response desirable, the rejected one undesirable ("KTO on the same pairs, unpaired").

Each example also gets a fixed *partner*, another example of its split, whose completion after
this example's prompt forms the mismatched pair of KTO's KL reference point (``stages/kto.py``).
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from shraygpt_rl.data.sources import _field, _finish, _rows


def load_unpaired(source: str, skip_invalid: bool = False) -> datasets.Dataset:
    """Rows ``prompt``, ``completion``, ``label`` (bool) of a local ``.json`` list or ``.jsonl``
    file; a bad row stops with one sentence naming the file and line unless ``skip_invalid``."""
    out, bad = [], []
    for line, row in _rows(Path(source).expanduser(), skip_invalid):
        try:
            out.append(_example(row))
        except ValueError as err:
            bad.append((line, str(err)))
    return _finish(out, bad, source, skip_invalid, "examples")


def _example(row: dict) -> dict:
    label = row.get("label")
    if not isinstance(label, bool):  # 0/1 or "yes" would silently mean something else
        raise ValueError("'label' is missing or not true/false")
    return {"prompt": _field(row, "prompt", strip=False), "completion": _field(row, "completion"), "label": label}


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
