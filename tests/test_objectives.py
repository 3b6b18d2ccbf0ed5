"""Objectives on hand-computable cases and against naive implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from evl.errors import EvlError
from evl.losses.functional import (
    HardNegatives,
    build_vtm_pairs,
    distill_loss,
    egonce_loss,
    egonce_positive_mask,
    mc_loss,
    mlm_loss,
    qa_loss,
    sample_hard_negatives,
    vtc_loss,
    vtm_loss,
)
from evl.models.layers import LogitScale


def test_logit_scale_init_and_clamp():
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(math.log(1000.0))
    assert s().item() == pytest.approx(100.0)
    s().backward()
    assert s.log_scale.grad.item() == 0.0  # clamped: no further sharpening


def test_logit_scale_gradient_is_scale():
    s = LogitScale(init_scale=2.0)
    s().backward()
    assert s.log_scale.grad.item() == pytest.approx(2.0)  # d exp(x)/dx = exp(x)


def test_vtc_hand_computed_two_items():
    # Orthogonal unit vectors, identical pairs: logits = scale * I.
    v = torch.eye(2)
    loss = vtc_loss(v, v.clone(), 1.0)
    expected = -math.log(math.e / (math.e + 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_vtc_normalises_features():
    v = torch.eye(2) * torch.tensor([[3.0], [0.5]])
    assert vtc_loss(v, v, 1.0).item() == pytest.approx(vtc_loss(torch.eye(2), torch.eye(2), 1.0).item())


def test_vtc_perfect_alignment_high_scale_near_zero():
    v = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))[
        0
    ].t()  # orthonormal rows
    assert vtc_loss(v, v, 100.0).item() < 1e-6


def test_vtc_matches_naive_and_accepts_module():
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    scale = LogitScale(init_scale=3.0)
    vn, tn = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
    sim = 3.0 * vn @ tn.t()
    naive = 0.0
    for i in range(5):
        naive += -math.log(sim[i].exp()[i] / sim[i].exp().sum()) - math.log(
            sim[:, i].exp()[i] / sim[:, i].exp().sum()
        )
    assert vtc_loss(v, t, scale).item() == pytest.approx(naive / 10, rel=1e-5)


def test_vtc_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(3, 8\)"):
        vtc_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)


def test_egonce_positive_mask():
    verbs = [["cut"], ["cut", "wash"], ["wash"], []]
    nouns = [["onion"], ["onion"], ["onion"], []]
    m = egonce_positive_mask(verbs, nouns)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_egonce_without_mask_equals_vtc():
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert egonce_loss(v, t, 5.0).item() == pytest.approx(vtc_loss(v, t, 5.0).item(), rel=1e-6)


def test_egonce_multi_positive_hand_computed():
    # All four features identical -> all logits equal (scale*1). With items 0,1 mutually positive:
    # rows 0,1: -log(2/4); rows 2,3: -log(1/4).
    v = torch.ones(4, 3)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    loss = egonce_loss(v, v, 10.0, positive_mask=mask)
    expected = (2 * math.log(2) + 2 * math.log(4)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_egonce_asymmetric_mask_uses_transpose_for_t2v():
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = True  # video 0 ~ text 2 only
    s = 2.0 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()
    pos = mask | torch.eye(3, dtype=torch.bool)
    v2t = -(torch.logsumexp(s.masked_fill(~pos, -1e9), 1) - torch.logsumexp(s, 1)).mean()
    t2v = -(torch.logsumexp(s.t().masked_fill(~pos.t(), -1e9), 1) - torch.logsumexp(s.t(), 1)).mean()
    assert egonce_loss(v, t, 2.0, mask).item() == pytest.approx(((v2t + t2v) / 2).item(), rel=1e-6)


def test_egonce_mask_shape_error():
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        egonce_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, torch.ones(2, 2, dtype=torch.bool))


def test_hard_negatives_exclude_positives_and_follow_softmax():
    sim = torch.tensor(
        [[0.0, 5.0, 0.0, -50.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2, 3] = mask[3, 2] = True
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(400):
        neg = sample_hard_negatives(sim, mask, generator=g)
        counts[torch.arange(4), neg.text_for_video] += 1
        assert (neg.text_for_video != torch.arange(4)).all()
        assert (neg.video_for_text != torch.arange(4)).all()
        assert neg.text_for_video[2] != 3 and neg.text_for_video[3] != 2
        assert neg.video_for_text[2] != 3 and neg.video_for_text[3] != 2
    # video 0: text 1 has probability e^5/(e^5+1) ≈ 0.993 among {1, 2} (3 is ~0); never text 3.
    assert counts[0, 1] > 370 and counts[0, 3] == 0


def test_hard_negatives_fallback_when_all_positive_and_b1_raises():
    sim = torch.zeros(3, 3)
    neg = sample_hard_negatives(
        sim, torch.ones(3, 3, dtype=torch.bool), generator=torch.Generator().manual_seed(1)
    )
    assert (neg.text_for_video != torch.arange(3)).all() and (neg.video_for_text != torch.arange(3)).all()
    with pytest.raises(EvlError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_build_vtm_pairs():
    neg = HardNegatives(video_for_text=torch.tensor([2, 0, 1]), text_for_video=torch.tensor([1, 2, 0]))
    vi, ti, labels = build_vtm_pairs(3, neg)
    assert vi.tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1]
    assert ti.tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_vtm_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 1])
    expected = (math.log(2) + -math.log(3 / 4)) / 2
    assert vtm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        vtm_loss(torch.zeros(2, 3), labels)


def test_mlm_loss_ignores_and_no_label_is_zero_with_grad():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    labels = torch.tensor([[-100, 2, -100]])
    assert mlm_loss(logits, labels).item() == pytest.approx(math.log(4))
    empty = mlm_loss(logits, torch.full((1, 3), -100))
    assert empty.item() == 0.0 and not torch.isnan(empty)
    empty.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_qa_loss_skips_unknown_answers():
    logits = torch.tensor([[math.log(3.0), 0.0], [5.0, 1.0]])
    loss = qa_loss(logits, torch.tensor([0, -100]))
    assert loss.item() == pytest.approx(-math.log(3 / 4), rel=1e-6)
    assert qa_loss(logits, torch.tensor([-100, -100])).item() == 0.0


def test_mc_loss_and_range_error():
    scores = torch.zeros(2, 5)
    assert mc_loss(scores, torch.tensor([0, 4])).item() == pytest.approx(math.log(5))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mc_loss(scores, torch.tensor([0, 5]))


def test_distill_loss_mse_and_teacher_detached():
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = distill_loss(s, t)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert t.grad is None and torch.allclose(s.grad, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))
