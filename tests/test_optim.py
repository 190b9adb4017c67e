"""Optimizers: the Muon/AdamW split, MuonAdamW equivalence, state round trips, learning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shraygpt_rl.model import ShrayGPT, tiny_config
from shraygpt_rl.optim import Muon, MuonAdamW, build_optimizer, newton_schulz, split_params_for_muon


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _loss(model, ids):
    logits, _, aux = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)) + 0.01 * aux


def test_split_sends_hidden_matrices_to_muon(tiny_model):
    muon, adamw = split_params_for_muon(tiny_model)
    muon_names, adamw_names = _names(tiny_model, muon), _names(tiny_model, adamw)
    assert "tok_emb.weight" in adamw_names and "head.weight" in adamw_names
    assert "layers.0.mha.k_expand" in adamw_names and "layers.1.norm2.weight" in adamw_names
    assert "layers.0.mha.wq.weight" in muon_names and "layers.1.moe.experts.3.w3.weight" in muon_names
    assert "layers.0.moe.gate.weight" in muon_names and "layers.0.moe.shared_expert.w2.weight" in muon_names
    assert all(p.ndim == 2 for p in muon)
    assert len(muon) + len(adamw) == len(list(tiny_model.parameters()))


def test_split_matches_the_course_except_for_the_embedding(course_ckpt):
    """The course's Muon group (from its optimizer state) is ours plus tok_emb (see optim.py)."""
    ckpt = torch.load(course_ckpt, weights_only=True)
    course_muon = [s["momentum_buffer"].shape for s in ckpt["optimizer_states"][0]["state"].values()]
    model = ShrayGPT.load_from_checkpoint(course_ckpt)
    muon, adamw = split_params_for_muon(model)
    assert sorted(course_muon) == sorted([p.shape for p in muon] + [model.tok_emb.weight.shape])
    assert len(adamw) == len(ckpt["optimizer_states"][1]["state"]) + 1  # + tok_emb


def test_muon_adamw_steps_exactly_like_the_two_optimizers(tiny_model):
    ids = torch.randint(0, 320, (2, 12))
    twin = copy.deepcopy(tiny_model)
    combined = build_optimizer(tiny_model, "muon_adamw", lr=1e-3, muon_lr=2e-3)
    muon_params, adamw_params = split_params_for_muon(twin)
    separate = [
        Muon(muon_params, lr=2e-3, weight_decay=0.0),
        torch.optim.AdamW(adamw_params, lr=1e-3, weight_decay=0.01),
    ]
    for _ in range(3):
        _loss(tiny_model, ids).backward()
        combined.step()
        combined.zero_grad()
        _loss(twin, ids).backward()
        for opt in separate:
            opt.step()
            opt.zero_grad()
    for a, b in zip(tiny_model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_resumes_exactly(tiny_model):
    ids = torch.randint(0, 320, (2, 12))
    twin = copy.deepcopy(tiny_model)
    opt = build_optimizer(tiny_model)
    for _ in range(2):
        _loss(tiny_model, ids).backward()
        opt.step()
        opt.zero_grad()
    resumed_model = copy.deepcopy(tiny_model)
    resumed = build_optimizer(resumed_model)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, optimizer in ((tiny_model, opt), (resumed_model, resumed)):
        _loss(model, ids).backward()
        optimizer.step()
    for a, b in zip(tiny_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(tiny_model.parameters(), twin.parameters()))


def test_lr_scheduler_drives_both_inner_optimizers(tiny_model):
    opt = build_optimizer(tiny_model, lr=1e-3, muon_lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt._muon.param_groups] == [5e-3]
    assert [g["lr"] for g in opt._adamw.param_groups] == [5e-4]
    assert sched.get_last_lr() == [5e-3, 5e-4]


def test_adamw_and_unknown_names(tiny_model):
    opt = build_optimizer(tiny_model, "adamw", lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_model.parameters()))
    with pytest.raises(ValueError, match="Unknown optimizer"):
        build_optimizer(tiny_model, "sgd")


def test_frozen_trunk_leaves_only_adamw(tiny_model):
    for name, p in tiny_model.named_parameters():
        p.requires_grad_(name == "head.weight")
    assert type(build_optimizer(tiny_model)) is torch.optim.AdamW


@pytest.mark.parametrize("name", ["muon_adamw", "adamw"])
def test_optimizers_fit_a_batch(name):
    torch.manual_seed(0)
    model = ShrayGPT(**tiny_config())
    ids = torch.randint(0, 320, (4, 16))
    opt = build_optimizer(model, name, lr=3e-3, muon_lr=2e-2)
    first = _loss(model, ids).item()
    for _ in range(25):
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert _loss(model, ids).item() < 0.5 * first
    assert isinstance(opt, MuonAdamW) == (name == "muon_adamw")


def test_muon_in_bf16_is_torchs_muon_exactly():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(30, 12)), torch.nn.Parameter(torch.randn(8, 20))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_float32_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(64, 16)
    o = newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(o)
    assert o.shape == g.shape and (singular > 0.5).all() and (singular < 1.5).all()  # US'V^T, S' ~ U(0.5, 1.5)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.95
