"""The rollout engine: batched = row by row, per-row EOS (or any of several stop tokens), sampling
logprobs, seeding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ByteTokenizer

from shraygpt_rl.generation import response_logprobs, sample_and_decode, sample_categorical, sample_next_token


def _left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("eos", [None, 7])
def test_batched_greedy_equals_row_by_row(tiny_model, eos):
    rows = [torch.randint(0, 320, (n,)) for n in (5, 11, 8)]
    ids, mask = _left_pad(rows)
    batched = tiny_model.generate(ids, 12, top_k=1, attention_mask=mask, eos_token_id=eos)
    for i, row in enumerate(rows):
        alone = tiny_model.generate(row[None], 12, top_k=1, eos_token_id=eos)
        n = alone.response_mask.sum().item()
        assert torch.equal(batched.responses[i, :n], alone.responses[0, :n])
        assert batched.response_mask[i].sum().item() == n


def _two_stops(responses: torch.Tensor) -> tuple[int, int]:
    """Two tokens a free run (B, N) samples: row 0's 4th and row 1's 3rd, so that rows end at either."""
    stops = int(responses[0, 3]), int(responses[1, 2])
    assert stops[0] != stops[1]
    return stops


def _first_stop(row: torch.Tensor, stops) -> int:
    """The length of ``row`` (N,) up to and including its first stop token (N if none)."""
    hits = torch.isin(row, torch.tensor(stops)).nonzero()[:, 0]
    return int(hits[0]) + 1 if len(hits) else row.numel()


SAMPLED = [dict(top_k=1), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLED)
def test_rows_end_at_whichever_stop_token_comes_first(tiny_model, sampling):
    """With two stop ids (an end-of-turn token besides EOS) a row ends at the first of either; the
    static and eager loops agree; ``response_mask`` covers the stop token and nothing after it."""
    ids, mask = _left_pad([torch.randint(0, 320, (n,)) for n in (5, 11, 8, 3, 6, 9)])

    def run(static=None, **options):
        g = torch.Generator().manual_seed(0)
        return tiny_model.generate(
            ids, 24, attention_mask=mask, generator=g, engine=("static" if static else "eager"), **sampling, **options
        )

    free = run()
    stops = _two_stops(free.responses)
    static, eager = run(True, eos_token_id=stops), run(False, eos_token_id=list(stops))
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.equal(static.attention_mask, eager.attention_mask)
    assert torch.equal(static.response_mask, eager.response_mask)
    assert torch.allclose(static.logprobs, eager.logprobs, atol=1e-5)
    ended_at = set()
    for i in range(len(ids)):
        n = _first_stop(free.responses[i], stops)
        assert torch.equal(static.responses[i, :n], free.responses[i, :n])
        assert static.response_mask[i, :n].all() and not static.response_mask[i, n:].any()
        assert (static.responses[i, n:] == stops[0]).all()  # padded with the first stop id
        assert (static.logprobs[i, n:] == 0).all()
        end = int(free.responses[i, n - 1])
        ended_at |= {end} if end in stops else set()
    assert ended_at == set(stops)  # rows ended at each of them
    assert static.responses.size(1) == max(_first_stop(r, stops) for r in free.responses)


@pytest.mark.parametrize("static", [True, False])
def test_batched_equals_row_by_row_with_two_stop_tokens(tiny_model, static):
    rows = [torch.randint(0, 320, (n,)) for n in (5, 11, 8, 3)]
    ids, mask = _left_pad(rows)
    stops = _two_stops(tiny_model.generate(ids, 16, top_k=1, attention_mask=mask).responses)
    batched = tiny_model.generate(
        ids, 16, top_k=1, attention_mask=mask, eos_token_id=stops, engine=("static" if static else "eager")
    )
    lengths = batched.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and int(lengths.min()) < 16  # rows ended at different steps
    for i, row in enumerate(rows):
        alone = tiny_model.generate(
            row[None], 16, top_k=1, eos_token_id=stops, engine=("static" if static else "eager")
        )
        n = int(alone.response_mask.sum())
        assert n == int(lengths[i])
        assert torch.equal(batched.responses[i, :n], alone.responses[0, :n])


@pytest.mark.parametrize("static", [True, False])
def test_a_training_forward_recovers_the_logprobs_of_rows_ended_by_either_stop(tiny_model, static):
    ids, mask = _left_pad([torch.randint(0, 320, (n,)) for n in (4, 9, 6, 12)])
    g = torch.Generator()
    stops = _two_stops(
        tiny_model.generate(ids, 20, temperature=0.9, attention_mask=mask, generator=g.manual_seed(2)).responses
    )
    out = tiny_model.generate(
        ids,
        20,
        temperature=0.9,
        attention_mask=mask,
        eos_token_id=stops,
        generator=g.manual_seed(2),
        engine=("static" if static else "eager"),
    )
    own = out.response_mask.bool()
    assert int(own.sum(1).min()) < out.responses.size(1)  # a row ended early: its padding is not scored
    with torch.no_grad():
        logprobs, _, _ = response_logprobs(tiny_model, out.sequences, out.attention_mask, out.prompt_length, 0.9)
    assert torch.allclose(logprobs[own], out.logprobs[own], atol=1e-5)
    assert (out.logprobs[~own] == 0).all()


def test_sample_and_decode_stops_at_every_stop_token_of_the_tokenizer(tiny_model):
    """An instruct tokenizer's ``stop_tokens`` end rows (not just its ``eot_token``), and each
    text ends before the row's stop token."""
    ids, mask = _left_pad([torch.randint(97, 123, (n,)) for n in (5, 8, 3, 6)])
    free = tiny_model.generate(ids, 24, top_k=1, attention_mask=mask)
    printable = [t for t in free.responses[:, :12].flatten().tolist() if 33 <= t < 127]
    stops = (printable[0], next(t for t in printable if t != printable[0]))
    out, texts = sample_and_decode(tiny_model, ids, mask, ByteTokenizer(stops[0], stops), 24, top_k=1)
    ended_at = set()
    for i, text in enumerate(texts):
        n = _first_stop(free.responses[i], stops)
        assert int(out.response_mask[i].sum()) == n
        ends = int(free.responses[i, n - 1]) in stops
        ended_at |= {int(free.responses[i, n - 1])} if ends else set()
        assert text == ByteTokenizer(stops[0], stops).decode(free.responses[i, : n - 1 if ends else n].tolist())
    assert ended_at == set(stops)


def test_temperature_zero_is_greedy(tiny_model):
    ids = torch.randint(0, 320, (2, 6))
    a = tiny_model.generate(ids, 8, top_k=1)
    b = tiny_model.generate(ids, 8, temperature=0.0)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logprobs == 0).all()  # a point mass


def test_rows_stop_at_their_own_eos(tiny_model):
    ids = torch.randint(0, 320, (3, 6))
    free = tiny_model.generate(ids, 10, top_k=1)
    eos = free.responses[0, 2].item()  # row 0 emits this token at step 3
    out = tiny_model.generate(ids, 10, top_k=1, eos_token_id=eos, pad_token_id=0)
    first = (free.responses == eos).float().argmax(dim=1)
    for i in range(3):
        ends = bool((free.responses[i] == eos).any())
        n = first[i].item() + 1 if ends else out.responses.size(1)
        assert out.response_mask[i, :n].all() and not out.response_mask[i, n:].any()
        assert torch.equal(out.responses[i, :n], free.responses[i, :n])
        assert (out.responses[i, n:] == 0).all()
    assert out.responses[0, 2].item() == eos


def test_loop_stops_when_every_row_has_ended(tiny_model):
    ids = torch.randint(0, 320, (1, 6))
    free = tiny_model.generate(ids, 10, top_k=1)
    out = tiny_model.generate(ids, 10, top_k=1, eos_token_id=free.responses[0, 3].item())
    assert out.sequences.shape == (1, 6 + 4)


def test_seeded_generator_is_reproducible(tiny_model):
    ids = torch.randint(0, 320, (4, 5))
    runs = [tiny_model.generate(ids, 10, generator=torch.Generator().manual_seed(s)).sequences for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 20, None), (1.3, None, 0.9)])
def test_logprobs_are_those_of_the_sampling_distribution(tiny_model, temperature, top_k, top_p):
    """A training-style forward over the whole sequence recovers the logprobs seen while sampling."""
    rows = [torch.randint(0, 320, (n,)) for n in (4, 9)]
    ids, mask = _left_pad(rows)
    out = tiny_model.generate(
        ids,
        10,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        attention_mask=mask,
        eos_token_id=5,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        logits, _, _ = tiny_model(out.sequences, attention_mask=out.attention_mask)
    P = out.prompt_length
    step_logits = logits[:, P - 1 : -1].float() / temperature  # (B, N, V): each predicts the next token
    if top_k is not None:
        kth = step_logits.topk(top_k, dim=-1).values[..., -1:]
        step_logits = step_logits.masked_fill(step_logits < kth, float("-inf"))
    if top_p is not None:
        probs, order = step_logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p
        step_logits = step_logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    recomputed = F.log_softmax(step_logits, -1).gather(-1, out.responses[..., None]).squeeze(-1)
    real = out.response_mask.bool()
    assert (recomputed[real] - out.logprobs[real]).abs().max() <= 1e-5
    assert (out.logprobs[~real] == 0).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    tokens, logprobs = sample_next_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    expected = torch.tensor([math.log(0.5 / 0.8), math.log(0.3 / 0.8)])
    assert torch.allclose(logprobs, expected[tokens], atol=1e-6)
    share = (tokens == 0).float().mean().item()
    assert abs(share - 0.625) < 0.05


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]]).expand(500, 4)
    tokens, _ = sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {1, 2}


def test_bad_arguments_are_refused(tiny_model):
    ids = torch.randint(0, 320, (1, 100))
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        tiny_model.generate(ids, 64)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tiny_model.generate(ids[:, :5], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        tiny_model.generate(ids[:, :5], 0)
    with pytest.raises(ValueError, match="top_p must be in"):
        tiny_model.generate(ids[:, :5], 4, top_p=0.0)


@pytest.mark.parametrize("vocab,block", [(10, 4), (1000, 256), (517, 256)])
def test_inverse_cdf_sampler_draws_each_index_in_proportion(vocab, block):
    V = vocab
    """Frequencies over 60k draws match the weights (a chi-square bound), zero weights are never
    drawn, whether or not the vocabulary is a multiple of the block."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(V, generator=g) ** 4  # uneven, unnormalised
    weights[torch.randperm(V, generator=g)[: V // 3]] = 0.0
    weights[-1] = 1.0  # the last block is padded: its padding must not repeat this weight
    draws = sample_categorical(weights.expand(60000, V), generator=g, block=block)
    counts = torch.bincount(draws, minlength=V).float()
    assert counts[weights == 0].sum() == 0
    expected = 60000 * weights / weights.sum()
    seen = expected > 0
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    dof = int(seen.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # about 5 standard deviations above the mean


def test_sampler_picks_a_lone_token_and_a_lone_block():
    weights = torch.zeros(3, 700)
    weights[0, 0] = 1.0
    weights[1, 699] = 5.0
    weights[2, 300:302] = 1e-30  # tiny but positive mass is still drawable
    draws = sample_categorical(weights, generator=torch.Generator().manual_seed(0))
    assert draws[0] == 0 and draws[1] == 699 and draws[2] in (300, 301)


@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_head_gives_the_same_logprobs_and_gradients(tiny_model, entropy):
    """The head and log-softmax run a few rows at a time, recomputed in the backward: the values
    and every parameter's gradient are those of the whole batch at once."""
    from shraygpt_rl.generation import response_logprobs

    ids, mask = _left_pad([torch.randint(0, 320, (n,)) for n in (9, 14, 5, 12, 7)])
    seqs = torch.cat([ids, torch.randint(0, 320, (5, 6))], dim=1)
    mask = torch.cat([mask, torch.ones(5, 6, dtype=torch.long)], dim=1)
    results = []
    for chunk in (None, 2):
        tiny_model.zero_grad()
        logprobs, ent, aux = response_logprobs(tiny_model, seqs, mask, ids.size(1), 0.8, entropy, chunk_rows=chunk)
        (logprobs.square().mean() + (ent.mean() if entropy else 0) + aux).backward()
        grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
        results.append((logprobs.detach(), None if ent is None else ent.detach(), grads))
    (a, ea, ga), (b, eb, gb) = results
    assert torch.allclose(a, b, atol=1e-6) and len(ga) == len(gb)
    assert entropy == (ea is not None) and (not entropy or torch.allclose(ea, eb, atol=1e-6))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


@pytest.mark.parametrize("backend", ["shraygpt", "opt", "opt-lora-reference"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_on_response_positions_equal_the_full_logits(tiny_hf, perturb_adapters, backend, average):
    """DPO's log-probabilities with the head on response positions only, in chunks of 5, against
    ``losses.sequence_logprobs`` of the whole forward's logits: values and gradients."""
    from shraygpt_rl.generation import sequence_logprobs as sparse
    from shraygpt_rl.lora import AdaptersDisabled, LoRASpec
    from shraygpt_rl.losses import sequence_logprobs as dense
    from shraygpt_rl.model import ShrayGPT, tiny_config
    from shraygpt_rl.policy import load_policy, with_lora

    torch.manual_seed(0)
    model = ShrayGPT(**tiny_config()) if backend == "shraygpt" else load_policy(str(tiny_hf("opt")))
    if backend == "opt-lora-reference":
        with_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0))
        perturb_adapters(model)
        model = AdaptersDisabled(model.eval())  # the policy is not its submodule: eval() first
    model.eval()
    ids = torch.randint(1, 256, (4, 12))
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding, as the pairs have it
    response = torch.zeros_like(ids)
    response[:, 6:] = 1
    response *= attention
    response[3] = 0  # a row with no response token
    params = [p for p in model.parameters() if p.requires_grad]  # none for the adapters-off reference
    ours, _ = sparse(model, ids, attention, response, average=average, chunk=5)
    theirs = dense(model(ids, attention_mask=attention)[0], ids, response, average=average)
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.detach()[3].item() == 0.0
    if params:
        grads = torch.autograd.grad(ours.sum(), params, allow_unused=True)
        expected = torch.autograd.grad(theirs.sum(), params, allow_unused=True)
        for a, b in zip(grads, expected):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)
