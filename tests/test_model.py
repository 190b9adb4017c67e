"""ShrayGPT: course parity, padding and caching invariance, sparse MoE, checkpoints."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from shraygpt_rl.checkpoint import CheckpointError
from shraygpt_rl.layers import MoE, apply_rope, rope_freqs
from shraygpt_rl.model import ShrayGPT, tiny_config


# ---------------------------------------------------------------------------------------------
# Parity with the course's own outputs (../shared fixture)
# ---------------------------------------------------------------------------------------------
def test_course_checkpoint_logits_and_aux_loss_match(course_ckpt, course_expected):
    model = ShrayGPT.load_from_checkpoint(course_ckpt, map_location="cpu").eval()
    with torch.no_grad():
        logits, caches, aux_loss = model(course_expected["input_ids"])
    assert (logits - course_expected["logits"]).abs().max() <= 1e-4
    assert abs(aux_loss.item() - course_expected["aux_loss"].item()) <= 1e-5
    assert len(caches) == model.config["n_layers"]


def test_course_checkpoint_cached_greedy_decoding_matches(course_ckpt, course_expected):
    model = ShrayGPT.load_from_checkpoint(course_ckpt).eval()
    prompt, expected = course_expected["greedy_prompt"], course_expected["greedy_output"]
    out = model.generate(prompt, expected.size(1) - prompt.size(1), top_k=1)
    assert torch.equal(out.sequences, expected)


def test_course_hyper_parameters_are_kept(course_ckpt):
    model = ShrayGPT.load_from_checkpoint(course_ckpt)
    assert model.aux_loss_weight == 0.01
    assert model.config["learning_rate_muon"] == 0.0015  # extra keys survive a round trip


def test_saved_checkpoint_has_the_course_names_and_shapes(course_ckpt, tmp_path):
    course = torch.load(course_ckpt, weights_only=True)["state_dict"]
    model = ShrayGPT.load_from_checkpoint(course_ckpt)
    model.save_checkpoint(tmp_path / "out.ckpt")
    saved = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert {k: v.shape for k, v in saved["state_dict"].items()} == {k: v.shape for k, v in course.items()}
    assert all(torch.equal(saved["state_dict"][k], course[k]) for k in course)


class CourseShrayGPT(L.LightningModule):
    """Stands in for the course's LightningModule: same constructor and attribute names."""

    def __init__(
        self, vocab_size, block_size, d_model, n_head, d_head, n_layers, num_experts, num_experts_per_tok, dropout=0.0
    ):
        super().__init__()
        self.save_hyperparameters()
        inner = ShrayGPT(vocab_size, block_size, d_model, n_head, d_head, n_layers, num_experts, num_experts_per_tok)
        self.tok_emb, self.layers, self.ln_f, self.head = inner.tok_emb, inner.layers, inner.ln_f, inner.head


def test_lightning_load_from_checkpoint_reads_what_we_save(tiny_model, tmp_path):
    path = tmp_path / "shraygpt-instruct.ckpt"
    tiny_model.save_checkpoint(path)
    course = CourseShrayGPT.load_from_checkpoint(path, map_location="cpu", strict=True)
    assert torch.equal(course.head.weight, tiny_model.head.weight)
    assert course.hparams.n_layers == tiny_model.config["n_layers"]


def test_checkpoint_errors_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        ShrayGPT.load_from_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        ShrayGPT.load_from_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a ShrayGPT policy checkpoint"):
        ShrayGPT.load_from_checkpoint(tmp_path / "other.ckpt")


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False])
def test_rope_rotates_interleaved_pairs(grad):
    B, T, h, D = 2, 5, 3, 8
    x = torch.randn(B, T, h, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 7, 8, 9, 12]])
    with torch.set_grad_enabled(grad):
        out = apply_rope(x, rope_freqs(positions, D))  # (B, h, T, D)
    expected = torch.empty(B, h, T, D)
    for b in range(B):
        for t in range(T):
            for j in range(D // 2):
                angle = positions[b, t].item() * 10000 ** (-2 * j / D)
                c, s = math.cos(angle), math.sin(angle)
                x1, x2 = x[b, t, :, 2 * j], x[b, t, :, 2 * j + 1]
                expected[b, :, t, 2 * j] = x1 * c - x2 * s
                expected[b, :, t, 2 * j + 1] = x1 * s + x2 * c
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Padding and caching
# ---------------------------------------------------------------------------------------------
def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def test_left_padded_rows_give_their_unpadded_logits(tiny_model):
    rows = [torch.randint(0, 320, (n,)) for n in (9, 17, 4)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        logits, _, _ = tiny_model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone, _, _ = tiny_model(row[None])
            assert (logits[i, -len(row) :] - alone[0]).abs().max() <= 1e-4


def test_padding_content_changes_nothing(tiny_model):
    rows = [torch.randint(0, 320, (n,)) for n in (12, 5)]
    ids_a, mask = _left_pad(rows, pad_id=0)
    ids_b = torch.where(mask.bool(), ids_a, torch.randint(0, 320, ids_a.shape))
    with torch.no_grad():
        logits_a, _, aux_a = tiny_model(ids_a, attention_mask=mask)
        logits_b, _, aux_b = tiny_model(ids_b, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(logits_a[real], logits_b[real], atol=1e-6)
    assert torch.allclose(aux_a, aux_b)  # padding stays out of the load-balancing statistics


def test_right_padding_also_works(tiny_model):
    row = torch.randint(0, 320, (10,))
    ids = torch.cat([row, torch.zeros(6, dtype=torch.long)])[None]
    mask = torch.cat([torch.ones(10), torch.zeros(6)]).long()[None]
    with torch.no_grad():
        padded, _, _ = tiny_model(ids, attention_mask=mask)
        alone, _, _ = tiny_model(row[None])
    assert (padded[0, :10] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_matches_one_full_forward(tiny_model, padded):
    rows = [torch.randint(0, 320, (n,)) for n in ((14, 8) if padded else (14, 14))]
    ids, mask = _left_pad(rows)
    split = 6
    with torch.no_grad():
        full, _, _ = tiny_model(ids, attention_mask=mask)
        caches = tiny_model.new_kv_caches(ids.size(0), ids.size(1))
        step, caches, _ = tiny_model(ids[:, :split], caches, attention_mask=mask[:, :split])
        pieces = [step]
        for t in range(split, ids.size(1)):
            step, caches, _ = tiny_model(ids[:, t : t + 1], caches, attention_mask=mask[:, : t + 1])
            pieces.append(step)
    real = mask.bool()
    assert (torch.cat(pieces, dim=1)[real] - full[real]).abs().max() <= 1e-5


def test_returned_cache_grows_like_the_course_cache(tiny_model):
    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        full, _, _ = tiny_model(ids)
        _, caches, _ = tiny_model(ids[:, :7])
        rest, caches, _ = tiny_model(ids[:, 7:], caches, start_pos=7)
    assert (rest - full[:, 7:]).abs().max() <= 1e-5
    assert caches[0].k.shape == (2, 10, 64)  # the latent, not per-head keys


def test_attention_mask_shape_is_checked(tiny_model):
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        tiny_model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_bad_head_config_is_refused():
    with pytest.raises(ValueError, match="n_head \\* d_head must equal d_model"):
        ShrayGPT(**tiny_config(n_head=3))


def test_logits_to_keep_returns_the_last_positions(tiny_model):
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        full, _, _ = tiny_model(ids)
        last, _, _ = tiny_model(ids, logits_to_keep=1)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------
def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: softmax, top-k, renormalise, weighted experts plus the shared expert."""
    out = []
    for token in x.reshape(-1, x.size(-1)):
        probs = moe.gate(token).float().softmax(-1)
        weights, experts = probs.topk(moe.top_k)
        weights = weights / weights.sum()
        y = moe.shared_expert(token)
        for w, e in zip(weights, experts):
            y = y + w * moe.experts[int(e)](token)
        out.append(y)
    return torch.stack(out).view_as(x)


def test_sparse_moe_equals_dense_and_a_per_token_loop():
    torch.manual_seed(1)
    moe = MoE(32, num_experts=4, num_experts_per_tok=2)
    x = torch.randn(3, 7, 32)
    sparse, aux_sparse = moe(x)
    moe.dense = True
    dense, aux_dense = moe(x)
    with torch.no_grad():
        naive = _naive_moe(moe, x)
    assert (sparse - naive).abs().max() <= 1e-5
    assert (dense - naive).abs().max() <= 1e-5
    assert torch.allclose(aux_sparse, aux_dense)


def test_sparse_moe_gradients_equal_dense():
    torch.manual_seed(2)
    moe = MoE(16, num_experts=4, num_experts_per_tok=2)
    x = torch.randn(2, 9, 16)
    grads = []
    for dense in (False, True):
        moe.zero_grad()
        moe.dense = dense
        y, aux = moe(x)
        (y.square().sum() + aux).backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_aux_loss_matches_hand_computation():
    moe = MoE(4, num_experts=2, num_experts_per_tok=1)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    top1 = torch.tensor([0, 0, 1])
    # importance = (0.5667, 0.4333), load = (2/3, 1/3): 2 * (0.5667*2/3 + 0.4333/3) = 1.04444
    assert moe.aux_loss(probs, top1).item() == pytest.approx(2 * (1.7 / 3 * 2 / 3 + 1.3 / 3 / 3), abs=1e-6)


def test_moe_reports_expert_load_and_router_entropy():
    moe = MoE(8, num_experts=4, num_experts_per_tok=2)
    with torch.no_grad():
        moe.gate.weight.zero_()  # uniform routing: entropy log(4)
    moe(torch.randn(5, 8))
    assert moe.router_entropy.item() == pytest.approx(math.log(4), abs=1e-5)
    with torch.no_grad():  # experts 2 then 3 always win
        moe.gate.weight.zero_()
        moe.gate.weight[2, 0], moe.gate.weight[3, 0] = 10.0, 5.0
    moe(torch.ones(5, 8))
    assert moe.expert_load.tolist() == [0.0, 0.0, 0.5, 0.5]


def test_model_moe_stats_cover_every_layer(tiny_model):
    with torch.no_grad():
        tiny_model(torch.randint(0, 320, (2, 8)))
    stats = tiny_model.moe_stats()
    assert stats["load"].shape == (2, 4)
    assert torch.allclose(stats["load"].sum(-1), torch.ones(2))
    assert (stats["router_entropy"] > 0).all() and (stats["router_entropy"] <= math.log(4) + 1e-6).all()


def test_moe_gradient_reaches_the_router_through_the_aux_loss():
    moe = MoE(8, num_experts=4, num_experts_per_tok=2)
    _, aux = moe(torch.randn(6, 8))
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_model_trains_with_the_aux_loss(tiny_model):
    tiny_model.train()
    ids = torch.randint(0, 320, (4, 16))
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits, _, aux = tiny_model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 320), ids[:, 1:].reshape(-1))
        (loss + tiny_model.aux_loss_weight * aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # memorises a fixed batch


def test_bf16_autocast_and_bf16_weights_run(tiny_model):
    ids = torch.randint(0, 320, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        reference, _, _ = tiny_model(ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _, aux = tiny_model(ids, attention_mask=mask)
            out = tiny_model.generate(ids, 4, attention_mask=mask, top_k=1)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(aux)
    assert (logits.float() - reference)[mask.bool()].abs().max() < 0.05
    # Greedy decoding under autocast picks the autocast forward's argmax as its first token.
    assert torch.equal(out.sequences[:, 12], logits[:, -1].argmax(-1))
    half = tiny_model.to(torch.bfloat16)
    out = half.generate(ids, 4, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.logprobs).all() and out.logprobs.dtype == torch.float32
