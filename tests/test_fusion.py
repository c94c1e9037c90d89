"""Fusion modules (MFM, concat) and the fusion teacher, on tiny stand-in encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mmfsar.models.base import EncoderOutput, ModalityEncoder, build_encoder, export_encoder
from mmfsar.models.fusion import MFM, ConcatFusion, FusionTeacher, encoder_dims

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "fusion"
B, T = 2, 4


class TinyBackbone(nn.Module):
    """(B, C, T, H, W) -> per-frame features; BatchNorm and dropout make train/eval mode visible."""

    def __init__(self, in_channels: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.feature_dim = dim
        self.proj = nn.Linear(in_channels, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, **kwargs) -> EncoderOutput:
        self.ran_with_grad = torch.is_grad_enabled()
        frames = self.proj(x.mean(dim=(3, 4)).transpose(1, 2))
        frames = self.drop(self.norm(frames.transpose(1, 2)).transpose(1, 2))
        return EncoderOutput(pooled=frames.mean(dim=1), frames=frames)


def frame_features(dims: dict[str, int], seed: int = 0, frames: int = T) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(B, frames, size, generator=gen) for name, size in dims.items()}


def clips(modalities, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, 3, T, 5, 5, generator=gen) for m in modalities}


# --------------------------------------------------------------------------- MFM


@pytest.mark.parametrize(
    "dims",
    [
        {"rgb": 8, "flow": 8},
        {"rgb": 8, "flow": 6, "pose": 12},
        {"rgb": 16, "flow": 8, "pose": 8, "depth": 4},
    ],
    ids=["2", "3", "4"],
)
def test_mfm_fuses_two_three_and_four_modalities(dims):
    mfm = MFM(dims=dims, num_frames=T, dim=8, heads=2)
    features = frame_features(dims)
    fused = mfm(features)
    assert fused.shape == (B, T, 8) and mfm.out_dim == 8
    assert mfm.modalities == ["rgb", *sorted(set(dims) - {"rgb"})]
    fused.sum().backward()
    assert all(p.grad is not None for p in mfm.parameters())
    assert MFM(dims=dims, num_frames=T, heads=2).out_dim == dims["rgb"]


def test_mfm_pair_branch_sees_previous_aux_frame():
    dims = {"rgb": 8, "flow": 8, "pose": 8}
    mfm = MFM(dims=dims, num_frames=T, dim=8, heads=2)
    features = frame_features(dims, seed=1)
    seen = []
    mfm.pair.register_forward_pre_hook(
        lambda module, args: seen.append([x.detach() for x in args[0]])
    )
    mfm(features)
    assert len(seen) == 2  # one shared encoder, once per auxiliary modality
    for (primary, aux), name in zip(seen, ["flow", "pose"], strict=True):
        assert torch.equal(primary, features["rgb"])
        for t in range(T):  # primary frame t is paired with aux frame t-1 (cyclically)
            assert torch.equal(aux[:, t], features[name][:, (t - 1) % T])


def test_mfm_shift_shows_in_the_output():
    # drop the all-modality branch and the pair branch's temporal mixing: what is left of
    # fused frame t is a per-frame function of (rgb_t, aux_{t-1})
    dims = {"rgb": 8, "flow": 8}
    mfm = MFM(dims=dims, num_frames=T, dim=8, heads=2).eval()
    mfm.pair.encoder = nn.Identity()
    with torch.no_grad():
        mfm.all.out.weight.zero_()
        mfm.all.out.bias.zero_()
    features = frame_features(dims, seed=2)
    base = mfm(features)
    for s in range(T):
        perturbed = {k: v.clone() for k, v in features.items()}
        perturbed["flow"][:, s] *= -2.0  # not a per-frame constant: LayerNorm would remove that
        changed = (mfm(perturbed) - base).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.tolist() == [t == (s + 1) % T for t in range(T)]


def test_mfm_errors_are_clear():
    dims = {"rgb": 8, "flow": 8}
    mfm = MFM(dims=dims, num_frames=T, dim=8, heads=2)
    features = frame_features(dims)
    with pytest.raises(KeyError, match="primary modality 'rgb'"):
        mfm({"flow": features["flow"]})
    with pytest.raises(ValueError, match="disagree"):
        mfm({"rgb": features["rgb"], "flow": features["flow"][:, :3]})
    with pytest.raises(ValueError, match="built for 4 frames"):
        mfm(frame_features(dims, frames=6))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        mfm({"rgb": features["rgb"], "flow": torch.randn(B, T, 5)})
    with pytest.raises(ValueError, match="primary modality 'rgb' is not among"):
        MFM(dims={"flow": 8, "pose": 8}, num_frames=T)
    with pytest.raises(ValueError, match="at least two"):
        MFM(dims={"rgb": 8}, num_frames=T)
    with pytest.raises(ValueError, match="heads"):
        MFM(dims=dims, num_frames=T, dim=6, heads=4)


# --------------------------------------------------------------------------- concat and configs


def test_concat_fusion_shapes_and_errors():
    dims = {"rgb": 8, "flow": 6, "pose": 4}
    fusion = ConcatFusion(dims=dims, num_frames=T, dim=5)
    assert fusion(frame_features(dims)).shape == (B, T, 5)
    assert ConcatFusion(dims=dims, num_frames=T).out_dim == 8
    with pytest.raises(KeyError, match="pose"):
        fusion({k: v for k, v in frame_features(dims).items() if k != "pose"})
    with pytest.raises(ValueError, match="disagree"):
        fusion({**frame_features(dims), "flow": torch.randn(B, T + 1, 6)})


@pytest.mark.parametrize("name", ["mfm", "concat"])
def test_fusion_configs_are_interchangeable(name):
    dims = {"rgb": 8, "flow": 8, "pose": 8}
    fusion = instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"), dims=dims, num_frames=T)
    assert fusion(frame_features(dims)).shape == (B, T, fusion.out_dim)
    assert fusion.out_dim == 8


# --------------------------------------------------------------------------- fusion teacher


def make_teacher(freeze: bool, num_classes: int = 3) -> FusionTeacher:
    torch.manual_seed(0)
    encoders = {
        m: ModalityEncoder(modality=m, backbone=TinyBackbone(dim=8))
        for m in ("rgb", "flow", "pose")
    }
    fusion = MFM(dims=encoder_dims(encoders), num_frames=T, dim=8, heads=2)
    return FusionTeacher(
        encoders=encoders, fusion=fusion, num_classes=num_classes, freeze_encoders=freeze
    )


def train_step(teacher: FusionTeacher) -> None:
    optimiser = torch.optim.AdamW(teacher.parameters(), lr=1e-2, weight_decay=0.1)
    out = teacher(clips(teacher.modalities, seed=3))
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    optimiser.step()


def test_fusion_teacher_is_a_clip_encoder():
    teacher = make_teacher(freeze=True)
    out = teacher(clips(["rgb", "flow", "pose"]))
    assert teacher.modalities == ["flow", "pose", "rgb"] and teacher.feature_dim == 8
    assert out.frames.shape == (B, T, 8) and out.logits.shape == (B, 3)
    assert torch.allclose(out.pooled, out.frames.mean(dim=1))
    assert make_teacher(freeze=True, num_classes=0)(clips(["rgb", "flow", "pose"])).logits is None
    with pytest.raises(KeyError, match="pose"):
        teacher(clips(["rgb", "flow"]))


def test_frozen_encoders_stay_identical_and_in_eval_mode():
    teacher = make_teacher(freeze=True)
    before = {k: v.clone() for k, v in teacher.encoders.state_dict().items()}
    fusion_before = {k: v.clone() for k, v in teacher.fusion.state_dict().items()}
    teacher.train()
    assert teacher.training and teacher.fusion.training
    assert not any(module.training for module in teacher.encoders.modules())
    train_step(teacher)
    assert not any(encoder.backbone.ran_with_grad for encoder in teacher.encoders.values())
    assert all(p.grad is None and not p.requires_grad for p in teacher.encoders.parameters())
    after = teacher.encoders.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers included
    assert any(not torch.equal(fusion_before[k], v) for k, v in teacher.fusion.state_dict().items())


def test_unfrozen_encoders_are_fine_tuned():
    teacher = make_teacher(freeze=False)
    before = {k: v.clone() for k, v in teacher.encoders.state_dict().items()}
    teacher.train()
    assert all(module.training for module in teacher.encoders.modules())
    train_step(teacher)
    after = teacher.encoders.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


def test_fusion_must_match_the_encoders():
    encoders = {
        m: ModalityEncoder(modality=m, backbone=TinyBackbone(dim=8)) for m in ("rgb", "flow")
    }
    with pytest.raises(ValueError, match="encoder_dims"):
        FusionTeacher(
            encoders=encoders, fusion=MFM(dims={"rgb": 8, "pose": 8}, num_frames=T, heads=2)
        )


def test_fusion_teacher_exports_and_rebuilds(tmp_path):
    teacher = make_teacher(freeze=True).eval()
    backbone = {"_target_": f"{TinyBackbone.__module__}.TinyBackbone", "dim": 8}
    config = {
        "_target_": "mmfsar.models.fusion.FusionTeacher",
        "num_classes": 3,
        "encoders": {
            m: {
                "_target_": "mmfsar.models.base.ModalityEncoder",
                "modality": m,
                "backbone": backbone,
            }
            for m in ("rgb", "flow", "pose")
        },
        "fusion": {
            "_target_": "mmfsar.models.fusion.MFM",
            "dims": encoder_dims(teacher.encoders),
            "num_frames": T,
            "dim": 8,
            "heads": 2,
        },
    }
    path = export_encoder(
        tmp_path / "encoder.pt", teacher, encoder_config=config, modalities={}, frames={}
    )
    rebuilt = build_encoder(path).eval()
    inputs = clips(teacher.modalities, seed=4)
    assert torch.equal(rebuilt(inputs).pooled, teacher(inputs).pooled)


def test_exported_modalities_feed_encoders_as_trained(tmp_path):
    """The stored modality settings of an export win; a configured modality that reads clips
    differently is an error naming the key, while ``encoder_args`` (how a new encoder would be
    shaped; the export has its own) may differ."""
    from mmfsar.errors import ConfigError
    from mmfsar.models.base import exported_modalities

    stored = {"_target_": "mmfsar.data.modalities.RGB", "size": 64, "encoder_args": {"widths": [16, 32]}}
    encoder = ModalityEncoder(modality="rgb", backbone=TinyBackbone(dim=8))
    config = {"_target_": "mmfsar.models.base.ModalityEncoder", "modality": "rgb",
              "backbone": {"_target_": f"{TinyBackbone.__module__}.TinyBackbone", "dim": 8}}  # fmt: skip
    path = export_encoder(tmp_path / "encoder.pt", encoder, encoder_config=config, modalities={"rgb": stored}, frames={})

    same_reading = {"rgb": {**stored, "encoder_args": {}}, "flow": {"size": 32}}
    assert exported_modalities({"rgb": str(path)}, same_reading) == {"rgb": stored, "flow": {"size": 32}}
    with pytest.raises(ConfigError, match=r"modality 'rgb'.*\['size'\]"):
        exported_modalities({"rgb": str(path)}, {"rgb": {**stored, "size": 32}})
