"""The sampler shared by the eager loop and the static decode step."""

from __future__ import annotations

import math

import torch

from shraygpt_rl.sampling import sample_next_token


def test_pre_drawn_uniforms_are_the_generators_draws():
    logits = torch.randn(6, 700)
    for options in (dict(), dict(top_k=30), dict(top_p=0.7), dict(top_k=30, top_p=0.5)):
        drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(3), **options)
        uniforms = torch.rand(6, 2, generator=torch.Generator().manual_seed(3))
        given = sample_next_token(logits, uniforms=uniforms, **options)
        assert torch.equal(drawn[0], given[0]) and torch.equal(drawn[1], given[1])


def test_top_k_keeps_exactly_k_tokens_even_with_ties():
    logits = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0]]).expand(4000, 5)  # three tie for 2nd place
    tokens, logprobs = sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    seen = set(tokens.tolist())
    assert len(seen) == 2 and 0 in seen  # the leader and one of the tied three, always the same one
    expected = torch.tensor([5.0, 1.0]).log_softmax(0)
    share = (tokens == 0).float().mean().item()
    assert abs(share - expected[0].exp().item()) < 0.02
    assert torch.allclose(logprobs[tokens == 0], expected[0]) and torch.allclose(logprobs[tokens != 0], expected[1])


def test_top_p_inside_top_k_renormalises_over_the_candidates():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log().expand(3000, 5)
    # top-3 leaves 0.4, 0.3, 0.2 (renormalised 4/9, 3/9, 2/9); top-p 0.7 of those keeps 4/9 + 3/9
    tokens, logprobs = sample_next_token(logits, top_k=3, top_p=0.7, generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(logprobs, torch.tensor([math.log(4 / 7), math.log(3 / 7)])[tokens], atol=1e-6)


def test_top_k_draws_each_candidate_in_proportion():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=g) * 2
    tokens, _ = sample_next_token(logits.expand(40000, 300), top_k=10, generator=g)
    values, indices = logits[0].topk(10)
    expected = values.softmax(0) * 40000
    counts = torch.tensor([(tokens == i).sum().item() for i in indices.tolist()], dtype=torch.float)
    assert counts.sum() == 40000  # nothing outside the top 10
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 9 + 5 * math.sqrt(18)
