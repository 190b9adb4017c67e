"""LightningDataModules for the kinds of RLHF data: demonstrations, preference pairs (paired or
not), prompts.

The source is chosen by configuration: a built-in task (``arithmetic``, ``sorting``), the hub's
``Anthropic/hh-rlhf`` or a local copy, Dolly, plain prompts, a judgement file, or any dataset in
TRL's formats, standard or conversational (``data/formats.py``). Rows become tokens once, through
the chat format (``data/chat.py``: the model's own template, or the course's), with
``datasets.map`` (cached on disk), and are padded per batch. Splits are deterministic; under DDP,
Lightning's distributed sampler gives each rank a disjoint shard.

* ``SFTDataModule``: ``input_ids``, ``attention_mask``, ``loss_mask`` (1 on assistant tokens).
* ``PreferenceDataModule``: ``{chosen,rejected}_{input_ids,attention_mask,prompt_mask}``.
* ``KTODataModule`` (``data/kto.py``): unpaired ``input_ids``, ``attention_mask``,
  ``response_mask``, ``label``, and the same three tensors, prefixed ``kl_``, for each prompt with
  its partner's completion.
* ``PromptDataModule`` (``data/prompts.py``): left-padded ``input_ids`` and ``attention_mask``, the
  ``prompt`` strings and per-prompt ``metadata`` that reward functions read.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from shraygpt_rl.data.chat import ChatFormat, ChatTokenizer, read_template, system_prompt_for, tokenize_rows
from shraygpt_rl.data.hh_rlhf import HUB_NAME
from shraygpt_rl.data.sources import open_source
from shraygpt_rl.data.tasks import TASKS, make_task
from shraygpt_rl.errors import ConfigError, DataError, require
from shraygpt_rl.tokenizer import TokenizerName, get_tokenizer

log = logging.getLogger(__name__)
_SPLITS = ("train", "val", "test")
_NOT_METADATA = {"prompt", "prompt_ids", "prompt_text", "index"}  # prompt columns; the others: each prompt's metadata


@functools.cache
def _encoding(name: str, path: str | None):
    return get_tokenizer(name, path)


@functools.cache
def _chat(name: str, path: str | None, template: str | None, system_prompt: str | None, edited=None) -> ChatFormat:
    """The chat format of a tokenizer and ``--data.chat_template`` (``data/chat.py``); ``edited``
    (a template file's modification time and size) only keys the cache: an edited file is read anew."""
    encoding = _encoding(name, path)
    return ChatFormat(encoding, *read_template(template, encoding), system_prompt=system_prompt)


def truncate_pair(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int):
    """Fit ``prompt + response`` in ``max_length``: keep the end of the prompt (at most
    ``max_prompt_length`` tokens) and the start of the response."""
    if len(prompt) + len(response) > max_length:
        prompt = prompt[-max_prompt_length:]
        response = response[: max(max_length - len(prompt), 0)]
    return prompt, response


def _tokenize(
    batch: dict, columns: tuple[str, ...], chat: tuple, observations: str | None = None, version: str = ""
) -> dict:
    """``datasets.map`` body: ``chat.tokenize_rows`` with the chat format ``chat`` names (strings,
    which key the map's cache, as ``version`` does: the chat code's and the template's hash)."""
    return tokenize_rows(batch, columns, _chat(*chat), observations)


def carve(data: datasets.Dataset, size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(rest, held_out)``: about ``size`` rows of ``data`` held out by a seeded draw, every
    prompt on one side only, so that no held-out row shares its prompt with a training row (the
    labelling page's pairs share prompts, as do HH-RLHF's and TRL's files at times).

    When no prompt repeats, exactly ``datasets``' ``train_test_split``. Otherwise whole prompts
    are held out in a seeded order until ``size`` rows are, skipping a prompt whose rows would
    take the split past twice ``size`` or past half the rows; when none fits, the smallest prompt
    alone if it leaves half; else (a file of one prompt) rows are drawn as without prompts, and a
    warning says that held-out rows share prompts with training.
    """
    keys = []
    if "prompt" in data.column_names:
        keys = [p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in data["prompt"]]
    held = _whole_prompts(keys, size, seed) if len(set(keys)) < len(keys) and size else []
    if not held:
        carved = data.train_test_split(test_size=size, seed=seed)
        return carved["train"], carved["test"]
    chosen = set(held)
    return data.select([i for i in range(len(data)) if i not in chosen]), data.select(sorted(held))


def _whole_prompts(keys: list[str], size: int, seed: int) -> list[int]:
    """``carve``'s held-out rows by whole prompts (``keys``: each row's prompt); [] (said so)
    when every prompt has more than half the rows."""
    rows: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        rows.setdefault(key, []).append(index)
    order = list(rows)
    random.Random(seed).shuffle(order)
    held: list[int] = []
    limit = min(2 * size, len(keys) // 2)  # the rest keeps at least half the rows
    for key in order:
        if len(held) >= size:
            break
        if len(held) + len(rows[key]) <= limit:
            held += rows[key]
    if not held:  # every prompt has more rows than the limit: the smallest, if half remains
        smallest = min(order, key=lambda key: len(rows[key]))
        held = rows[smallest] if len(rows[smallest]) <= len(keys) // 2 else []
    if not held:
        log.warning("each prompt has more than half the rows: held-out rows share prompts with training rows")
    return held


def _user_turn(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": row["prompt"]}]}


def init_arguments(datamodule: type[ChatDataModule]) -> set[str]:
    """The keyword arguments ``datamodule`` takes: its own and ``ChatDataModule``'s."""
    own = inspect.signature(datamodule.__init__).parameters
    shared = inspect.signature(ChatDataModule.__init__).parameters
    return {name for name, p in [*own.items(), *shared.items()] if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack ragged rows into a (B, T) tensor, padding on the right (or the left)."""
    width = max(map(len, rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            (out[i, width - len(row) :] if left else out[i, : len(row)]).copy_(torch.tensor(row))
    return out


class ChatDataModule(L.LightningDataModule):
    """What the three DataModules share: the source, tokenizer, sizes, batching and splits.

    Args:
        source: ``arithmetic``, ``sorting`` or ``multiplication`` (built in); ``Anthropic/hh-rlhf``
            (the hub), or a local ``.jsonl``/``.jsonl.gz`` file or directory in HH-RLHF's format;
            ``databricks/databricks-dolly-15k`` or a local JSONL with Dolly's columns; plain
            prompts: ``stories`` (built in) or a ``.txt`` file of one prompt per line; a judgement
            file of the labelling page; or any local ``.jsonl``/``.json``/``.parquet`` file or
            hub dataset in TRL's formats, standard or conversational (``data/formats.py``).
        tokenizer: ``byte`` (built in, for tiny models), ``r50k_base`` (the course's), or ``hf``:
            a Hugging Face tokenizer from ``tokenizer_path``. With a Hugging Face policy, the
            default (``byte``) becomes the policy's own tokenizer.
        tokenizer_path: Local ``r50k_base.tiktoken`` for machines without network; for ``hf``, the
            hub name or folder of the tokenizer.
        batch_size: Samples per batch (per device).
        max_length: Most tokens per sequence, prompt and response together.
        max_prompt_length: Most prompt tokens kept (the end of the prompt) when truncating.
        seed: Seeds the built-in tasks and the validation/test carve-out of HH-RLHF.
        num_workers: DataLoader worker processes.
        train_size: Training examples; None for all (HH-RLHF) or 5000 (built-in tasks).
        val_size: Validation examples.
        test_size: Test examples (HH-RLHF from the hub uses its own test split).
        system_prompt: The system message put first in every conversation; ``default``: the
            course's for ShrayGPT's tokenizers, none for a Hugging Face model; None: none.
        chat_template: How conversations become text (``data/chat.py``): None, the model's own
            template (else the course's format, said once); ``course``; ``none`` (the messages'
            contents, no roles); or a Jinja template, as a string or a file.
        prompt_as_user: Standard (text) prompts become a user message, so that the chat template
            renders them: a plain question column for an instruct model (GSM8K's ``question``).
        columns: Renames the source's columns before its type is read, e.g. ``{question: prompt}``.
        subset: A hub dataset's configuration (``datasets.load_dataset``'s ``name``), such as
            GSM8K's ``main``.
        data_dir: HH-RLHF subset such as ``harmless-base`` (hub ``data_dir`` or local subfolder).
        skip_invalid: Drop invalid HH-RLHF rows (and log how many) instead of stopping.
        num_terms: Arithmetic: numbers to add.
        num_items: Sorting: list length.
        digits: Built-in tasks: largest number of digits per number (multiplication: of each operand).
    """

    def __init__(
        self,
        source: str = "arithmetic",
        tokenizer: TokenizerName = "byte",
        tokenizer_path: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        max_prompt_length: int = 192,
        seed: int = 0,
        num_workers: int = 0,
        train_size: int | None = None,
        val_size: int = 200,
        test_size: int = 200,
        system_prompt: str | None = "default",
        chat_template: str | None = None,
        prompt_as_user: bool = False,
        columns: dict[str, str] | None = None,
        subset: str | None = None,
        data_dir: str | None = None,
        skip_invalid: bool = False,
        num_terms: int = 2,
        num_items: int = 4,
        digits: int = 2,
    ):
        super().__init__()
        require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}.")
        require(
            1 <= max_prompt_length < max_length,
            f"max_prompt_length ({max_prompt_length}) must be at least 1 and below max_length ({max_length}).",
        )
        require(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}.")
        require(train_size is None or train_size >= 1, f"train_size must be at least 1 (or null), got {train_size}.")
        require(
            val_size >= 1 and test_size >= 1, f"val_size and test_size must be at least 1, got {val_size}, {test_size}."
        )
        require(digits >= 1 and num_terms >= 2 and num_items >= 2, "digits must be >= 1, num_terms and num_items >= 2.")
        self.save_hyperparameters()
        self.splits: dict[str, datasets.Dataset] = {}

    # -- what subclasses define ------------------------------------------------------------------
    response_columns: tuple[str, ...] = ()

    def task_split(self, task, split: str) -> datasets.Dataset:
        raise NotImplementedError

    def hh_split(self, pairs: datasets.Dataset) -> datasets.Dataset:
        """The columns this DataModule needs from a source's rows (HH-RLHF pairs, demonstrations or prompts)."""
        raise NotImplementedError

    kinds: tuple[str, ...] = ("preferences", "instructions", "prompts", "unpaired")  # the sources it can use
    reads = "prompts"  # the rows it reads (``formats.to_row``'s kinds)

    def check_kind(self, kind: str, trl_type: str | None = None) -> None:
        if kind not in self.kinds:
            need = " or ".join(self.kinds)
            what = f"{trl_type} rows ({kind})" if trl_type else kind
            raise DataError(f"'{self.hparams.source}' holds {what}, but this stage needs {need}.")

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def chat_key(self) -> tuple:
        """What names the chat format: tokenizer, its path, the template option, the system prompt,
        and a template file's modification time and size."""
        hp = self.hparams
        system_prompt = system_prompt_for(hp.system_prompt, hf=hp.tokenizer == "hf")
        file = Path(hp.chat_template).expanduser() if hp.chat_template and "{" not in hp.chat_template else None
        edited = (file.stat().st_mtime_ns, file.stat().st_size) if file is not None and file.is_file() else None
        return hp.tokenizer, hp.tokenizer_path, hp.chat_template, system_prompt, edited

    @property
    def chat(self) -> ChatFormat:
        """How rows become tokens (``data/chat.py``)."""
        return _chat(*self.chat_key())

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The tokenizer this DataModule tokenises with, whose ``eot_token`` ends (and pads) a
        completion in its chat format and whose ``stop_tokens`` end a sampled response."""
        return ChatTokenizer(_encoding(self.hparams.tokenizer, self.hparams.tokenizer_path), self.chat)

    def prepare_data(self) -> None:
        self.chat  # noqa: B018  (fail early, on rank 0: the tokenizer and the template load)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self._raw_splits()
        hp = self.hparams
        kwargs = {"columns": self.response_columns, "chat": self.chat_key(), "observations": hp.get("observations")}
        kwargs["version"] = self.chat.version
        for split, data in raw.items():
            data = data.add_column("index", list(range(len(data))))  # row ids, e.g. for cached reference logps
            self.splits[split] = data.map(_tokenize, batched=True, fn_kwargs=kwargs, desc=f"Tokenizing {split}")

    def _raw_splits(self) -> dict[str, datasets.Dataset]:
        hp = self.hparams
        if hp.source in TASKS:
            task = make_task(
                hp.source,
                num_terms=hp.num_terms,
                num_items=hp.num_items,
                digits=hp.digits,
                seed=hp.seed,
                num_train=hp.train_size or 5000,
                num_val=hp.val_size,
                num_test=hp.test_size,
            )
            return {split: self._prompts_as_user(self.task_split(task, split)) for split in _SPLITS}
        kind, trl_type, load = open_source(
            hp.source, self.reads, hp.skip_invalid, data_dir=hp.data_dir, columns=hp.columns, subset=hp.subset
        )
        self.check_kind(kind, trl_type)
        data = self._prompts_as_user(load(split="train"))
        val_size, test_size = self._held_out_sizes(len(data), from_hub=hp.source == HUB_NAME)
        if hp.source == HUB_NAME:
            test = self._prompts_as_user(load(split="test"))
            test = test.select(range(min(test_size, len(test))))
        else:
            data, test = carve(data, test_size, hp.seed)
        train, val = carve(data, val_size, hp.seed)
        if hp.train_size is not None:
            train = train.select(range(min(hp.train_size, len(train))))
        return {"train": self.hh_split(train), "val": self.hh_split(val), "test": self.hh_split(test)}

    def _prompts_as_user(self, data: datasets.Dataset) -> datasets.Dataset:
        """With ``prompt_as_user``, each standard (text) prompt as a user message."""
        standard = "prompt" in data.column_names and len(data) and isinstance(data[0]["prompt"], str)
        if not (self.hparams.prompt_as_user and standard):
            return data
        return data.map(_user_turn, desc="Prompts as user turns")

    def _held_out_sizes(self, pairs: int, from_hub: bool) -> tuple[int, int]:
        """``val_size`` and ``test_size``, shrunk (and said so) when the data is too small for them
        to leave at least half of it for training."""
        hp = self.hparams
        test_size = 0 if from_hub else hp.test_size  # the hub has its own test split
        if pairs < 4:
            raise DataError(f"'{hp.source}' holds {pairs} valid examples; training needs at least 4.")
        if hp.val_size + test_size <= pairs // 2:
            return hp.val_size, hp.test_size
        val_size = max(1, min(hp.val_size, pairs // 4))
        new_test = test_size and max(1, min(test_size, pairs // 4))
        log.warning(
            "%s holds %d examples: validating on %d and testing on %d of them (asked: %d and %d)",
            hp.source,
            pairs,
            val_size,
            new_test,
            hp.val_size,
            hp.test_size,
        )
        return val_size, new_test or hp.test_size

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def plain_dataloader(self, split: str, desc: str | None = None):
        """The split in order, never sharded: for one-off passes such as precomputing (with a
        progress bar when ``desc`` is given)."""
        loader = self._loader(split, shuffle=False)
        return tqdm(loader, desc=desc, leave=False) if desc else loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _fit(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        return truncate_pair(prompt, response, self.hparams.max_length, self.hparams.max_prompt_length)


class SFTDataModule(ChatDataModule):
    """Demonstrations for SFT. The loss mask is 1 on assistant tokens (the response and its EOS).

    Args:
        wrong_fraction: Built-in tasks: share of deliberately wrong demonstrations.
        demos_per_problem: Built-in tasks: demonstrations per training problem, each wrong or
            not independently (see ``VerifiableTask.sft``).
        packing: Concatenate examples into ``max_length`` rows (no cross-example attention mask:
            the EOS between examples separates them, as in GPT pre-training).
        observations: A regex for the tool observations in demonstrations (``<result>.*?</result>``
            for the calculator): tokenised on their own, as a multi-turn rollout feeds them, and
            left out of the loss; None: every response token is trained on.
        **kwargs: ``ChatDataModule``'s arguments.
    """

    response_columns = ("response",)
    reads = "instructions"

    def __init__(
        self,
        wrong_fraction: float = 0.0,
        demos_per_problem: int = 1,
        packing: bool = False,
        observations: str | None = None,
        **kwargs,
    ):
        require(0 <= wrong_fraction <= 1, f"wrong_fraction must be in [0, 1], got {wrong_fraction}.")
        require(demos_per_problem >= 1, f"demos_per_problem must be at least 1, got {demos_per_problem}.")
        if observations is not None:
            try:
                groups = re.compile(observations).groups
            except re.error as error:
                raise ConfigError(f"observations is not a valid regex ({error}): {observations!r}.") from None
            require(groups == 0, f"observations must have no capture groups (write (?:…)), got {observations!r}.")
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def task_split(self, task, split):
        if split != "train":  # held-out demonstrations are clean: val/loss measures correctness
            return task.sft(split)
        return task.sft(split, self.hparams.wrong_fraction, self.hparams.demos_per_problem)

    kinds = ("preferences", "instructions")

    def hh_split(self, pairs):
        names = pairs.column_names
        return (
            pairs
            if {"response", "text", "messages"} & set(names)
            else pairs.rename_column("chosen_response", "response")
        )

    def setup(self, stage=None):
        first = not self.splits
        super().setup(stage)
        if first and self.hparams.packing:
            self.splits = {k: self._packed(v) for k, v in self.splits.items()}

    def _packed(self, data: datasets.Dataset) -> datasets.Dataset:
        rows = [self.example(r) for r in data]
        ids = [t for r in rows for t in r["input_ids"]]
        mask = [m for r in rows for m in r["loss_mask"]]
        n = self.hparams.max_length
        return datasets.Dataset.from_dict(
            {
                "input_ids": [ids[i : i + n] for i in range(0, len(ids), n)],
                "loss_mask": [mask[i : i + n] for i in range(0, len(mask), n)],
            }
        )

    def example(self, row: dict) -> dict[str, list[int]]:
        if "prompt_ids" not in row:  # already packed
            return row
        prompt, response = self._fit(row["prompt_ids"], row["response_ids"])
        fed = row.get("response_fed") or [0] * len(response)  # a tool's observation is not trained on
        return {"input_ids": prompt + response, "loss_mask": [0] * len(prompt) + [1 - f for f in fed[: len(response)]]}

    def collate(self, rows):
        examples = [self.example(r) for r in rows]
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": _pad(ids, self.tokenizer.eot_token),
            "attention_mask": _pad([[1] * len(i) for i in ids], 0),
            "loss_mask": _pad([e["loss_mask"] for e in examples], 0),
        }


class PreferenceDataModule(ChatDataModule):
    """Preference pairs for the reward model and DPO, right-padded.

    Each batch has ``chosen_input_ids``, ``chosen_attention_mask`` and ``chosen_prompt_mask`` (1 on
    prompt tokens), the same for ``rejected_``, and the ``prompt`` strings.
    """

    response_columns = ("chosen_response", "rejected_response")
    kinds = ("preferences",)
    reads = "preferences"

    def task_split(self, task, split):
        return task.preferences(split)

    def hh_split(self, pairs):
        return pairs

    def collate(self, rows):
        batch: dict[str, Any] = {
            "prompt": [r["prompt_text"] for r in rows],
            "index": torch.tensor([r["index"] for r in rows]),
        }
        # Judged by people: the mean grade toward the preferred answer (2 significantly better, 1
        # slightly): ``strength`` in a judgement file, TRL's ``margin`` in label_report's export.
        judged = "strength" if "strength" in rows[0] else "margin" if "margin" in rows[0] else None
        if judged is not None:
            batch["strength"] = torch.tensor([r[judged] for r in rows], dtype=torch.float32)
        pad, max_length = self.tokenizer.eot_token, self.hparams.max_length
        # Both sides keep the same prompt: truncate it for the longer response.
        prompts = [
            self._fit(r["prompt_ids"], max(r["chosen_response_ids"], r["rejected_response_ids"], key=len))[0]
            for r in rows
        ]
        for side in ("chosen", "rejected"):
            responses = [r[f"{side}_response_ids"][: max_length - len(p)] for r, p in zip(rows, prompts)]
            batch[f"{side}_input_ids"] = _pad([p + r for p, r in zip(prompts, responses)], pad)
            batch[f"{side}_attention_mask"] = _pad([[1] * (len(p) + len(r)) for p, r in zip(prompts, responses)], 0)
            batch[f"{side}_prompt_mask"] = _pad([[1] * len(p) + [0] * len(r) for p, r in zip(prompts, responses)], 0)
        return batch


def stack_pairs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``PreferenceDataModule`` batch as one tensor batch: chosen rows then rejected rows,
    right-padded to one width. Returns ids, attention mask and response mask, each (2B, T)."""
    width = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))

    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.size(1)))

    ids = torch.cat([widen(batch[f"{s}_input_ids"]) for s in ("chosen", "rejected")])
    attention = torch.cat([widen(batch[f"{s}_attention_mask"]) for s in ("chosen", "rejected")])
    prompt = torch.cat([widen(batch[f"{s}_prompt_mask"]) for s in ("chosen", "rejected")])
    return ids, attention, attention * (1 - prompt)
