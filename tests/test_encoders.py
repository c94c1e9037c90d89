"""Backbones: shapes for every modality, tube masking, pretrained loading, skeleton graph."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmfsar.data.meta import DatasetMeta
from mmfsar.data.modalities import RGB, Depth, Flow, Modality, Pose, PoseKeypoints
from mmfsar.data.synthetic.actions import EDGES, JOINTS
from mmfsar.models.base import ModalityEncoder
from mmfsar.models.encoders import (
    STGCN,
    FrameCNN,
    VideoViT,
    spatial_partition_adjacency,
    tube_mask,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "encoder"
SIZE, FRAMES, BATCH = 32, 4, 2


def _meta() -> DatasetMeta:
    return DatasetMeta(
        name="toy", fps=10.0, classes=[], modalities={}, joints=list(JOINTS), edges=list(EDGES)
    )


def _modality(kind: type[Modality], name: str) -> Modality:
    """A modality as the training code sees it (keypoint modalities need the skeleton)."""
    modality = kind(name=name, size=SIZE)
    modality.meta = _meta()
    return modality


IMAGE_MODALITIES = {
    "rgb": (RGB, 3),
    "flow": (Flow, 2),
    "depth": (Depth, 1),
    "pose": (Pose, len(JOINTS)),
}


def _build(config: str, modality: Modality, **overrides: object) -> torch.nn.Module:
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    return instantiate(cfg, num_frames=FRAMES, **modality.encoder_inputs(), **overrides)


def _tiny_vit(**overrides: object) -> VideoViT:
    args = dict(
        in_channels=3, num_frames=4, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    return VideoViT(**{**args, **overrides}).eval()


IMAGE_BACKBONE_CASES = [
    *((name, "vit_tiny", {}, FRAMES // 2) for name in IMAGE_MODALITIES),
    *((name, "frame_cnn", {}, FRAMES) for name in IMAGE_MODALITIES),
    (
        "pose",
        "frame_cnn",
        {"temporal_pool": "transformer"},
        FRAMES,
    ),  # pooling does not depend on the modality
]


@pytest.mark.parametrize(("modality_name", "config", "overrides", "slots"), IMAGE_BACKBONE_CASES)
def test_image_backbone_shapes_for_every_modality(modality_name, config, overrides, slots):
    kind, channels = IMAGE_MODALITIES[modality_name]
    modality = _modality(kind, modality_name)
    assert modality.channels == channels
    model = _build(config, modality, **overrides).eval()
    out = model(torch.randn(BATCH, channels, FRAMES, SIZE, SIZE), return_tokens=True)
    assert out.pooled.shape == (BATCH, model.feature_dim)
    assert out.frames.shape == (BATCH, slots, model.feature_dim)
    assert out.tokens is not None and out.tokens.shape[-1] == model.feature_dim
    assert out.mask is None
    assert torch.isfinite(out.pooled).all()


def test_stgcn_shapes_from_keypoint_modality():
    modality = _modality(PoseKeypoints, "pose_keypoints")
    model = _build("stgcn", modality).eval()
    x = torch.randn(BATCH, 3, 8, len(JOINTS))
    out = model(x, return_tokens=True)
    assert model.feature_dim == 128
    assert out.pooled.shape == (BATCH, 128)
    assert out.frames.shape == (BATCH, 2, 128)  # strides 1, 2, 2
    assert out.tokens.shape == (BATCH, 2 * len(JOINTS), 128)
    persons = model(torch.stack([x, x], dim=-1))  # NTU layout (B, C, T, J, M)
    torch.testing.assert_close(persons.pooled, out.pooled)


EXPECTED_FEATURE_DIMS = {
    "vit_tiny": 128,
    "vit_small": 384,
    "vit_base": 768,
    "frame_cnn": 512,
    "mobilenetv3_small": 1024,
    "mobilenetv3_large": 1280,
    "resnet50": 2048,
    "stgcn": 128,
}


@pytest.mark.parametrize("config", sorted(EXPECTED_FEATURE_DIMS))
def test_every_encoder_config_builds_from_modality_inputs(config):
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    assert not {"in_channels", "img_size", "num_frames", "num_joints", "edges"} & set(cfg), (
        "input-dependent keys"
    )
    keypoints = config == "stgcn"
    modality = _modality(PoseKeypoints, "kp") if keypoints else _modality(RGB, "rgb")
    # Full-depth ViT-S/B would take seconds to initialise; the width is what is checked here.
    model = _build(config, modality, **({"depth": 1} if "depth" in cfg else {})).eval()
    assert model.feature_dim == EXPECTED_FEATURE_DIMS[config]
    x = (
        torch.randn(1, 3, FRAMES, len(JOINTS))
        if keypoints
        else torch.randn(1, 3, FRAMES, SIZE, SIZE)
    )
    assert model(x).pooled.shape == (1, model.feature_dim)


def test_vit_rejects_grids_that_do_not_divide():
    with pytest.raises(ValueError, match="tubelet_size"):
        _tiny_vit(num_frames=5)
    with pytest.raises(ValueError, match="patch_size"):
        _tiny_vit(img_size=20)


def test_vit_rejects_input_of_another_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 16, 16\)"):
        _tiny_vit()(torch.randn(1, 3, 4, 32, 32))


# --- tube masking -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_tube_mask_fraction_and_same_cells_in_every_slot(ratio):
    grid = (4, 5, 6)
    mask = tube_mask(8, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, math.prod(grid))
    per_slot = mask.reshape(8, 4, 30)
    assert (per_slot == per_slot[:, :1]).all()
    assert (per_slot[:, 0].sum(dim=1) == round(ratio * 30)).all()
    if ratio:
        assert not (per_slot[0, 0] == per_slot[1, 0]).all(), "samples should get different masks"


def test_tube_mask_is_reproducible_and_rejects_ratios_that_drop_everything():
    a = tube_mask(3, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(1))
    b = tube_mask(3, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    for ratio in (1.0, 0.99, -0.1):
        with pytest.raises(ValueError, match="mask ratio"):
            tube_mask(1, (2, 4, 4), ratio)


def test_masked_forward_runs_only_visible_tokens():
    model = _tiny_vit(img_size=32)  # grid (2, 4, 4): 32 tokens
    seen: list[int] = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    x = torch.randn(BATCH, 3, 4, 32, 32)
    out = model(x, mask_ratio=0.75, return_tokens=True)
    assert seen == [8]
    assert out.mask.shape == (BATCH, 32) and (out.mask.sum(dim=1) == 24).all()
    assert out.tokens.shape == (BATCH, 8, 32)
    assert out.frames.shape == (BATCH, 2, 32)
    # Changing the pixels of dropped tubes changes nothing: they are never looked at.
    dropped = (
        out.mask.reshape(BATCH, 1, 2, 1, 4, 1, 4, 1)
        .expand(-1, 3, -1, 2, -1, 8, -1, 8)
        .reshape(x.shape)
    )
    again = model(torch.where(dropped, torch.randn_like(x), x), mask=out.mask)
    torch.testing.assert_close(again.pooled, out.pooled)


def test_masked_frames_are_normalised_means_of_each_slots_visible_tokens():
    model = _tiny_vit(img_size=32)
    captured = {}
    model.blocks.register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    mask = tube_mask(BATCH, model.grid, 0.5, generator=torch.Generator().manual_seed(3))
    out = model(torch.randn(BATCH, 3, 4, 32, 32), mask=mask)
    tokens = captured["tokens"]  # (B, 16 visible, D): 8 visible cells x 2 slots, slot-major
    torch.testing.assert_close(
        out.frames, model.fc_norm(tokens.reshape(BATCH, 2, 8, -1).mean(dim=2))
    )
    torch.testing.assert_close(out.pooled, model.fc_norm(tokens.mean(dim=1)))


def test_a_given_mask_is_shared_by_several_encoders():
    student, teacher = _tiny_vit(), _tiny_vit(in_channels=2, embed_dim=64, num_heads=4)
    mask = tube_mask(BATCH, student.grid, 0.5, generator=torch.Generator().manual_seed(0))
    out_s = student(torch.randn(BATCH, 3, 4, 16, 16), mask=mask, mask_ratio=0.9)  # the mask wins
    out_t = teacher(torch.randn(BATCH, 2, 4, 16, 16), mask=mask)
    assert torch.equal(out_s.mask, mask) and torch.equal(out_t.mask, mask)


def test_vit_rejects_masks_it_cannot_batch():
    model = _tiny_vit()
    uneven = torch.zeros(2, 8, dtype=torch.bool)
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="same, nonzero number"):
        model(torch.randn(2, 3, 4, 16, 16), mask=uneven)
    with pytest.raises(ValueError, match=r"mask must be \(2, 8\)"):
        model(torch.randn(2, 3, 4, 16, 16), mask=torch.zeros(2, 7, dtype=torch.bool))


@pytest.mark.parametrize(
    ("build", "x"),
    [
        (lambda: FrameCNN(in_channels=3, num_frames=2, img_size=16), torch.randn(1, 3, 2, 16, 16)),
        (
            lambda: STGCN(in_channels=3, num_frames=4, num_joints=len(JOINTS), edges=EDGES),
            torch.randn(1, 3, 4, 15),
        ),
    ],
    ids=["frame_cnn", "stgcn"],
)
def test_backbones_without_tokens_refuse_masking(build, x):
    model = build()
    assert not model.supports_masking
    with pytest.raises(ValueError, match="cannot drop tokens"):
        model(x, mask_ratio=0.75)
    with pytest.raises(ValueError, match="cannot drop tokens"):
        model(x, mask=torch.zeros(1, 4, dtype=torch.bool))


# --- pretrained weights -------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [3, 2])
def test_frame_cnn_loads_a_local_timm_checkpoint(tmp_path, in_channels):
    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = FrameCNN(in_channels=in_channels, num_frames=2, img_size=16, pretrained=str(path))
    loaded = model.model.state_dict()
    for name, tensor in source.state_dict().items():
        if name == "conv1.weight" or name.startswith("fc."):
            continue
        assert torch.equal(loaded[name], tensor), name
    # timm repeats the RGB filters over the new channels and rescales them by 3 / in_channels.
    expected_conv1 = source.conv1.weight[:, :in_channels] * (3 / in_channels)
    torch.testing.assert_close(loaded["conv1.weight"], expected_conv1)


def test_frame_cnn_wrong_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/resnet18.pth"):
        FrameCNN(in_channels=3, num_frames=2, img_size=16, pretrained=str(missing))


def _official_videomae_checkpoint(model: VideoViT, style: str) -> dict:
    """``model``'s weights under the names of the official VideoMAE code.

    Pretraining files: ``encoder.`` prefix, final ``norm``, decoder next to it; fine-tuning files:
    ``fc_norm`` and a classifier ``head``. Attention biases as ``q_bias`` / ``v_bias``.
    """
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attn.qkv.bias"):
            q, _, v = tensor.chunk(3)
            stem = name[: -len("qkv.bias")]
            weights[stem + "q_bias"], weights[stem + "v_bias"] = q.clone(), v.clone()
        else:
            weights[name] = tensor.clone()
    if style == "finetune":
        weights["head.weight"] = torch.randn(7, model.feature_dim)
        return {"module": weights}
    weights = {
        ("encoder." + k).replace("encoder.fc_norm.", "encoder.norm."): v for k, v in weights.items()
    }
    weights["decoder.blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    weights["encoder_to_decoder.weight"] = torch.randn(3, model.feature_dim)
    weights["mask_token"] = torch.randn(1, 1, 3)
    return {
        "model": weights,
        "args": argparse.Namespace(model="pretrain_videomae_small_patch16_224"),
    }


def _source_vit() -> VideoViT:
    model = _tiny_vit()
    with torch.no_grad():
        for block in model.blocks:  # VideoMAE has no key bias; q and v biases are nonzero
            block.attn.qkv.bias.uniform_(-1, 1)
            block.attn.qkv.bias[32:64] = 0
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("style", ["pretrain", "finetune"])
def test_vit_loads_an_official_videomae_checkpoint(tmp_path, style, caplog):
    source = _source_vit()
    path = tmp_path / f"videomae_{style}.pth"
    torch.save(_official_videomae_checkpoint(source, style), path)
    with caplog.at_level(logging.WARNING):
        model = _tiny_vit(pretrained=str(path))
    assert not caplog.records, caplog.text  # every encoder weight found a home, extras ignored
    x = torch.randn(2, 3, 4, 16, 16)
    mask = tube_mask(2, source.grid, 0.5, generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"mask": mask}):
        expected, got = source(x, **kwargs), model(x, **kwargs)
        torch.testing.assert_close(got.pooled, expected.pooled, rtol=0, atol=0)
        torch.testing.assert_close(got.frames, expected.frames, rtol=0, atol=0)


def test_vit_loads_its_own_and_modality_encoder_state_dicts(tmp_path):
    source = _source_vit()
    x = torch.randn(1, 3, 4, 16, 16)
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    torch.save(
        ModalityEncoder(modality="rgb", backbone=source, num_classes=5).state_dict(),
        tmp_path / "wrapped.pt",
    )
    for name in ("bare.pt", "wrapped.pt"):
        model = _tiny_vit(pretrained=str(tmp_path / name))
        torch.testing.assert_close(model(x).pooled, source(x).pooled, rtol=0, atol=0)


def test_vit_reports_mismatched_and_missing_keys(tmp_path, caplog):
    other = _tiny_vit(in_channels=2)  # different patch_embed input channels
    state = other.state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "flow_vit.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        model = _tiny_vit(pretrained=str(path))
    assert (
        "patch_embed.proj.weight checkpoint [32, 2, 2, 8, 8] vs model [32, 3, 2, 8, 8]"
        in caplog.text
    )
    assert "blocks.1.mlp.fc2.bias" in caplog.text
    assert torch.equal(model.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


def test_vit_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_videomae.pth"):
        _tiny_vit(pretrained=str(tmp_path / "missing_videomae.pth"))
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="no weight of the checkpoint fits"):
        _tiny_vit(pretrained=str(tmp_path / "resnet.pth"))


# --- skeleton graph -----------------------------------------------------------------------


def test_stgcn_rejects_edges_outside_the_skeleton():
    with pytest.raises(ValueError, match=r"edge #1 \[1, 15\].*0\.\.14"):
        STGCN(in_channels=3, num_frames=8, num_joints=15, edges=[[0, 1], [1, 15]])


def test_spatial_partition_adjacency():
    adjacency = spatial_partition_adjacency(len(JOINTS), EDGES)
    neck, head, pelvis, left_hip = (JOINTS.index(n) for n in ("neck", "head", "pelvis", "left_hip"))
    assert adjacency.shape == (3, 15, 15)
    torch.testing.assert_close(
        adjacency.sum(dim=(0, 1)), torch.ones(15)
    )  # each joint averages its neighbourhood
    assert ((adjacency > 0).sum(dim=0) <= 1).all(), "partitions must be disjoint"
    self_part, centripetal, centrifugal = adjacency
    assert torch.equal(
        self_part, torch.diag(torch.diag(self_part))
    )  # a tree has no same-distance neighbours
    assert centripetal[neck, head] > 0 and centrifugal[head, neck] > 0  # the neck is the centre
    assert centripetal[pelvis, left_hip] > 0 and centripetal[left_hip, pelvis] == 0


def test_conv3d_instance_normalised_input_ignores_each_clips_colour_and_contrast():
    """``instance_norm_input``: a per-clip, per-channel affine change of the pixels (another palette,
    brightness, contrast) leaves the features unchanged; without it they change. Two clips in one
    batch: each is standardised by its own statistics (batch norm in eval mode adds nothing shared)."""
    from mmfsar.models.encoders import Conv3DEncoder

    torch.manual_seed(0)
    clips = torch.rand(2, 3, 8, 32, 32)
    scale = torch.tensor([[0.5, 1.7, 0.9], [1.3, 0.4, 2.0]]).view(2, 3, 1, 1, 1)
    shift = torch.tensor([[0.2, -0.1, 0.3], [-0.3, 0.25, 0.0]]).view(2, 3, 1, 1, 1)
    recoloured = clips * scale + shift
    for normalised in (True, False):
        encoder = Conv3DEncoder(in_channels=3, num_frames=8, img_size=32, widths=(8, 16), temporal_strides=(1, 2),
                                stem_temporal_kernel=3, instance_norm_input=normalised).eval()
        with torch.no_grad():
            a, b = encoder.encode(clips), encoder.encode(recoloured)
        assert a.frames.shape == (2, 4, 16)
        if normalised:
            torch.testing.assert_close(a.frames, b.frames, rtol=1e-4, atol=1e-5)
        else:
            assert (a.frames - b.frames).abs().max() > 1e-2
