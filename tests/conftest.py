"""Shared test fixtures: tiny models, and the read-only ``../shared`` material when it exists."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from shraygpt_rl.bench import HH_SAMPLE, ROOT, SHARED
from shraygpt_rl.bench import R50K as R50K_FILE
from shraygpt_rl.data.tasks import arithmetic_target
from shraygpt_rl.environments import Environment
from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.runner import config_section, data_from_config
from shraygpt_rl.tokenizer import byte_encoding

COURSE_CKPT = SHARED / "fixtures" / "course-checkpoint" / "course-tiny.ckpt"
COURSE_EXPECTED = SHARED / "fixtures" / "course-checkpoint" / "course-tiny-expected.pt"
SFT_CONFIG = ROOT / "configs" / "sft.yaml"
# The SFT fixture's steps: configs/sft.yaml cut from 1000 steps to 600 (the cosine schedule over
# the 600), which trains in 60% of the time and leaves more for RL to learn; the learning tests'
# thresholds were measured from such policies.
FIXTURE_STEPS = 600
# The learning tests' seed (the SFT fixture's and each learning run's). Their thresholds are set
# from the minimum over seeds (0-4; the LoRA test's 0-2) at 1 and 2 torch threads, measured by
# setting this variable.
LEARNING_SEED = int(os.environ.get("SHRAYGPT_LEARNING_SEED", "0"))
# A trained SFT policy to use instead of training the fixture (a checkpoint that ``python train.py
# --stage sft --seed_everything=<seed> --trainer.max_steps 600`` exported): measuring thresholds
# over seeds and threads then trains each seed's SFT policy once.
SFT_POLICY = os.environ.get("SHRAYGPT_SFT_POLICY")


def shared_file(path: Path) -> Path:
    """Return ``path``, or skip the test when ``../shared`` is not beside this checkout."""
    if not path.is_file():
        pytest.skip(f"needs {path} (the read-only ../shared folder), which this machine lacks")
    return path


# Seconds allowed to a test that uses the SFT fixture, the fixture's training included.
SFT_TIMEOUT = 900


# The longest tests that do not learn from the SFT fixture, longest first (`--durations`).
# pytest-xdist hands each worker two tests at the start: the SFT fixture's first user and the
# third in this order share the first worker, so the third is a short one.
LONGEST = ("command_runs[demo]", "command_runs[notebooks]", "lora_policy_raises", "trpo_raises")


def _order(item) -> tuple[int, int]:
    """Where a test goes in the queue pytest-xdist's workers take tests from: the SFT fixture's
    first user (one worker trains the fixture), then the longest other tests (the other worker
    takes them meanwhile), the fixture's other users, the rest of the slow tests, and the quick
    tests last to even out the workers' ends."""
    if "sft_policy" in getattr(item, "fixturenames", ()):
        return (2, 0)
    rank = next((n for n, name in enumerate(LONGEST) if name in item.nodeid), None)
    if rank is not None:
        return (1, rank)
    return (3, 0) if item.get_closest_marker("slow") else (4, 0)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the order
def pytest_collection_modifyitems(items):
    """Every test that learns from the SFT fixture is slow (``-m "not slow"`` skips them), and
    the long tests go first (``_order``).

    pytest-timeout counts a session fixture's setup toward the first test that asks for it, and
    a pytest-xdist worker may wait for the other to train the fixture, so these tests get a limit
    of their own."""
    learners = [item for item in items if "sft_policy" in getattr(item, "fixturenames", ())]
    for item in learners:
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.timeout(SFT_TIMEOUT))
    first = learners[0] if learners else None
    items.sort(key=lambda item: (0, 0) if item is first else _order(item))  # stable: collection order within


# Torch threads per process: at most 2, and the cores shared out among pytest-xdist's workers.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def limit_threads() -> None:
    """At most ``THREADS`` torch threads in this process."""
    torch.set_num_threads(min(torch.get_num_threads(), THREADS))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    limit_threads()


@pytest.fixture
def tiny_model() -> ShrayGPT:
    """A random 2-layer, 4-expert model in eval mode (dropout off)."""
    torch.manual_seed(0)
    return ShrayGPT(**tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``tiny_hf(kind, vocabulary="byte", template=None)``: the folder of a tiny random GPT-Neo, OPT
    or Llama model with its tokenizer (``bench/tiny_hf.py``; with ``template``, ``chatml`` or
    ``inst``, an instruct model's chat template), written once per session."""
    from shraygpt_rl.bench.tiny_hf import tiny_hf_model

    made: dict[tuple[str, str, str | None], Path] = {}

    def make(kind: str, vocabulary: str = "byte", template: str | None = None) -> Path:
        if vocabulary == "r50k":
            shared_file(R50K_FILE)
        key = (kind, vocabulary, template)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{kind}-{vocabulary}-{template}")
            made[key] = tiny_hf_model(kind, folder, vocabulary, template=template)
        return made[key]

    return make


@pytest.fixture
def perturb_adapters():
    """``perturb_adapters(model)``: give every LoRA adapter a random non-zero B, so that the
    adapters change the model's outputs (a fresh adapter, B = 0, changes nothing)."""

    def perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)

    return perturb


@pytest.fixture
def course_ckpt() -> Path:
    return shared_file(COURSE_CKPT)


@pytest.fixture
def course_expected() -> dict:
    return torch.load(shared_file(COURSE_EXPECTED), weights_only=True)


@pytest.fixture
def r50k_file() -> Path:
    return shared_file(R50K_FILE)


@pytest.fixture
def hh_sample() -> Path:
    return shared_file(HH_SAMPLE)


def fails(capsys, argv: list[str]) -> str:
    """Run ``train.py`` with ``argv``, which must stop with exit code 2; return its one sentence."""
    from shraygpt_rl.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2, message
    assert message.startswith("error: ") and message.endswith(".") and message.count(". ") <= 1, message
    return message.removeprefix("error: ")


def tiny_trainer(max_steps: int, **kwargs):
    """A quiet CPU Trainer for stage tests."""
    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        check_val_every_n_epoch=None,
        val_check_interval=max(max_steps, 1),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# Small, fast data: the arithmetic task without the system prompt, short sequences.
ARITH = dict(
    source="arithmetic",
    digits=2,
    system_prompt=None,
    max_length=64,
    max_prompt_length=48,
    val_size=64,
    test_size=64,
    batch_size=32,
)


@pytest.fixture(scope="session")
def random_policy(tmp_path_factory) -> str:
    """A random tiny policy checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "random.ckpt"
    ShrayGPT(**tiny_config()).save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory) -> str:
    """The policy ``configs/sft.yaml`` makes in ``FIXTURE_STEPS`` steps (about 2 minutes at one
    thread): a tiny model fine-tuned on noisy arithmetic demonstrations (40% carry slips). Its
    greedy answers are mostly right, its sampled ones right about 40% of the time: room for
    online RL. Trained once per run: the first
    pytest-xdist worker to ask trains it under a file lock, the other waits for it and reads it,
    so the learning tests run on both workers."""
    from filelock import FileLock

    from shraygpt_rl.data import SFTDataModule
    from shraygpt_rl.stages.sft import SFTStage

    if SFT_POLICY:
        return SFT_POLICY
    run = tmp_path_factory.getbasetemp()  # the workers' common folder is its parent, this run's alone
    path = (run.parent if os.environ.get("PYTEST_XDIST_WORKER") else run) / f"sft-{LEARNING_SEED}.ckpt"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            # One thread, as the thresholds' SFT policies were trained (train.py at one thread),
            # whatever the machine: a session fixture runs before ``_deterministic`` sets threads.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            L.seed_everything(LEARNING_SEED)
            stage = SFTStage(**{**config_section(SFT_CONFIG, "model"), "export_path": str(path)})
            data = data_from_config(SFTDataModule, SFT_CONFIG)
            try:
                tiny_trainer(FIXTURE_STEPS, limit_val_batches=0).fit(stage, datamodule=data)
            finally:
                torch.set_num_threads(threads)
    return str(path)


@pytest.fixture(scope="session")
def right_answers():
    """The demo's 200 held-out validation prompts with their right answers (demonstrations without
    the SFT noise): what ``held_out_success`` scores."""
    from shraygpt_rl.bench import demo_data
    from shraygpt_rl.data import SFTDataModule

    data = demo_data(SFTDataModule, wrong_fraction=0.0, train_size=1)  # the splits do not depend on train_size
    data.setup()
    return data


@pytest.fixture(scope="session")
def held_out_success(right_answers):
    """``held_out_success(policy)``: the learning tests' outcome, the expected verifier success of
    one answer sampled at T = 1 on the 200 held-out prompts, without the sampling noise (the
    probability of the right answer, ``answer_probability``)."""
    from shraygpt_rl.evaluate import answer_probability

    def success(policy) -> float:
        torch.set_num_threads(min(torch.get_num_threads(), THREADS))
        return answer_probability(policy, right_answers, "val")

    return success


@pytest.fixture(scope="session")
def sft_success(sft_policy, held_out_success) -> float:
    """The SFT fixture's ``held_out_success``: the "before" of every learning test."""
    return held_out_success(ShrayGPT.load_from_checkpoint(sft_policy))


def learned(name: str, before: float, after: float) -> None:
    """Print a learning test's outcome in one greppable line (``pytest -s``), the figures its
    threshold comes from."""
    print(f"\nLEARNING {name} seed={LEARNING_SEED} threads={torch.get_num_threads()} {before:.3f} -> {after:.3f}")


class SpreadReward:
    """A reward with spread on a random policy's output: the share of ASCII letters and digits
    among the first 8 characters (or a constant, for groups without signal)."""

    weight = 1.0
    name = "spread"

    def __init__(self, constant: bool = False):
        self.constant = constant

    def __call__(self, prompts, responses, metadata):
        if self.constant:
            return torch.full((len(responses),), 0.5)
        return torch.tensor([sum(c.isascii() and c.isalnum() for c in r[:8]) / 8 for r in responses])


class SomeTies(SpreadReward):
    """``SpreadReward`` on half the prompts (by a hash of the text), a constant on the others:
    Online DPO then has ties on some prompts and not on others, and their number differs from
    batch to batch (and from rank to rank under DDP)."""

    name = "some_ties"

    def __call__(self, prompts, responses, metadata):
        spread = super().__call__(prompts, responses, metadata)
        tied = torch.tensor([sum(map(ord, p)) % 2 == 0 for p in prompts])
        return torch.where(tied, torch.full_like(spread, 0.5), spread)


def fit_online(stage, max_steps: int, prompts: dict, callbacks=()) -> dict[str, float]:
    """Fit an online stage on seeded prompts; return the last logged metrics as floats."""
    from shraygpt_rl.data import PromptDataModule

    L.seed_everything(0)
    trainer = tiny_trainer(max_steps, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(stage, datamodule=PromptDataModule(**prompts))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


class GradRecorder(L.Callback):
    """A copy of every gradient just before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class PoisonGradient(L.Callback):
    """After each backward of optimizer step ``step``, one gradient entry becomes NaN (a finite
    loss with a non-finite gradient); ``before``/``after`` keep the trainable weights around it."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None

    def _weights(self, module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.before is None:
            self.before = self._weights(pl_module)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.after is None:
            self.after = self._weights(pl_module)


def record_rollouts(stage, monkeypatch) -> list:
    """Make an online ``stage`` keep every rollout it samples, in the returned list."""
    rollouts, rollout = [], stage.rollout

    def recording(*args, **kwargs):
        rollouts.append(rollout(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(stage, "rollout", recording)
    return rollouts


class Echo(Environment):
    """A tool environment for tests: a call is any text ending in ``stop`` (one byte a random
    model samples often, see ``frequent_byte``), answered with ``answer`` (a string, or a
    function of the text so far)."""

    def __init__(self, stop: str = "a", answer="<r>"):
        super().__init__()
        self.stop, self.answer = stop, answer

    def step(self, prompt, text, metadata):
        if not text.endswith(self.stop):
            return None
        self.calls += 1
        return self.answer(text) if callable(self.answer) else self.answer


class ByteTokenizer:
    """The byte encoding with another EOS (a token a random model emits), and with ``stop_tokens``
    (when given) the tokens that all end a response, as an instruct model's tokenizer has them;
    ids from ``n_vocab`` on are not the tokenizer's (``decode`` skips them)."""

    def __init__(self, eot_token: int = 256, stop_tokens: tuple[int, ...] | None = None, n_vocab: int = 256):
        self.base, self.eot_token, self.n_vocab = byte_encoding(), eot_token, n_vocab
        if stop_tokens is not None:  # tiktoken's encodings have no such attribute
            self.stop_tokens = stop_tokens

    def encode_ordinary(self, text):
        return self.base.encode_ordinary(text)

    def decode(self, ids):
        return self.base.decode([i for i in ids if i < self.n_vocab])


def frequent_byte(responses: torch.Tensor) -> str:
    """The printable byte that sampled ``responses`` (B, N) hold most often: a stop string that
    rollouts of the same model will hit."""
    tokens = [t for t in responses.flatten().tolist() if 33 <= t < 127]
    return chr(max(set(tokens), key=tokens.count))


def scripted_sampler(k: int, calls: list):
    """A stand-in for ``sample_and_decode``: sample ``j`` of a prompt whose sum is ``t`` is right
    when ``j < t % (k + 1)``, else ``Answer: t + 1``; so each prompt's correct count is known."""

    def sample(policy, ids, mask, tokenizer, max_new_tokens, **options):
        calls.append(ids.size(0))
        texts = []
        for row, (prompt, real) in enumerate(zip(ids, mask)):
            target = arithmetic_target(tokenizer.decode(prompt[real.bool()].tolist()))
            right = row % k < target % (k + 1)
            texts.append(f"Answer: {target if right else target + 1}")
        return None, texts

    return sample


def scripted_over_real(k: int, calls: list):
    """``scripted_sampler``'s answers on the real ``sample_and_decode``'s output (its tokens,
    lengths and log-probabilities), so that ``evaluate_policy`` runs whole on texts whose right
    answers are known."""
    from shraygpt_rl import evaluate

    scripted, real = scripted_sampler(k, calls), evaluate.sample_and_decode

    def sample(policy, ids, mask, tokenizer, max_new_tokens, **options):
        out, _ = real(policy, ids, mask, tokenizer, max_new_tokens, **options)
        return out, scripted(policy, ids, mask, tokenizer, max_new_tokens, **options)[1]

    return sample


def naive_ordinal_alpha(table) -> float:
    """Krippendorff's ordinal alpha by the book: the coincidence matrix of pairable values, the
    ordinal metric from the marginals, 1 - D_o / D_e. Loops, no library."""
    values = sorted({v for row in table for v in row if v is not None})
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in zip(*table):
        present = [v for v in unit if v is not None]
        if len(present) < 2:
            continue
        for i, j in itertools.permutations(range(len(present)), 2):
            o[index[present[i]], index[present[j]]] += 1 / (len(present) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()

    def delta2(c: int, k: int) -> float:
        low, high = min(c, k), max(c, k)
        return (n_c[low : high + 1].sum() - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c, k] * delta2(c, k) for c in range(len(values)) for k in range(len(values)))
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in range(len(values)) for k in range(len(values))) / (n - 1)
    return 1 - observed / expected


class RobotLabellers:
    """Stands in for the labelling page's server (``make_server``): instead of serving, each of
    ``names`` judges every item the app gives them (their n-th with ``choice(n)``, rated on
    ``criteria``), then it stops."""

    names = ("ann", "bob", "cat")
    criteria: dict[str, str] = {}

    @staticmethod
    def choice(n: int) -> str:
        return "B++" if n % 3 == 0 else "A+"

    def __init__(self, host, port, app, threaded=True):
        self.client = app.test_client()

    def serve_forever(self):
        for name in self.names:
            who = {"X-Labeller": name}
            state = self.client.get("/api/state", headers=who).get_json()
            n = 0
            while state["item"] is not None:
                body = {"item": state["item"]["id"], "choice": self.choice(n), "criteria": self.criteria}
                state = self.client.post("/api/judge", json=body, headers=who).get_json()
                n += 1

    def server_close(self):
        pass


class OtherRank:
    """A stand-in strategy for a second DDP rank whose tensor is ``value``: ``reduce`` (a mean over
    the ranks) averages this rank's with it."""

    def __init__(self, value: float):
        self.value = value

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert reduce_op == "mean"
        return (tensor + self.value) / 2
