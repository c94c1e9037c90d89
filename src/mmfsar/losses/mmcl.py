"""MMCL's training terms (Liu, Chen & Liu, ACM MM 2024; METHODS.md section 4).

A skeleton student is co-trained with RGB and text that it never sees at test time:

* **Feature alignment (FAM).** The RGB feature of the clip goes through an MLP into the skeleton
  feature's space (256-d for CTR-GCN) and is contrasted with the skeleton's pooled feature by a
  symmetric InfoNCE at ``τ = 0.4``: the clip's own RGB feature is the positive, the other clips
  of the batch the negatives.
* **Feature refinement (FRM).** A precomputed text feature goes through an MLP and a softmax over
  two outputs ``(p⁺, p⁻)``; the class scores are reweighted as
  ``refined[b, c] = (p⁺_b · W⁺_c + p⁻_b · W⁻_c) · fc(x)[b, c]`` with learnable ``W⁺, W⁻ ∈ R^C``
  initialised to 1, so at initialisation ``refined = fc(x)`` (``p⁺ + p⁻ = 1``).
* **Loss** ``CE(fc(x)) + 0.2 · CE(refined) + 0.1 · L_align``. Test: ``fc(x)`` alone.

What the released code (``liujf69/MMCL-Action``: ``model/FAM.py``, ``model/MMCL.py``,
``main_MMCL.py``) does, and where we follow it:

* The RGB side is Inception-v3's 1000 logits → ``Linear(1000, 256) → ReLU → Linear(256, 256)``
  (hidden width = output width); the skeleton side has **no projection**: its pooled feature
  (mean over frames, joints, then persons) is already 256-d. :class:`FeatureAlignment` does the
  same (identity) when ``skeleton_dim == proj_dim`` and falls back to a linear map otherwise.
* Its contrastive loss is GRACE's form: the denominator also holds the *intra-modal* negatives
  ``exp(cos(a_i, a_k)/τ), k ≠ i``. METHODS.md's plain symmetric InfoNCE (CLIP's form, the
  project's :func:`mmfsar.losses.distill.info_nce`) is the default here;
  ``intra_modal_negatives=True`` gives the released form.
* The text feature is **per clip** (a multimodal LLM's answer about the clip's frame), so
  ``p⁺, p⁻`` are per clip (B,) and ``W±`` per class (C,): the refinement factor is their outer
  combination (B, C). With class-level text only (our datasets' ``text/features.npy``), the
  clip's text is its class's text: :class:`TextRefinement` looks it up by label. (Gating with
  one ``p`` per *class* instead would make ``p⁺_c W⁺_c + p⁻_c W⁻_c`` a free per-class scale
  that the text cannot inform, since ``W±`` are already per class.)
* The gate MLP is ``Linear(D_text, 64) → ReLU → Linear(64, 2)``; the released code sizes its
  input with the skeleton's ``in_channels`` (3), which only fits 3-d text features; we size it
  with ``text_dim``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfsar.losses.distill import info_nce

__all__ = [
    "symmetric_info_nce",
    "FeatureAlignment",
    "refine_logits",
    "TextRefinement",
    "mmcl_loss",
]


def symmetric_info_nce(
    a: Tensor, b: Tensor, temperature: float = 0.4, *, intra_modal_negatives: bool = False
) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (B, D), cosine similarities / τ.

    Default: CLIP's form, ``½ [CE(S, I) + CE(Sᵀ, I)]`` with ``S = cos(a_i, b_k) / τ`` (this is
    :func:`mmfsar.losses.distill.info_nce`; ``log B`` for identical rows). With
    ``intra_modal_negatives`` (MMCL's released code, GRACE's loss), the a→b term of row ``i`` is
    ``−log( e^{S_ii} / (Σ_k e^{S_ik} + Σ_{k≠i} e^{cos(a_i, a_k)/τ}) )`` and b→a likewise
    (``log(2B − 1)`` for identical rows).
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"symmetric_info_nce needs (B, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"symmetric_info_nce needs paired features of one size, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"symmetric_info_nce: temperature must be positive, got {temperature}")
    if not intra_modal_negatives:
        return info_nce(a, b, temperature)
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    n = a.shape[0]
    self_pair = torch.eye(n, dtype=torch.bool, device=a.device)
    cross = a @ b.t() / temperature

    def one_way(between: Tensor, within: Tensor) -> Tensor:
        within = within.masked_fill(self_pair, float("-inf"))
        log_denominator = torch.logsumexp(torch.cat([between, within], dim=1), dim=1)
        return (log_denominator - between.diagonal()).mean()

    return 0.5 * (one_way(cross, a @ a.t() / temperature) + one_way(cross.t(), b @ b.t() / temperature))


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class FeatureAlignment(nn.Module):
    """MMCL's Feature Alignment Module: RGB feature → MLP → ``proj_dim``; skeleton pooled feature
    → ``skeleton_projection``; symmetric InfoNCE between the two (see :func:`symmetric_info_nce`).

    The RGB features are not detached: pass ``rgb.detach()`` when they come from a frozen teacher
    (the released code fine-tunes its Inception-v3 through this loss).

    Args:
        skeleton_dim: size of the skeleton's pooled feature.
        rgb_dim: size of the RGB feature (1000 in MMCL: Inception-v3's logits).
        proj_dim: size of the shared space (256: CTR-GCN's feature size).
        temperature: τ (0.4).
        skeleton_projection: ``"auto"`` (identity when ``skeleton_dim == proj_dim``, as released;
            else linear), ``"identity"``, ``"linear"`` or ``"mlp"`` (the RGB side's shape).
        intra_modal_negatives: the released code's GRACE form of the loss.
    """

    def __init__(
        self,
        *,
        skeleton_dim: int,
        rgb_dim: int,
        proj_dim: int = 256,
        temperature: float = 0.4,
        skeleton_projection: Literal["auto", "identity", "linear", "mlp"] = "auto",
        intra_modal_negatives: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("skeleton_dim", skeleton_dim), ("rgb_dim", rgb_dim), ("proj_dim", proj_dim)):
            if value <= 0:
                raise ValueError(f"FeatureAlignment: {name} must be positive, got {value}")
        if not temperature > 0:
            raise ValueError(f"FeatureAlignment: temperature must be positive, got {temperature}")
        if skeleton_projection == "auto":
            skeleton_projection = "identity" if skeleton_dim == proj_dim else "linear"
        if skeleton_projection == "identity":
            if skeleton_dim != proj_dim:
                raise ValueError(
                    f"FeatureAlignment: skeleton_projection='identity' needs skeleton_dim == proj_dim, "
                    f"got {skeleton_dim} and {proj_dim}"
                )
            self.skeleton_proj: nn.Module = nn.Identity()
        elif skeleton_projection == "linear":
            self.skeleton_proj = nn.Linear(skeleton_dim, proj_dim)
        elif skeleton_projection == "mlp":
            self.skeleton_proj = _mlp(skeleton_dim, proj_dim, proj_dim)
        else:
            raise ValueError(
                "FeatureAlignment: skeleton_projection must be 'auto', 'identity', 'linear' or 'mlp', "
                f"got {skeleton_projection!r}"
            )
        self.rgb_proj = _mlp(rgb_dim, proj_dim, proj_dim)
        self.skeleton_dim, self.rgb_dim, self.proj_dim = skeleton_dim, rgb_dim, proj_dim
        self.temperature = float(temperature)
        self.intra_modal_negatives = intra_modal_negatives

    def project(self, skeleton: Tensor, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """Both features in the shared space: (B, proj_dim) each."""
        if skeleton.ndim != 2 or skeleton.shape[1] != self.skeleton_dim:
            raise ValueError(
                f"FeatureAlignment: skeleton features must be (B, {self.skeleton_dim}), got {tuple(skeleton.shape)}"
            )
        if rgb.ndim != 2 or rgb.shape[1] != self.rgb_dim:
            raise ValueError(f"FeatureAlignment: rgb features must be (B, {self.rgb_dim}), got {tuple(rgb.shape)}")
        if skeleton.shape[0] != rgb.shape[0]:
            raise ValueError(
                f"FeatureAlignment needs one RGB feature per clip: {skeleton.shape[0]} skeleton and "
                f"{rgb.shape[0]} rgb rows"
            )
        return self.skeleton_proj(skeleton), self.rgb_proj(rgb.to(skeleton.dtype))

    def forward(self, skeleton: Tensor, rgb: Tensor) -> Tensor:
        """The alignment loss ``L_align`` (a scalar)."""
        z_skeleton, z_rgb = self.project(skeleton, rgb)
        return symmetric_info_nce(
            z_skeleton, z_rgb, self.temperature, intra_modal_negatives=self.intra_modal_negatives
        )


def refine_logits(logits: Tensor, gate: Tensor, positive_weight: Tensor, negative_weight: Tensor) -> Tensor:
    """``refined[b, c] = (gate[b, 0] · W⁺[c] + gate[b, 1] · W⁻[c]) · logits[b, c]``.

    Shapes: ``logits`` (B, C), ``gate`` (B, 2) (``p⁺, p⁻``), ``positive_weight`` / ``negative_weight``
    (C,). Returns (B, C).
    """
    if logits.ndim != 2 or gate.shape != (logits.shape[0], 2):
        raise ValueError(f"refine_logits: logits (B, C) and gate (B, 2) expected, got {tuple(logits.shape)} and "
                         f"{tuple(gate.shape)}")  # fmt: skip
    c = logits.shape[1]
    if positive_weight.shape != (c,) or negative_weight.shape != (c,):
        raise ValueError(
            f"refine_logits: W+ and W- must be ({c},), got {tuple(positive_weight.shape)} and "
            f"{tuple(negative_weight.shape)}"
        )
    scale = gate[:, :1] * positive_weight + gate[:, 1:] * negative_weight
    return scale * logits


class TextRefinement(nn.Module):
    """MMCL's Feature Refinement Module: text feature → ``Linear(D, hidden) → ReLU → Linear(hidden, 2)``
    → softmax ``(p⁺, p⁻)`` per clip → ``refined = (p⁺ W⁺ + p⁻ W⁻) ⊙ fc(x)`` (:func:`refine_logits`).

    ``W⁺``, ``W⁻`` are (num_classes,) parameters initialised to 1, so ``refined == fc(x)`` at
    initialisation. The text of a clip is given directly (``text``, (B, D), MMCL's per-clip LLM
    features) or looked up by label in ``class_text`` (C, D), the dataset's class text features
    (``mmfsar.data.text.read_class_text(...).features``); only training uses it.

    Args:
        text_dim: size D of the text features.
        num_classes: C, the classes of ``fc(x)``.
        hidden: width of the gate MLP (64).
        class_text: optional (num_classes, text_dim) class text features, row ``c`` = label ``c``.
    """

    def __init__(
        self,
        *,
        text_dim: int,
        num_classes: int,
        hidden: int = 64,
        class_text: Tensor | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("text_dim", text_dim), ("num_classes", num_classes), ("hidden", hidden)):
            if value <= 0:
                raise ValueError(f"TextRefinement: {name} must be positive, got {value}")
        self.text_dim, self.num_classes = text_dim, num_classes
        self.gate_mlp = _mlp(text_dim, hidden, 2)
        self.positive_weight = nn.Parameter(torch.ones(num_classes))
        self.negative_weight = nn.Parameter(torch.ones(num_classes))
        if class_text is not None:
            class_text = torch.as_tensor(class_text)
            if class_text.shape != (num_classes, text_dim):
                raise ValueError(
                    f"TextRefinement: class_text must be (num_classes, text_dim) = ({num_classes}, {text_dim}), "
                    f"got {tuple(class_text.shape)}"
                )
            class_text = class_text.float()
        # data, not weights: rebuilt from the dataset, so kept out of checkpoints
        self.register_buffer("class_text", class_text, persistent=False)

    def gate(self, text: Tensor) -> Tensor:
        """``(p⁺, p⁻)`` per clip: (B, 2), rows sum to 1."""
        if text.ndim != 2 or text.shape[1] != self.text_dim:
            raise ValueError(f"TextRefinement: text features must be (B, {self.text_dim}), got {tuple(text.shape)}")
        return self.gate_mlp(text.to(self.positive_weight.dtype)).softmax(dim=-1)

    def forward(self, logits: Tensor, text: Tensor | None = None, *, labels: Tensor | None = None) -> Tensor:
        """Refined class scores (B, C) from ``logits = fc(x)`` (B, C) and either the clips' text
        (B, text_dim) or their ``labels`` (B,) (the class text of each clip's class)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"TextRefinement: logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        if (text is None) == (labels is None):
            raise ValueError("TextRefinement: give either the clips' text features or their labels, not both")
        if text is None:
            if self.class_text is None:
                raise ValueError("TextRefinement: labels given but the module was built without class_text")
            if labels.shape != (logits.shape[0],):
                raise ValueError(f"TextRefinement: labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
            text = self.class_text[labels]
        elif text.shape[0] != logits.shape[0]:
            raise ValueError(f"TextRefinement: {text.shape[0]} text rows for {logits.shape[0]} clips")
        return refine_logits(logits, self.gate(text), self.positive_weight, self.negative_weight)


def mmcl_loss(
    logits: Tensor,
    refined_logits: Tensor,
    labels: Tensor,
    align_loss: Tensor | float,
    *,
    refine_weight: float = 0.2,
    align_weight: float = 0.1,
) -> Tensor:
    """MMCL's objective ``CE(fc(x), y) + refine_weight · CE(refined, y) + align_weight · L_align``
    (0.2 and 0.1 in the paper and the released code). ``logits`` and ``refined_logits`` are (B, C),
    ``labels`` (B,) class indices."""
    if logits.ndim != 2 or refined_logits.shape != logits.shape:
        raise ValueError(
            f"mmcl_loss: logits and refined logits must both be (B, C), got {tuple(logits.shape)} and "
            f"{tuple(refined_logits.shape)}"
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"mmcl_loss: labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
    align = torch.as_tensor(align_loss, dtype=torch.float32, device=logits.device)
    if align.ndim != 0:
        raise ValueError(f"mmcl_loss: align_loss must be a scalar, got shape {tuple(align.shape)}")
    return (
        F.cross_entropy(logits.float(), labels)
        + refine_weight * F.cross_entropy(refined_logits.float(), labels)
        + align_weight * align
    )
