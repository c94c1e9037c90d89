"""MMCL's terms (METHODS.md 4) against values computed by hand with plain Python."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmfsar.losses.distill import info_nce
from mmfsar.losses.mmcl import FeatureAlignment, TextRefinement, mmcl_loss, refine_logits, symmetric_info_nce


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def hand_info_nce(a: list[list[float]], b: list[list[float]], tau: float, intra: bool) -> float:
    """Row by row: -log(e^{cos(a_i,b_i)/τ} / (Σ_k e^{cos(a_i,b_k)/τ} [+ Σ_{k≠i} e^{cos(a_i,a_k)/τ}])),
    both directions averaged."""
    n = len(a)

    def one_way(x: list[list[float]], y: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            denominator = sum(math.exp(_cos(x[i], y[k]) / tau) for k in range(n))
            if intra:
                denominator += sum(math.exp(_cos(x[i], x[k]) / tau) for k in range(n) if k != i)
            total += -math.log(math.exp(_cos(x[i], y[i]) / tau) / denominator)
        return total / n

    return 0.5 * (one_way(a, b) + one_way(b, a))


A = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
B = [[1.0, 0.2], [0.5, 1.0], [0.3, 2.0]]


# ------------------------------------------------------------------------------------- InfoNCE
@pytest.mark.parametrize("intra", [False, True])
def test_symmetric_info_nce_equals_hand_value(intra: bool):
    got = symmetric_info_nce(torch.tensor(A), torch.tensor(B), 0.4, intra_modal_negatives=intra)
    assert got.item() == pytest.approx(hand_info_nce(A, B, 0.4, intra), rel=1e-5)


def test_symmetric_info_nce_default_is_the_projects_info_nce():
    a, b = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.randn(5, 3)
    assert torch.equal(symmetric_info_nce(a, b, 0.4), info_nce(a, b, 0.4))


def test_symmetric_info_nce_identical_rows_closed_forms():
    same = torch.ones(4, 3)
    # every logit equal: CLIP form log B, GRACE form log(B + B - 1)
    assert symmetric_info_nce(same, same).item() == pytest.approx(math.log(4), rel=1e-6)
    assert symmetric_info_nce(same, same, intra_modal_negatives=True).item() == pytest.approx(math.log(7), rel=1e-6)


def test_symmetric_info_nce_bad_input():
    with pytest.raises(ValueError, match="paired features"):
        symmetric_info_nce(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        symmetric_info_nce(torch.ones(3, 2), torch.ones(3, 2), 0.0)


# ---------------------------------------------------------------------------- feature alignment
def _identity_mlp(mlp: nn.Sequential) -> None:
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            layer.weight.copy_(torch.eye(layer.out_features, layer.in_features))
            layer.bias.zero_()


@pytest.mark.parametrize("intra", [False, True])
def test_feature_alignment_with_identity_projections_is_hand_info_nce(intra: bool):
    fam = FeatureAlignment(skeleton_dim=2, rgb_dim=2, proj_dim=2, intra_modal_negatives=intra)
    assert isinstance(fam.skeleton_proj, nn.Identity)  # released code: no skeleton projection
    _identity_mlp(fam.rgb_proj)  # B has positive entries, so the ReLU passes them unchanged
    got = fam(torch.tensor(A), torch.tensor(B))
    assert got.item() == pytest.approx(hand_info_nce(A, B, 0.4, intra), rel=1e-5)


def test_feature_alignment_projections_and_gradients():
    fam = FeatureAlignment(skeleton_dim=6, rgb_dim=10, proj_dim=4)
    assert isinstance(fam.skeleton_proj, nn.Linear)  # sizes differ: a linear map
    rgb_hidden = fam.rgb_proj[0]
    assert (rgb_hidden.in_features, rgb_hidden.out_features, fam.rgb_proj[2].out_features) == (10, 4, 4)
    skeleton = torch.randn(5, 6, requires_grad=True)
    fam(skeleton, torch.randn(5, 10)).backward()
    assert skeleton.grad is not None and skeleton.grad.abs().sum() > 0
    assert all(p.grad is not None for p in fam.parameters())


def test_feature_alignment_bad_input():
    with pytest.raises(ValueError, match="skeleton_dim == proj_dim"):
        FeatureAlignment(skeleton_dim=6, rgb_dim=10, proj_dim=4, skeleton_projection="identity")
    fam = FeatureAlignment(skeleton_dim=4, rgb_dim=10, proj_dim=4)
    with pytest.raises(ValueError, match=r"rgb features must be \(B, 10\)"):
        fam(torch.randn(3, 4), torch.randn(3, 9))
    with pytest.raises(ValueError, match="one RGB feature per clip"):
        fam(torch.randn(3, 4), torch.randn(2, 10))


# ----------------------------------------------------------------------------- text refinement
def test_refine_logits_equals_hand_formula():
    logits = [[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]
    gate = [[0.75, 0.25], [0.1, 0.9]]
    w_pos, w_neg = [2.0, 1.0, 0.0], [-1.0, 3.0, 0.5]
    expected = [
        [(gate[b][0] * w_pos[c] + gate[b][1] * w_neg[c]) * logits[b][c] for c in range(3)] for b in range(2)
    ]
    got = refine_logits(torch.tensor(logits), torch.tensor(gate), torch.tensor(w_pos), torch.tensor(w_neg))
    assert torch.allclose(got, torch.tensor(expected))


def test_text_refinement_is_identity_at_initialisation():
    torch.manual_seed(0)
    frm = TextRefinement(text_dim=5, num_classes=3)
    assert torch.equal(frm.positive_weight.data, torch.ones(3)) and torch.equal(frm.negative_weight.data, torch.ones(3))
    logits = torch.randn(4, 3)
    refined = frm(logits, torch.randn(4, 5))
    assert torch.allclose(refined, logits, atol=1e-6)  # p+ + p- = 1


def test_text_refinement_gate_and_weights_by_hand():
    frm = TextRefinement(text_dim=2, num_classes=2, hidden=2)
    with torch.no_grad():
        frm.gate_mlp[0].weight.copy_(torch.eye(2))
        frm.gate_mlp[0].bias.zero_()
        frm.gate_mlp[2].weight.copy_(torch.eye(2))
        frm.gate_mlp[2].bias.zero_()
        frm.positive_weight.copy_(torch.tensor([2.0, 0.5]))
        frm.negative_weight.copy_(torch.tensor([1.0, 4.0]))
    text = [[math.log(3.0), 0.0], [0.0, 0.0]]  # gate logits = text (ReLU keeps them): p = [3/4, 1/4], [1/2, 1/2]
    p = [[0.75, 0.25], [0.5, 0.5]]
    logits = [[1.0, 2.0], [-1.0, 3.0]]
    w_pos, w_neg = [2.0, 0.5], [1.0, 4.0]
    expected = [[(p[b][0] * w_pos[c] + p[b][1] * w_neg[c]) * logits[b][c] for c in range(2)] for b in range(2)]
    assert torch.allclose(frm.gate(torch.tensor(text)), torch.tensor(p))
    assert torch.allclose(frm(torch.tensor(logits), torch.tensor(text)), torch.tensor(expected))


def test_text_refinement_class_text_by_label():
    torch.manual_seed(0)
    class_text = torch.randn(3, 4)
    frm = TextRefinement(text_dim=4, num_classes=3, class_text=class_text)
    with torch.no_grad():
        frm.positive_weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    logits, labels = torch.randn(5, 3), torch.tensor([2, 0, 0, 1, 2])
    assert torch.allclose(frm(logits, labels=labels), frm(logits, class_text[labels]))
    assert "class_text" not in frm.state_dict()  # dataset text, rebuilt with the module


def test_text_refinement_bad_input():
    with pytest.raises(ValueError, match=r"class_text must be \(num_classes, text_dim\) = \(3, 4\)"):
        TextRefinement(text_dim=4, num_classes=3, class_text=torch.zeros(2, 4))
    frm = TextRefinement(text_dim=4, num_classes=3)
    with pytest.raises(ValueError, match="built without class_text"):
        frm(torch.zeros(2, 3), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="either"):
        frm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"text features must be \(B, 4\)"):
        frm(torch.zeros(2, 3), torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------- loss
def _hand_ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(rows, labels)) / len(rows)


def test_mmcl_loss_weights():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    refined = [[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]]
    labels = [0, 2]
    align = 1.7
    expected = _hand_ce(logits, labels) + 0.2 * _hand_ce(refined, labels) + 0.1 * align
    got = mmcl_loss(torch.tensor(logits), torch.tensor(refined), torch.tensor(labels), torch.tensor(align))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    custom = mmcl_loss(
        torch.tensor(logits), torch.tensor(refined), torch.tensor(labels), align, refine_weight=1.0, align_weight=0.0
    )
    assert custom.item() == pytest.approx(_hand_ce(logits, labels) + _hand_ce(refined, labels), rel=1e-6)


def test_mmcl_step_backpropagates_into_every_part():
    torch.manual_seed(0)
    fc = nn.Linear(4, 3)
    fam = FeatureAlignment(skeleton_dim=4, rgb_dim=6, proj_dim=4)
    frm = TextRefinement(text_dim=5, num_classes=3, class_text=torch.randn(3, 5))
    skeleton, rgb, labels = torch.randn(6, 4, requires_grad=True), torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = fc(skeleton)
    mmcl_loss(logits, frm(logits, labels=labels), labels, fam(skeleton, rgb)).backward()
    for module in (fc, fam, frm):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert skeleton.grad.abs().sum() > 0


def test_mmcl_loss_bad_input():
    with pytest.raises(ValueError, match="both be"):
        mmcl_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), 0.0)
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        mmcl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]), 0.0)
    with pytest.raises(ValueError, match="scalar"):
        mmcl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2))
